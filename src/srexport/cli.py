"""``srexport build | run | check | bench | inspect``: thin shells over the API.

Bad input ends with one line on stderr and exit status 2; a parity bound
that fails ends ``check`` with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import UserError

EXIT_PARITY_FAILED = 1


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (its default prints the whole usage first)."""

    def error(self, message: str):
        self.exit(UserError.exit_code, f"srexport: error: {message}; see '{self.prog} --help'\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="srexport",
        description="Export one-step diffusion super-resolution models (PiSA-SR, S3Diff) to verified ONNX "
                    "artifacts and run them.",
    )
    parser.add_argument("--version", action="version", version=f"srexport {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser(
        "build", help="export a model into an artifact folder (ONNX graphs + manifest.json)",
        description=(
            "Export a model to an artifact folder: ONNX graphs for vae_encoder, the UNet and vae_decoder, and a "
            "manifest.json with specs, constants, checks and sha256 of every file. Every graph is checked against "
            "its PyTorch module and the whole ONNX pipeline against the PyTorch reference before the folder is "
            "written (atomically). With no --base/--checkpoint the built-in demo is built: a tiny model with SD "
            "2.1's block structure and seeded, untrained weights. The VAE encoder returns the latent posterior "
            "mean; upstream samples from the posterior."),
    )
    b.add_argument("--model", choices=["pisa-sr", "s3diff"], default="pisa-sr",
                   help="which upstream model (default: pisa-sr)")
    b.add_argument("--base", type=Path,
                   help="local diffusers folder: Stable Diffusion 2.1-base (pisa-sr) or SD-Turbo (s3diff)")
    b.add_argument("--checkpoint", type=Path, help="pisa_sr.pkl or s3diff.pkl (upstream formats)")
    b.add_argument("--de-net", type=Path, help="s3diff: the degradation estimator de_net.pth")
    b.add_argument("--scale", type=int, default=4, help="upscale factor (default: 4; S3Diff is x4 only)")
    b.add_argument("--lambda-pix", type=float, default=1.0, help="pixel-level guidance scale (default: 1)")
    b.add_argument("--lambda-sem", type=float, default=1.0, help="semantic-level guidance scale (default: 1)")
    b.add_argument("--guidance", choices=["merged", "exact"], default="merged",
                   help="merged: one UNet graph with the LoRA deltas merged at the chosen scales (first order in "
                        "the deltas; exact at lambda_pix=1 for lambda_sem in {0,1}); exact: two UNet graphs "
                        "combined with upstream's formula (default: merged)")
    b.add_argument("--degradation", default="dynamic", metavar="dynamic|BLUR,NOISE",
                   help="s3diff: 'dynamic' estimates the degradation per image and keeps the LoRA in the graphs, "
                        "modulated by the scores; BLUR,NOISE (two numbers in [0,1]) merges the LoRA for that fixed "
                        "degradation and leaves the estimator out (default: dynamic)")
    b.add_argument("--cfg-scale", type=float, default=1.07,
                   help="s3diff: classifier-free guidance scale, upstream's 1.07; 1.0 skips the negative pass")
    b.add_argument("--color-fix", choices=["adain", "wavelet", "none"], default=None,
                   help="colour correction against the upscaled input (default: as upstream, adain for pisa-sr, "
                        "wavelet for s3diff)")
    b.add_argument("--process-size", type=int, default=512,
                   help="inputs whose short side is below PROCESS_SIZE/scale are first resized up to it, as "
                        "upstream's --process_size (default: 512)")
    b.add_argument("--out", type=Path, help="artifact folder to write (default: artifacts/<model>-x<scale>[-demo])")
    b.add_argument("--force", action="store_true", help="replace --out if it exists")
    b.add_argument("--quiet", action="store_true", help="print only the artifact path")

    r = sub.add_parser("run", help="upscale an image or a folder of images with an artifact")
    r.add_argument("artifact", type=Path)
    r.add_argument("input", type=Path, help="an image file, or a folder of images")
    r.add_argument("-o", "--output", type=Path, required=True, help="output image file, or folder for a folder input")
    r.add_argument("--backend", choices=["ort", "torch"], default="ort",
                   help="ort: onnxruntime on the artifact's graphs; torch: the PyTorch reference modules")
    r.add_argument("--threads", type=int, default=None, help="intra-op threads for onnxruntime")
    r.add_argument("--force", action="store_true", help="overwrite existing outputs")

    c = sub.add_parser("check", help="parity of an artifact against the PyTorch reference (per component, end to end)")
    c.add_argument("artifact", type=Path)
    c.add_argument("images", type=Path, nargs="*", help="LR images to check on (default: the built-in sample)")
    c.add_argument("--backend", choices=["ort", "torch"], default="ort")
    c.add_argument("--max-abs", type=float, default=None, help="bound per component (default: 1e-3 for fp32 graphs)")
    c.add_argument("--min-psnr", type=float, default=None, help="end-to-end bound in dB (default: 50)")
    c.add_argument("--base", help="the base folder, if it moved since the build")
    c.add_argument("--checkpoint", help="the checkpoint, if it moved since the build")
    c.add_argument("--de-net", help="s3diff: the degradation estimator, if it moved since the build")
    c.add_argument("--json", type=Path, help="also write the report as JSON")
    c.add_argument("--compare-image", type=Path, metavar="FILE.png",
                   help="write a side-by-side picture per image: bicubic | reference | backend | amplified difference")

    bn = sub.add_parser(
        "bench", help="latency per stage against the PyTorch reference, with parity, as tables, JSON and a plot",
        description=(
            "Time each backend (and the precision it runs at) per stage and end to end at each LR size: warm-up runs "
            "excluded, medians and p90 over --iters runs on rotating seeded inputs, CUDA events on a GPU. The "
            "PyTorch eager baseline is fp32 on CPU and fp16 on a GPU (plus torch.compile there); speedups are "
            "ratios to it. Each backend's output is compared with the PyTorch fp32 reference on the same inputs; "
            "a variant below its PSNR bound ends the run with status 1. Backends that cannot run here are listed "
            "as skipped with the reason."),
    )
    bn.add_argument("artifact", type=Path)
    bn.add_argument("--backends", default="torch,ort",
                    help="comma-separated: torch, torch-compile, ort, ort-cuda, trt (default: torch,ort)")
    bn.add_argument("--sizes", default="64", help="LR sizes: N (square) or WxH, comma-separated (default: 64)")
    bn.add_argument("--iters", type=int, default=20, help="timed runs per backend and size (default: 20)")
    bn.add_argument("--warmup", type=int, default=3, help="untimed runs first (default: 3)")
    bn.add_argument("--inputs", type=int, default=3, help="distinct seeded LR images rotated through (default: 3)")
    bn.add_argument("--device", default="auto", help="where the PyTorch baseline runs: auto, cpu, cuda[:N] (default: auto)")
    bn.add_argument("--threads", type=int, default=None, help="intra-op threads for onnxruntime")
    bn.add_argument("--timer", choices=["auto", "host"], default="auto",
                    help="auto: CUDA events on the runners' stream on a GPU, perf_counter on CPU; host: perf_counter "
                         "with a device synchronisation at every stage boundary")
    bn.add_argument("--no-compile", action="store_true", help="on a GPU, skip the torch.compile baseline")
    bn.add_argument("--min-psnr", default=None, metavar="DB|PREC=DB,...",
                    help="end-to-end PSNR bound against the fp32 reference (default: fp32=50, fp16=30, int8=25)")
    bn.add_argument("--max-abs", type=float, default=None, help="also bound the end-to-end max abs difference")
    bn.add_argument("--gpu", default="auto", help="the GPU whose floor the cost model reports: h100-sxm, h100-pcie, "
                                                  "h200 (default: auto, the CUDA device here, else h100-sxm)")
    bn.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense peak rate (TFLOP/s)")
    bn.add_argument("--peak-gbps", type=float, default=None, help="override the GPU's memory bandwidth (GB/s)")
    bn.add_argument("--seed", type=int, default=0, help="seed of the LR inputs (default: 0)")
    bn.add_argument("--json", type=Path, help="write the report as JSON (schema srexport.bench v1)")
    bn.add_argument("--plot", type=Path, metavar="FILE.png", help="write stacked per-stage bars and parity as PNG")
    bn.add_argument("--base", help="the base folder, if it moved since the build")
    bn.add_argument("--checkpoint", help="the checkpoint, if it moved since the build")
    bn.add_argument("--de-net", help="s3diff: the degradation estimator, if it moved since the build")

    i = sub.add_parser("inspect", help="print an artifact's manifest readably")
    i.add_argument("artifact", type=Path)
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    return parser


def cmd_build(args) -> int:
    from .export.build import build

    if (args.base is None) != (args.checkpoint is None):
        raise UserError("pass both --base and --checkpoint, or neither for the built-in demo")
    if args.scale < 1 or args.scale > 16:
        raise UserError(f"--scale {args.scale} is out of range; use an integer from 1 to 16")
    if args.base is not None:
        from .models.base import read_scheduler_config, validate_base_folder

        validate_base_folder(args.base)
        if args.model == "s3diff":
            read_scheduler_config(args.base)
        for flag, path in (("--checkpoint", args.checkpoint), ("--de-net", args.de_net)):
            if path is not None and not path.is_file():
                raise UserError(f"{flag} {path} does not exist")
    prepare, source, settings = (_pisa_build if args.model == "pisa-sr" else _s3diff_build)(args)
    if source.demo and not args.quiet:
        print(f"Building the built-in {args.model} DEMO: a tiny model with SD 2.1's block structure and seeded, "
              "untrained weights (its output is not a real super-resolution).", file=sys.stderr)
    out = args.out or Path("artifacts") / f"{args.model}-x{args.scale}{'-demo' if source.demo else ''}"
    print(build(prepare, source, settings, out, force=args.force, quiet=args.quiet))
    return 0


def _pisa_build(args):
    from .export.pisa_recipe import prepare_pisa
    from .models.pisa_reference import PisaSettings
    from .models.sources import PisaSource, demo_pisa_source

    if args.de_net is not None:
        raise UserError("--de-net is for --model s3diff; PiSA-SR has no degradation estimator")
    settings = PisaSettings(args.lambda_pix, args.lambda_sem, args.guidance, args.scale, args.process_size,
                            args.color_fix or "adain").validate()
    source = demo_pisa_source() if args.base is None else PisaSource(args.base, args.checkpoint)
    return prepare_pisa, source, settings


def _s3diff_build(args):
    from .export.s3diff_recipe import S3DiffSettings, parse_degradation, prepare_s3diff
    from .models.sources import S3DiffSource, demo_s3diff_source

    settings = S3DiffSettings(parse_degradation(args.degradation), args.cfg_scale, args.color_fix or "wavelet",
                              args.scale).validate()
    if args.base is None:
        if args.de_net is not None:
            raise UserError("--de-net needs --base and --checkpoint too (or none of them for the demo)")
        return prepare_s3diff, demo_s3diff_source(), settings
    if args.de_net is None and settings.dynamic:
        raise UserError("--degradation dynamic needs the estimator: pass --de-net de_net.pth "
                        "(or a fixed --degradation BLUR,NOISE)")
    return prepare_s3diff, S3DiffSource(args.base, args.checkpoint, args.de_net if settings.dynamic else None), settings


def cmd_run(args) -> int:
    from .export.artifact import read_manifest
    from .processing import Processing, check_input_size
    from .runtime.images import check_output_path, list_images, load_image, probe_image, save_image
    from .runtime.loading import load_pipeline

    if args.input.is_dir():
        inputs = list_images(args.input)
        if not inputs:
            raise UserError(f"{args.input} holds no images ({', '.join(('png', 'jpg', 'tif', 'bmp', 'webp'))})")
        if args.output.exists() and not args.output.is_dir():
            raise UserError(f"{args.output} is a file; for a folder input, -o must be a folder")
        jobs = [(p, args.output / (p.stem + ".png")) for p in inputs]
        clash = [p.name for p, out in jobs if sum(o == out for _, o in jobs) > 1]
        if clash:
            raise UserError(f"{', '.join(clash[:3])} would all be written to the same output name; "
                            "rename them or run them separately")
    else:
        if not args.input.exists():
            raise UserError(f"input {args.input} does not exist")
        jobs = [(args.input, args.output)]
    if not args.input.is_dir():
        check_output_path(args.output, args.force)
    elif args.output.is_dir():
        for _, out in jobs:
            check_output_path(out, args.force)
    # Every input is probed (header only) before the models load, so a bad file
    # late in a folder stops the run before anything is written.
    processing = Processing.from_dict(read_manifest(args.artifact)["processing"])
    for src, _ in jobs:
        check_input_size(*probe_image(src), processing, name=str(src))
    pipeline = load_pipeline(args.artifact, backend=args.backend, threads=args.threads)
    if args.input.is_dir():
        args.output.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    for src, out in tqdm(jobs, disable=len(jobs) == 1, unit="image", file=sys.stderr):
        save_image(pipeline(load_image(src)), out)
    if len(jobs) == 1:
        print(jobs[0][1])
    return 0


def cmd_check(args) -> int:
    from .samples import SAMPLE_NAME, sample_image
    from .checking import COMPONENT_MAX_ABS, END_TO_END_MIN_PSNR, check_image, failures
    from .export.artifact import load_artifact
    from .runtime.images import load_image
    from .runtime.loading import load_pipeline, reference_for

    images = [(p.name, load_image(p)) for p in args.images] or [(SAMPLE_NAME, sample_image())]
    artifact = load_artifact(args.artifact)
    reference = reference_for(artifact, args.base, args.checkpoint, args.de_net)
    pipeline = load_pipeline(args.artifact, backend=args.backend, reference=reference)
    if (args.max_abs is not None and args.max_abs <= 0) or (args.min_psnr is not None and args.min_psnr <= 0):
        raise UserError("--max-abs and --min-psnr must be positive numbers")
    if args.compare_image is not None and (args.compare_image.suffix.lower() != ".png"
                                           or not args.compare_image.absolute().parent.is_dir()):
        raise UserError(f"--compare-image {args.compare_image} must be a .png file in an existing folder")
    max_abs = args.max_abs if args.max_abs is not None else COMPONENT_MAX_ABS
    min_psnr = args.min_psnr if args.min_psnr is not None else END_TO_END_MIN_PSNR
    reports, problems = [], []
    print(f"{artifact.folder}  backend={args.backend}  bounds: component max_abs <= {max_abs:g}, "
          f"end-to-end PSNR >= {min_psnr:g} dB")
    for name, lr in images:
        report = check_image(pipeline, reference, lr, name)
        reports.append(report)
        print(f"{name}  ->  {report.output_shape[-1]}x{report.output_shape[-2]}")
        for component, parity in report.components.items():
            print(f"  {component:<14} {parity.describe()}")
        print(f"  {'end to end':<14} {report.end_to_end.describe()}")
        problems += failures(report, max_abs, min_psnr)
    if args.json:
        args.json.write_text(json.dumps({"backend": args.backend, "max_abs": max_abs, "min_psnr": min_psnr,
                                         "images": [r.to_dict() for r in reports], "failures": problems}, indent=2))
    if args.compare_image:
        from .plots import side_by_side

        rows = [dict(r.images, name=f"{r.name}: {r.end_to_end.describe()}", backend=f"{args.backend} backend",
                     filter=reference.processing.upscale_filter) for r in reports]
        side_by_side(rows).save(args.compare_image)
        print(args.compare_image)
    if problems:
        print("FAILED: " + "; ".join(problems), file=sys.stderr)
        return EXIT_PARITY_FAILED
    print("all parity bounds hold")
    return 0


def cmd_inspect(args) -> int:
    from .export.artifact import load_artifact
    from .describe import describe_manifest

    artifact = load_artifact(args.artifact)
    print(json.dumps(artifact.manifest, indent=2) if args.json else describe_manifest(artifact))
    return 0


def cmd_bench(args) -> int:
    from .bench import BenchConfig, format_report, parse_min_psnr, parse_sizes, run_bench

    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not path.absolute().parent.is_dir():
            raise UserError(f"the folder of {flag} {path} does not exist; create it first")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise UserError(f"--plot {args.plot} must end in .png")
    config = BenchConfig(
        backends=[b.strip() for b in args.backends.split(",") if b.strip()], sizes=parse_sizes(args.sizes),
        iters=args.iters, warmup=args.warmup, inputs=args.inputs, device=args.device, threads=args.threads,
        seed=args.seed, timer=args.timer, compile=not args.no_compile,
        min_psnr=parse_min_psnr(args.min_psnr) if args.min_psnr else {}, max_abs=args.max_abs, gpu=args.gpu,
        peak_tflops=args.peak_tflops, peak_gbps=args.peak_gbps, base=args.base, checkpoint=args.checkpoint,
        de_net=args.de_net).validate()
    report = run_bench(args.artifact, config)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(args.json)
    if args.plot:
        from .plots import plot_bench

        print(plot_bench(report, args.plot))
    return 0 if report["passed"] else EXIT_PARITY_FAILED


COMMANDS = {"build": cmd_build, "run": cmd_run, "check": cmd_check, "bench": cmd_bench, "inspect": cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"srexport: error: {e}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("srexport: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
