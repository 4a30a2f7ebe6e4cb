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
from .artifact.manifest import ATTENTIONS
from .artifact.precisions import DEFAULT_PRECISION, GRAPH_PRECISIONS
from .models.kinds import MODEL_KINDS

EXIT_PARITY_FAILED = 1


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (its default prints the whole usage first)."""

    def error(self, message: str):
        self.exit(UserError.exit_code, f"srexport: error: {message}; see '{self.prog} --help'\n")


def _build_parser() -> argparse.ArgumentParser:
    from .artifact import tile_settings as ts

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
            "Export a model to an artifact folder: ONNX graphs for vae_encoder, the UNet and vae_decoder (with "
            "the default coarse statistics, or two-pass, also the VAE's and the UNet's statistics and pooled "
            "graphs; S3Diff also its degradation estimator), and a "
            "manifest.json with specs, constants, checks and sha256 of every file. Every graph is checked against "
            "its PyTorch module and the whole ONNX pipeline against the PyTorch reference before the folder is "
            "written (atomically). With no --base/--checkpoint the built-in demo is built: for pisa-sr a tiny "
            "model with SD 2.1's block structure trained for minutes on a CPU (about as good as bicubic, but "
            "error numbers on it mean something), for s3diff the same structure with seeded, untrained weights. The VAE encoder returns the latent posterior "
            "mean; upstream samples from the posterior."),
    )
    b.add_argument("--model", choices=list(MODEL_KINDS), default="pisa-sr",
                   help="which upstream model (default: pisa-sr)")
    b.add_argument("--base", type=Path,
                   help="local diffusers folder: Stable Diffusion 2.1-base (pisa-sr) or SD-Turbo (s3diff)")
    b.add_argument("--checkpoint", type=Path, help="pisa_sr.pkl or s3diff.pkl (upstream formats)")
    b.add_argument("--de-net", type=Path, help="s3diff: the degradation estimator de_net.pth")
    b.add_argument("--scale", type=int, default=4, help="upscale factor (default: 4; S3Diff is x4 only)")
    b.add_argument("--lambda-pix", type=float, default=None, help="pisa-sr: pixel-level guidance scale (default: 1)")
    b.add_argument("--lambda-sem", type=float, default=None, help="pisa-sr: semantic-level guidance scale (default: 1)")
    b.add_argument("--guidance", choices=["merged", "exact", "adjustable"], default=None,
                   help="pisa-sr: merged: one UNet graph with the LoRA deltas merged at the chosen scales (first order in "
                        "the deltas; exact at lambda_pix=1 for lambda_sem in {0,1}); exact: two UNet graphs "
                        "combined with upstream's formula, any scales per call; adjustable: one UNet graph keeping "
                        "both LoRA sets as branches mixed per sample, so 'run' chooses the scales and the mode "
                        "(merged, or exact as one batch of two) per call (default: merged)")
    b.add_argument("--degradation", default=None, metavar="dynamic|BLUR,NOISE",
                   help="s3diff: 'dynamic' estimates the degradation per image and keeps the LoRA in the graphs, "
                        "modulated by the scores; BLUR,NOISE (two numbers in [0,1]) merges the LoRA for that fixed "
                        "degradation and leaves the estimator out (default: dynamic)")
    b.add_argument("--cfg-scale", type=float, default=None,
                   help="s3diff: classifier-free guidance scale (default: upstream's 1.07); 1.0 skips the negative "
                        "pass")
    b.add_argument("--color-fix", choices=["adain", "wavelet", "none"], default=None,
                   help="colour correction against the upscaled input (default: as upstream, adain for pisa-sr, "
                        "wavelet for s3diff)")
    b.add_argument("--process-size", type=int, default=None,
                   help="pisa-sr: inputs whose short side is below PROCESS_SIZE/scale are first resized up to it, as "
                        "upstream's --process_size (default: 512)")
    b.add_argument("--size-policy", choices=["pad", "floor"], default=None,
                   help="pisa-sr: how the upscaled image meets the VAE's multiple of 8. pad: reflect-pad it "
                        "right/bottom and crop the result back, so the output is exactly scale x the input (as "
                        "s3diff does); floor: upstream's resize to the size floored to a multiple of 8, so the "
                        "output loses up to 7 pixels per side (217x301 -> 864x1200 at x4, not 868x1204). "
                        "Recorded in the manifest (default: pad)")
    b.add_argument("--out", type=Path, help="artifact folder to write (default: artifacts/<model>-x<scale>[-demo])")
    b.add_argument("--force", action="store_true", help="replace --out if it exists")
    b.add_argument("--quiet", action="store_true", help="print only the artifact path")
    b.add_argument("--precision", choices=list(GRAPH_PRECISIONS), default=DEFAULT_PRECISION,
                   help="precision of the graphs, set in the ONNX itself as strongly typed TensorRT needs: fp16 (norms, "
                        "softmax and measured overflow kept fp32), int8 (symmetric Q/DQ on Conv/MatMul, the rest fp16) "
                        "or fp32. Inputs and outputs stay float32. The fp32 graphs are checked first; the chosen "
                        "precision's error against the fp32 reference is printed and recorded (default: fp16)")
    b.add_argument("--target", choices=["gpu", "cpu"], default="gpu",
                   help="int8 only: gpu makes TensorRT's explicit-quantization graphs (symmetric int8, fp16 between); "
                        "cpu makes graphs for onnxruntime's CPU kernels (u8s8 QDQ with quantized outputs and int32 "
                        "bias, fused into QLinearConv/QLinearMatMul, fp32 between), which TensorRT does not take "
                        "(default: gpu)")
    b.add_argument("--calib", default="builtin", metavar="builtin|FOLDER",
                   help="calibration photos: 'builtin' (scikit-image's photos, the training split; needs "
                        "scikit-image) or a folder of high-resolution photos; crops are degraded like the model's "
                        "inputs and run through the fp32 reference (cached) (default: builtin)")
    b.add_argument("--calib-size", type=int, default=32, metavar="N",
                   help="int8: number of calibration tiles (LR crops of the runtime's tile shape, 64x64 LR without "
                        "tiling); fp16's activation scan uses at most 8 (default: 32)")
    b.add_argument("--calib-method", choices=["minmax", "percentile"], default="minmax",
                   help="int8 activation ranges from the calibration tiles: minmax, or percentile (99.999%%, "
                        "clips rare outliers) (default: minmax)")
    b.add_argument("--engines", action="store_true",
                   help="also build TensorRT engines (needs TensorRT and an NVIDIA GPU; without TensorRT this fails "
                        "at once: build the ONNX artifact here and run 'srexport engines' on the GPU machine)")
    b.add_argument("--ort-attention", choices=list(ATTENTIONS), default="fused",
                   help="fused: also write, beside each graph with attention, its onnxruntime twin with the "
                        "attention fused into com.microsoft.MultiHeadAttention (flash attention on CPU and CUDA: no "
                        "score matrix, a 1024 px VAE tile's decode 2.3 -> 1.0 GB peak), checked against the plain "
                        "graph; TensorRT keeps reading the portable graphs. plain: portable graphs only (default: "
                        "fused)")
    _add_engine_options(b, tile_batch=False)  # build: the tile batch is the tiling's
    _add_tiling_options(b)

    r = sub.add_parser("run", help="upscale an image or a folder of images with an artifact")
    r.add_argument("artifact", type=Path)
    r.add_argument("input", type=Path, help="an image file, or a folder of images")
    r.add_argument("-o", "--output", type=Path, required=True,
                   help="output image file, or a folder: for a folder input the outputs are FOLDER/<name>.png (it "
                        "must not be the input folder); for one image into an existing folder, FOLDER/<name>.png")
    r.add_argument("--backend", choices=BACKEND_CHOICES, default="ort",
                   help="ort: onnxruntime (CPU) on the artifact's graphs; ort-cuda: onnxruntime's CUDA provider "
                        "(onnxruntime-gpu); trt: the artifact's TensorRT engines (TensorRT, NVIDIA GPU); torch: "
                        "the PyTorch reference modules")
    _add_attention_option(r)
    r.add_argument("--ort-arena", choices=["shared", "session", "off"], default="shared",
                   help="ort backend: onnxruntime's CPU memory arena. shared: one for all the artifact's graphs (peak "
                        "of the largest run); session: one per graph, onnxruntime's default (the sum of their "
                        "peaks); off: none (least memory, slower on some graphs) (default: shared)")
    r.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for onnxruntime, 1 to this machine's core count (default: onnxruntime's "
                        "own, one per physical core)")
    r.add_argument("--force", action="store_true",
                   help="overwrite existing outputs (never an input: an output that is an input is refused)")
    # --- tiling (runtime/tiling.py) ---
    r.add_argument("--no-tile", action="store_true",
                   help="run whole images instead of tiles (for comparison); refused above the artifact's "
                        "untiled limit (see --untiled-max-mp)")
    r.add_argument("--untiled-max-mp", type=float, default=None, metavar="MP",
                   help="largest whole-image run, in output megapixels, for --no-tile (default: the artifact's, "
                        "set at build; 4.2 MP unless changed there, 2.1 MP for artifacts built before fused "
                        "attention)")
    r.add_argument("--vae-norm", choices=list(ts.VAE_NORMS), default=None,
                   help="GroupNorm statistics of tiled VAE runs (default: the artifact's, set at build). two-pass "
                        "and coarse need an artifact with the VAE's two-pass graphs; per-tile runs on any artifact")
    r.add_argument("--unet-norm", choices=list(ts.UNET_NORMS), default=None,
                   help="GroupNorm statistics of tiled UNet runs (default: the artifact's, set at build). coarse "
                        "needs an artifact built with it; per-tile runs on any artifact")
    r.add_argument("--tile-plan", choices=list(ts.TILE_PLAN_NAMES), default=None,
                   help="tile layout (default: the artifact's, set at build); for comparison on onnxruntime and "
                        "torch: TensorRT engines are profiled for the artifact's own")
    r.add_argument("-v", "--verbose", action="store_true",
                   help="print each image's tiles per stage and the work they compute against an untiled pass")
    r.add_argument("--grey-output", choices=["auto", "color"], default="auto",
                   help="auto: a greyscale input (identical channels, as a greyscale file is read) gives a greyscale "
                        "output, the result's BT.601 luma (0.299 R + 0.587 G + 0.114 B) in all three channels, "
                        "since the networks add colour casts to grey photos; color: keep the networks' colour "
                        "output (default: auto)")
    _add_guidance_options(r)

    c = sub.add_parser("check", help="parity of an artifact against the PyTorch reference (per component, end to end)")
    c.add_argument("artifact", type=Path)
    c.add_argument("images", type=Path, nargs="*", help="LR images to check on (default: the built-in sample)")
    c.add_argument("--backend", choices=BACKEND_CHOICES, default="ort")
    _add_attention_option(c)
    c.add_argument("--max-abs", type=float, default=None,
                   help="bound per component on max abs (default: the artifact's, 1e-3 for fp32 graphs, none for fp16/int8)")
    c.add_argument("--max-rel-l2", type=float, default=None,
                   help="bound per component on relative L2 error (default: none; fp16/int8 components are bounded "
                        "on their alone output PSNR, recorded at build: the output with only that graph converted)")
    c.add_argument("--min-psnr", type=float, default=None,
                   help="end-to-end bound in dB (default: the artifact's, recorded at build: fp32 50, fp16 40, int8 30)")
    c.add_argument("--base", help="the base folder, if it moved since the build")
    c.add_argument("--checkpoint", help="the checkpoint, if it moved since the build")
    c.add_argument("--de-net", help="s3diff: the degradation estimator, if it moved since the build")
    c.add_argument("--json", type=Path, help="also write the report as JSON")
    c.add_argument("--compare-image", type=Path, metavar="FILE.png",
                   help="write one side-by-side picture with a row per checked image: bicubic | reference | backend | "
                        "amplified difference")
    _add_guidance_options(c)

    tr = sub.add_parser(
        "triton", help="write a Triton Inference Server model repository for an artifact",
        description=(
            "Write a Triton model repository: one model per component (config.pbtxt from its spec, dynamic "
            "batching) and the orchestrator 'srexport' (Python backend): an image in, the upscaled image out, "
            "running srexport's pipeline (tiling, blending, processing, guidance) with the component calls going "
            "to the component models through BLS, so tiles of concurrent requests share batches. Python-backend "
            "models refer to the artifact by its absolute path (its files' sha256 are verified when they load); "
            "native models get copies of the graphs or engines."))
    tr.add_argument("artifact", type=Path)
    tr.add_argument("--out", type=Path, required=True, help="the repository folder to write")
    tr.add_argument("--backend", choices=["ort", "ort-cuda", "trt"], default="ort",
                    help="what computes the components: onnxruntime CPU or CUDA, or the artifact's TensorRT engines "
                         "(default: ort)")
    tr.add_argument("--components", choices=["python", "native"], default="python",
                    help="python: each component in a Python-backend model on the srexport backend (runs with the "
                         "serve extra's tritonserver, CPU included); native: Triton's own onnxruntime_onnx or "
                         "tensorrt_plan models, for NGC's Triton containers on GPU nodes (default: python)")
    tr.add_argument("--instances", type=int, default=1, help="orchestrator instances (default: 1)")
    tr.add_argument("--component-instances", type=int, default=1, help="instances of each component model (default: 1)")
    tr.add_argument("--max-batch-size", type=int, default=None,
                    help="component models' max_batch_size (default: the pipeline's tile batch per call times "
                         "--instances, so every orchestrator's calls can share a batch)")
    tr.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads per component model")
    tr.add_argument("--max-output-mp", type=float, default=64.0,
                    help="requests whose output would exceed this many megapixels are refused (default: 64)")
    tr.add_argument("--force", action="store_true", help="replace --out if it exists")

    sv = sub.add_parser("serve", help="start the serve extra's tritonserver on a repository written by 'triton'")
    sv.add_argument("repository", type=Path)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sv.add_argument("--http-port", type=int, default=8000)
    sv.add_argument("--grpc-port", type=int, default=8001)
    sv.add_argument("--metrics-port", type=int, default=8002)
    sv.add_argument("--log", type=Path, default=None, help="write tritonserver's log to this file")

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
    bn.add_argument("--threads", type=int, default=None,
                    help="intra-op threads for onnxruntime, 1 to this machine's core count (default: onnxruntime's "
                         "own, one per physical core)")
    bn.add_argument("--torch-threads", type=int, default=None,
                    help="intra-op threads for PyTorch (the baseline and the pre/post-processing of every backend), "
                         "1 to this machine's core count (default: PyTorch's own)")
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
    _add_guidance_options(bn)
    bn.add_argument("--json", type=Path, help="write the report as JSON (schema srexport.bench v1)")
    bn.add_argument("--plot", type=Path, metavar="FILE.png", help="write stacked per-stage bars and parity as PNG")
    bn.add_argument("--base", help="the base folder, if it moved since the build")
    bn.add_argument("--checkpoint", help="the checkpoint, if it moved since the build")
    bn.add_argument("--de-net", help="s3diff: the degradation estimator, if it moved since the build")

    e = sub.add_parser(
        "engines", help="build TensorRT engines into an ONNX artifact (on the GPU machine that will run them)",
        description=(
            "Build one TensorRT engine per component from the artifact's ONNX graphs, strongly typed (the graphs' "
            "dtypes set the precision), with one optimisation profile per engine from the component specs at the "
            "tile shape (batch 1 to --tile-batch). The engines and their compatibility record (TensorRT version, "
            "GPU, compute capability, hardware-compatibility level) are added to the artifact and its manifest "
            "atomically. Needs TensorRT and an NVIDIA GPU."),
    )
    e.add_argument("artifact", type=Path)
    e.add_argument("--force", action="store_true", help="rebuild engines the artifact already has")
    e.add_argument("--quiet", action="store_true", help="print only the artifact path")
    _add_engine_options(e)

    i = sub.add_parser("inspect", help="print an artifact's manifest readably")
    i.add_argument("artifact", type=Path, nargs="?")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    i.add_argument("--schema", action="store_true",
                   help="print the JSON Schema every manifest is validated against (no ARTIFACT needed)")
    return parser


BACKEND_CHOICES = ["ort", "ort-cuda", "trt", "torch"]  # runtime.runners.BACKENDS, without importing torch


def _add_engine_options(p: argparse.ArgumentParser, tile_batch: bool = True) -> None:
    if tile_batch:
        p.add_argument("--tile-batch", type=int, default=None,
                       help="largest batch of tiles per engine call; profiles run from 1 to it (default: the "
                            "artifact's tiling batch)")
    p.add_argument("--opt-level", type=int, default=3,
                   help="engines: TensorRT builder optimisation level 0-5 (default: 3)")
    p.add_argument("--workspace-gib", type=float, default=None,
                   help="engines: workspace memory limit in GiB (default: TensorRT's, the GPU's memory)")
    p.add_argument("--hardware-compat", choices=["none", "ampere+", "same-cc"], default="none",
                   help="engines: none (fastest, this GPU's compute capability only), ampere+ (any GPU of compute "
                        "capability 8.0 or later), same-cc (any GPU of this compute capability) (default: none)")
    p.add_argument("--version-compatible", action="store_true",
                   help="engines: also loadable by later TensorRT versions (can be slower)")
    p.add_argument("--timing-cache", type=Path, default=None,
                   help="engines: timing cache file, reused and updated (default: ARTIFACT.trt-timing-cache beside "
                        "the artifact folder)")


# --- tiling options (artifact/tile_settings.py holds the defaults and their reasoning) --------------


def _add_attention_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attention", choices=list(ATTENTIONS), default="fused",
                   help="onnxruntime backends: fused runs each graph's MultiHeadAttention twin where the artifact "
                        "has one (flash attention: no score matrix in memory); plain the portable MatMul-Softmax-"
                        "MatMul graphs (default: fused)")


def _add_guidance_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "guidance", "Per-call guidance (default: the artifact's, set at build). PiSA-SR artifacts built with "
                    "--guidance adjustable take any scales in either mode, exact ones any scales; merged ones only "
                    "their own. S3Diff artifacts take a cfg scale where built with the negative pass, and given "
                    "degradation scores where dynamic.")
    g.add_argument("--lambda-pix", type=float, default=None, help="pisa-sr: pixel-level guidance scale")
    g.add_argument("--lambda-sem", type=float, default=None, help="pisa-sr: semantic-level guidance scale")
    g.add_argument("--guidance", choices=["merged", "exact"], default=None,
                   help="pisa-sr: merged (one UNet pass) or exact (upstream's two passes, as one batch on an "
                        "adjustable artifact)")
    g.add_argument("--cfg-scale", type=float, default=None, help="s3diff: classifier-free guidance scale")
    g.add_argument("--degradation", default=None, metavar="BLUR,NOISE",
                   help="s3diff: degradation scores in [0,1] to use instead of the estimator's (dynamic artifacts)")


def _controls(args):
    """The guidance options of run, check and bench (``_add_guidance_options``)."""
    from .artifact.guidance import Controls, parse_scores

    return Controls(args.lambda_pix, args.lambda_sem, args.guidance, args.cfg_scale,
                    parse_scores(args.degradation) if args.degradation is not None else None)


def _add_tiling_options(p: argparse.ArgumentParser) -> None:
    from .artifact import tile_settings as ts

    g = p.add_argument_group(
        "tiling", "Tile geometry, in output-resolution pixels, recorded in the manifest. 'srexport run' cuts every "
                  "image into tiles of these shapes (the shapes engines are built for), runs them in batches and "
                  "blends them with upstream's Gaussian weights, so any size runs at a memory set by the tile. "
                  "Defaults: " + ts.REASONING)
    g.add_argument("--tile", type=int, default=ts.DEFAULT_TILE, metavar="PX",
                   help=f"largest denoiser (UNet) tile, a multiple of 64; the even plan may run shorter ones "
                        f"(default: {ts.DEFAULT_TILE} = {ts.DEFAULT_TILE // 8} latent, as upstream)")
    g.add_argument("--tile-overlap", type=int, default=ts.DEFAULT_OVERLAP, metavar="PX",
                   help=f"overlap of neighbouring denoiser tiles, a multiple of 8 up to half the tile (default: "
                        f"{ts.DEFAULT_OVERLAP} = {ts.DEFAULT_OVERLAP // 8} latent; upstream 256)")
    g.add_argument("--tile-batch", type=int, default=ts.DEFAULT_BATCH, metavar="N",
                   help=f"denoiser tiles per call; VAE tiles per call are set to move as many pixels, at least 1; "
                        f"engine profiles run from batch 1 to it (default: {ts.DEFAULT_BATCH})")
    g.add_argument("--vae-tile", type=int, default=ts.DEFAULT_VAE_TILE, metavar="PX",
                   help=f"largest VAE encoder and decoder tile, a multiple of 64 (default: {ts.DEFAULT_VAE_TILE}; "
                        "upstream 1024 encoder, 1792 decoder)")
    g.add_argument("--vae-tile-overlap", type=int, default=ts.DEFAULT_VAE_OVERLAP, metavar="PX",
                   help=f"overlap of neighbouring VAE tiles (default: {ts.DEFAULT_VAE_OVERLAP})")
    g.add_argument("--vae-norm", choices=list(ts.VAE_NORMS), default=ts.DEFAULT_VAE_NORM,
                   help="GroupNorm statistics of tiled VAE runs. per-tile: " + ts.VAE_NORMS["per-tile"]
                        + ". two-pass: " + ts.VAE_NORMS["two-pass"] + ". coarse: " + ts.VAE_NORMS["coarse"]
                        + ". two-pass and coarse add the graphs vae_encoder_stats, "
                        "vae_encoder_pooled, vae_decoder_stats and vae_decoder_pooled. " + ts.VAE_NORM_REASONING
                        + f" (default: {ts.DEFAULT_VAE_NORM})")
    g.add_argument("--unet-norm", choices=list(ts.UNET_NORMS), default=ts.DEFAULT_UNET_NORM,
                   help="GroupNorm statistics of tiled UNet runs. " + "; ".join(f"{k}: {v}" for k, v in
                                                                                ts.UNET_NORMS.items())
                        + ". " + ts.UNET_NORM_REASONING + f" (default: {ts.DEFAULT_UNET_NORM})")
    g.add_argument("--tile-plan", choices=list(ts.TILE_PLAN_NAMES), default=ts.DEFAULT_TILE_PLAN,
                   help="how tiles are laid out: " + "; ".join(f"{k}: {v}" for k, v in ts.TILE_PLANS.items())
                        + f" (default: {ts.DEFAULT_TILE_PLAN})")
    g.add_argument("--tile-pad", action="store_true",
                   help="reflect-pad sides shorter than a tile up to it, so every call has exactly the tile shape "
                        "(static-shape engines); by default such sides run at their own length, which is exact")
    g.add_argument("--untiled-max-mp", type=float, default=ts.DEFAULT_UNTILED_MAX_MEGAPIXELS, metavar="MP",
                   help="largest whole-image run ('run --no-tile') in output megapixels (default: "
                        f"{ts.DEFAULT_UNTILED_MAX_MEGAPIXELS:g}, 2048x2048: the demo peaks at 2.9 GB there with "
                        "fused attention; the portable graphs' whole-image attention scores alone are 17 GiB)")


def _tiling_settings(args):
    from .artifact.tile_settings import TilingSettings

    return TilingSettings(args.tile, args.tile_overlap, args.tile_batch, args.vae_tile, args.vae_tile_overlap,
                          args.tile_pad, args.untiled_max_mp, args.vae_norm, args.tile_plan,
                          args.unet_norm).validate()


def _engine_options(args, tile_batch: int | None = None):
    from .export.engines import EngineOptions

    return EngineOptions(tile_batch, args.opt_level, args.workspace_gib, args.hardware_compat,
                         args.version_compatible, args.timing_cache).validate()


def cmd_engines(args) -> int:
    from .export.engines import build_engines

    options = _engine_options(args, args.tile_batch)
    print(build_engines(args.artifact, options, force=args.force, quiet=args.quiet))
    return 0


def _model_options(args) -> None:
    """Refuse an option of the other model in one line (it would be ignored); fill in this
    model's defaults."""
    for model, kind in MODEL_KINDS.items():
        for option, default in kind.build_options.items():
            given = getattr(args, option)
            if model != args.model and given is not None:
                flag = "--" + option.replace("_", "-")
                raise UserError(f"{flag} is an option of --model {model}; --model {args.model} does not use it: "
                                f"drop {flag}")
            if model == args.model and given is None:
                setattr(args, option, default)


def cmd_build(args) -> int:
    from .artifact.manifest import check_build_target
    from .export.build import build

    _model_options(args)
    out = args.out or Path("artifacts") / f"{args.model}-x{args.scale}{'-demo' if args.base is None else ''}"
    check_build_target(out, args.force)  # an --out that cannot be written fails before any work
    precision = _precision_options(args)
    if args.engines and precision.target == "cpu":
        raise UserError("--engines with --target cpu: the CPU int8 graphs are for onnxruntime, TensorRT does not "
                        "take them; drop --engines or build with --target gpu")
    engine_options = _engines_ready(args) if args.engines else None  # before any export: fail at once
    tiling = _tiling_settings(args)  # validated before anything loads
    if (args.base is None) != (args.checkpoint is None):
        raise UserError("pass both --base and --checkpoint, or neither for the built-in demo")
    if args.scale < 1 or args.scale > 16:
        raise UserError(f"--scale {args.scale} is out of range; use an integer from 1 to 16")
    if args.base is not None:
        from .models.base import read_scheduler_config, validate_base_folder

        validate_base_folder(args.base)
        if MODEL_KINDS[args.model].reads_scheduler_config:
            read_scheduler_config(args.base)
        for flag, path in (("--checkpoint", args.checkpoint), ("--de-net", args.de_net)):
            if path is not None and not path.is_file():
                raise UserError(f"{flag} {path} does not exist")
    prepare, source, settings = BUILDS[args.model](args)
    if source.demo and not args.quiet:
        from .models.sources import demo_description

        print(f"Building the built-in {args.model} DEMO: {demo_description(source)}.", file=sys.stderr)
    path = build(prepare, source, settings, out, force=args.force, quiet=args.quiet, precision=precision,
                 tiling=tiling, ort_attention=args.ort_attention)
    if engine_options is not None:
        from .export.engines import build_engines

        try:
            build_engines(path, engine_options, quiet=args.quiet)
        except UserError as e:
            raise UserError(f"{e} (the ONNX artifact {path} is complete; retry with 'srexport engines {path}')") from None
    print(path)
    return 0


def _engines_ready(args):
    """--engines: options valid, TensorRT importable and a GPU visible, or one line now."""
    from .export.engines import current_machine, require_polygraphy, require_tensorrt

    options = _engine_options(args)
    trt = require_tensorrt("--engines", instead="build without --engines here (the ONNX artifact needs no "
                                                "TensorRT), and ")
    require_polygraphy("--engines")
    if current_machine(trt).compute_capability is None:
        raise UserError("--engines needs an NVIDIA GPU visible to PyTorch (torch.cuda.is_available() is False); "
                        "build without --engines here and run 'srexport engines ARTIFACT' on the GPU machine")
    return options


def _precision_options(args):
    from .calibration.capture import CalibrationSettings
    from .calibration.precision import PrecisionOptions

    return PrecisionOptions(args.precision, CalibrationSettings(str(args.calib), args.calib_size),
                            method=args.calib_method, target=args.target).validate()


def _pisa_build(args):
    from .export.pisa_recipe import prepare_pisa
    from .models.pisa_reference import PisaSettings
    from .models.sources import PisaSource, demo_pisa_source

    if args.de_net is not None:
        raise UserError("--de-net is for --model s3diff; PiSA-SR has no degradation estimator")
    settings = PisaSettings(args.lambda_pix, args.lambda_sem, args.guidance, args.scale, args.process_size,
                            args.color_fix or "adain", args.size_policy).validate()
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


BUILDS = {"pisa-sr": _pisa_build, "s3diff": _s3diff_build}  # model kind -> (recipe, source, settings) from flags


def cmd_run(args) -> int:
    from .artifact.guidance import resolve
    from .artifact.manifest import check_writable_folder, read_manifest
    from .processing import Processing, check_input_size
    from .runtime.images import check_output_path, list_images, load_image, probe_image, same_file, save_image
    from .runtime.loading import load_pipeline

    _check_threads(args.threads, "--threads")
    folder_run = args.input.is_dir()
    if folder_run:
        inputs = list_images(args.input)
        if not inputs:
            raise UserError(f"{args.input} holds no images ({', '.join(('png', 'jpg', 'tif', 'bmp', 'webp'))})")
        if args.output.exists() and not args.output.is_dir():
            raise UserError(f"{args.output} is a file; for a folder input, -o must be a folder")
        if same_file(args.output, args.input):
            raise UserError(f"-o {args.output} is the input folder; its outputs would replace the photos in it: "
                            "choose another folder")
        jobs = [(p, args.output / (p.stem + ".png")) for p in inputs]
        clash = [p.name for p, out in jobs if sum(o == out for _, o in jobs) > 1]
        if clash:
            raise UserError(f"{', '.join(clash[:3])} would all be written to the same output name; "
                            "rename them or run them separately")
        check_writable_folder(args.output, f"-o {args.output}")
        if args.output.is_dir():
            for _, out in jobs:
                check_output_path(out, args.force)
    else:
        if not args.input.exists():
            raise UserError(f"input {args.input} does not exist")
        output = args.output / (args.input.stem + ".png") if args.output.is_dir() else args.output
        jobs = [(args.input, output)]
        check_output_path(output, args.force)
        check_writable_folder(output.parent, f"-o {output}")
    for _, out in jobs:
        for src, _ in jobs:
            if same_file(out, src):
                raise UserError(f"output {out} is the input {src}; it would be overwritten: choose another -o")
    # Every input is probed (header only) before the models load: a bad file is reported at
    # once, and a folder run goes on with the good ones.
    manifest = read_manifest(args.artifact)
    controls = _controls(args)
    resolve(manifest, controls)  # a bad option is refused before any file is read
    processing = Processing.from_dict(manifest["processing"])
    if args.no_tile or args.untiled_max_mp is not None:
        from .runtime.tiling import check_untiled_inputs

        check_untiled_inputs(manifest, [], args.untiled_max_mp)  # the flag itself, before any file
    failed: list[str] = []

    def probe(src):
        size = probe_image(src)
        check_input_size(*size, processing, name=str(src))
        if args.no_tile:  # a whole-image run above the limit is refused before the models load
            check_untiled_inputs(manifest, [size], args.untiled_max_mp)

    good = []
    for src, out in jobs:
        try:
            probe(src)
            good.append((src, out))
        except UserError as e:
            if not folder_run:
                raise
            failed.append(str(e))
            print(f"srexport: error: {e}", file=sys.stderr)
    written = 0
    if good:
        pipeline = load_pipeline(args.artifact, backend=args.backend, threads=args.threads,
                                 attention=args.attention, arena=args.ort_arena)
        _configure_tiling(pipeline, args)
        pipeline.use_controls(controls)
        if folder_run:
            args.output.mkdir(parents=True, exist_ok=True)
        from tqdm import tqdm

        for src, out in tqdm(good, disable=len(good) == 1 or not folder_run, unit="image", file=sys.stderr):
            try:
                lr = load_image(src)  # the header was fine; the pixels may still be damaged
                if args.verbose:
                    print(f"{src.name}: {describe_tile_plan(pipeline.tile_plan(*lr.shape[-2:]))}", file=sys.stderr)
                with _tile_progress(pipeline, lr, quiet=folder_run):
                    save_image(pipeline(lr), out)
                written += 1
            except UserError as e:
                if not folder_run:
                    raise
                failed.append(str(e))
                print(f"srexport: error: {e}", file=sys.stderr)
    if not folder_run:
        print(jobs[0][1])
        return 0
    print(f"{written} of {len(jobs)} images written to {args.output}")
    if failed:
        print(f"srexport: error: {len(failed)} of {len(jobs)} images failed (listed above); {written} written to "
              f"{args.output}", file=sys.stderr)
        return UserError.exit_code
    return 0


def _check_threads(value: int | None, flag: str) -> None:
    import os

    cores = os.cpu_count() or 1
    if value is not None and not 1 <= value <= cores:
        raise UserError(f"{flag} {value} is out of range; use 1 to {cores} (this machine's cores), or leave it "
                        "out for the library's default")


def _configure_tiling(pipeline, args) -> None:
    """--no-tile, --untiled-max-mp, --vae-norm, --unet-norm, --tile-plan and --grey-output on a loaded pipeline."""
    if args.untiled_max_mp is not None:
        if not args.untiled_max_mp > 0:
            raise UserError(f"--untiled-max-mp {args.untiled_max_mp} must be a positive number of megapixels")
        pipeline.untiled_max_megapixels = args.untiled_max_mp
    if args.no_tile:
        pipeline.tiled = False
    if args.vae_norm is not None:
        pipeline.use_vae_norm(args.vae_norm)
    if args.unet_norm is not None:
        pipeline.use_unet_norm(args.unet_norm)
    if args.tile_plan is not None:
        pipeline.use_tile_plan(args.tile_plan)
    pipeline.grey_output = args.grey_output


def describe_controls(resolved, controls) -> str:
    """``, lambda_pix=0.8, lambda_sem=0.5 (exact)`` for the options a command was given, else empty."""
    if not controls.given():
        return ""
    if resolved.mode is not None:
        return f", lambda_pix={resolved.lambda_pix:g}, lambda_sem={resolved.lambda_sem:g} ({resolved.mode})"
    parts = [f"cfg_scale={resolved.cfg_scale:g}"] if controls.cfg_scale is not None else []
    parts += [f"degradation={resolved.scores[0]:g},{resolved.scores[1]:g}"] if resolved.scores else []
    return ", " + ", ".join(parts)


def describe_tile_plan(plan: dict) -> str:
    """One line from ``SRPipeline.tile_plan``."""
    if not plan:
        return "runs whole (one tile for every stage)"
    stages = ", ".join(f"{s} {p['tiles']} x {p['tile'][0]}x{p['tile'][1]} ({p['area_ratio']:.2f}x its area)"
                       for s, p in plan["stages"].items())
    return (f"{plan['plan']} tile plan: {stages}; work {plan['work_vs_untiled']:.2f}x an untiled pass "
            "(stages weighed by SD 2.1's work per pixel)")


def _tile_progress(pipeline, lr, quiet: bool = False):
    """A tqdm bar over the tiles of one image on stderr (nothing for whole-image runs). Checks
    the untiled limit first, so a refused --no-tile run stops before any work."""
    import contextlib

    if not pipeline.will_tile(*lr.shape[-2:]) or quiet:
        return contextlib.nullcontext()
    from .runtime.tiling import tile_progress_bar

    return tile_progress_bar(pipeline, lr)


def cmd_check(args) -> int:
    import contextlib
    import tempfile
    import time

    from .samples import SAMPLE_NAME, sample_image
    from .calibration.precision import component_output_bounds
    from .checking import check_image, expected_for, failures
    from .artifact.guidance import resolve
    from .artifact.manifest import load_artifact
    from .runtime.images import load_image
    from .runtime.loading import load_pipeline, reference_for
    from .runtime.pipeline import SRPipeline
    from .runtime.runners import ort_runners

    if any(v is not None and v <= 0 for v in (args.max_abs, args.min_psnr, args.max_rel_l2)):
        raise UserError("--max-abs, --max-rel-l2 and --min-psnr must be positive numbers")
    if args.compare_image is not None and (args.compare_image.suffix.lower() != ".png"
                                           or not args.compare_image.absolute().parent.is_dir()):
        raise UserError(f"--compare-image {args.compare_image} must be a .png file in an existing folder")
    artifact = load_artifact(args.artifact)
    controls = _controls(args)
    resolved = resolve(artifact.manifest, controls)  # before the images and the reference load
    images = [(p.name, load_image(p)) for p in args.images] or [(SAMPLE_NAME, sample_image())]
    reference = reference_for(artifact, args.base, args.checkpoint, args.de_net)
    bounds = artifact.manifest["checks"]["bounds"]  # recorded at build, per precision
    precision = artifact.manifest["export"]["precision"]
    max_abs = args.max_abs if args.max_abs is not None else bounds.get("component_max_abs")
    max_rel = args.max_rel_l2 if args.max_rel_l2 is not None else bounds.get("component_rel_l2")
    min_psnr = args.min_psnr if args.min_psnr is not None else bounds["end_to_end_min_psnr"]
    alone = component_output_bounds(bounds)  # fp16/int8: each graph alone converted, by component
    shown = [f"component max_abs <= {max_abs:g}"] if max_abs is not None else []
    shown += [f"component rel_l2 <= {max_rel:g}"] if max_rel is not None else []
    if alone:
        shown.append("output PSNR with each graph alone >= " + (
            f"{next(iter(alone.values())):g} dB" if len(set(alone.values())) == 1
            else ", ".join(f"{c} {b:g}" for c, b in alone.items()) + " dB"))
    guidance = describe_controls(resolved, controls)
    print(f"{artifact.folder}  {precision} graphs, backend={args.backend}{guidance}  bounds: " + ", ".join(shown)
          + f", end-to-end PSNR >= {min_psnr:g} dB (against the fp32 PyTorch reference)")
    start = time.perf_counter()

    def note(message: str) -> None:
        print(f"  [{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)

    # One way's sessions at a time, each without onnxruntime's CPU arena: an arena keeps the
    # largest run it has seen, and check runs every graph on the whole image and on tiles (with
    # arenas, two ways at once: 24 GB on a 217x301 fp16 check, where run needs 7.7 GB).
    def artifact_pipeline() -> SRPipeline:
        if args.backend == "ort":
            pipeline = SRPipeline(artifact.manifest, ort_runners(artifact, arena="off", attention=args.attention))
        else:
            pipeline = load_pipeline(args.artifact, backend=args.backend, reference=reference,
                                     attention=args.attention)
        pipeline.use_controls(controls)
        return pipeline

    ways = {args.backend: artifact_pipeline}
    expected, reports, problems = {}, {}, []
    with contextlib.ExitStack() as stack:
        if precision != "fp32" and args.backend == "ort":
            # onnxruntime's CPU provider computes fp16 regions in fp32: also run the graphs' twins
            # that round every fp16 tensor, as fp16 GPU kernels do (see calibration.fp16)
            from .artifact.manifest import Artifact
            from .calibration.precision import emulated_dir

            twin = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="srexport-fp16-")))
            note("writing the graphs' fp16-rounding twins")
            emulated_dir(artifact.folder, artifact.manifest, twin)
            def rounding_twin() -> SRPipeline:
                # the twins round the portable graphs (emulated_dir writes no fused ones)
                pipeline = SRPipeline(artifact.manifest, ort_runners(Artifact(twin, artifact.manifest), arena="off",
                                                                     attention="plain"))
                pipeline.use_controls(controls)
                return pipeline
            ways["ort, fp16 rounding"] = rounding_twin
        for way, make in ways.items():
            note(f"{way}: loading the graphs")
            pipeline = make()
            for i, (name, lr) in enumerate(images):
                if i not in expected:  # the reference's side, once for every way
                    note(f"{name}: fp32 PyTorch reference, whole image")
                    expected[i] = expected_for(pipeline, reference, lr)
                report = check_image(pipeline, reference, lr, name if len(ways) == 1 else f"{name} [{way}]",
                                     expected[i], note, each_alone=bool(alone))
                reports[i, way] = report
                print(f"{report.name}  ->  {report.output_shape[-1]}x{report.output_shape[-2]}")
                for component, parity in report.components.items():
                    by_itself = (f"  alone: output PSNR {report.alone[component].psnr_db:.2f} dB"
                                 if component in report.alone else "")
                    print(f"  {component:<14} {parity.describe()}{by_itself}")
                print(f"  {'end to end':<14} {report.end_to_end.describe()}  SSIM {report.ssim:.5f}")
                if report.tiled is not None:  # tiled artifacts, images larger than one tile
                    tiles = ", ".join(f"{k} {v}" for k, v in report.tiles.items())
                    print(f"  {'tiled':<14} {report.tiled.describe()}  (vs the tiled reference; tiles: {tiles})")
                    print(f"  {'tiled vs whole':<14} {report.tiled_vs_whole.describe()}  (the references: what "
                          "tiling changes; not bounded)")
                problems += failures(report, max_abs, min_psnr, max_rel, alone)
            del pipeline  # its sessions, before the next way's
    reports = [reports[i, way] for i in range(len(images)) for way in ways]  # image by image, as before
    if args.json:
        args.json.write_text(json.dumps({"backend": args.backend, "precision": precision, "max_abs": max_abs,
                                         "max_rel_l2": max_rel, "min_output_psnr": alone or None,
                                         "min_psnr": min_psnr, "images": [r.to_dict() for r in reports],
                                         "failures": problems}, indent=2))
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
    """Shows a damaged artifact too (missing or modified files are listed, not refused): that
    is how one is diagnosed. Exit status 1 when files are damaged."""
    from .artifact.manifest import SCHEMA_FILE, file_problems, load_artifact
    from .describe import describe_manifest

    if args.schema:
        print(SCHEMA_FILE.read_text(), end="")
        return 0
    if args.artifact is None:
        raise UserError("inspect needs an ARTIFACT folder (or --schema for the manifest's JSON Schema)")
    artifact = load_artifact(args.artifact, verify=False)
    print(json.dumps(artifact.manifest, indent=2) if args.json else describe_manifest(artifact))
    problems = file_problems(artifact.folder, artifact.manifest)
    for problem in problems:
        print(f"srexport: damaged: {problem}", file=sys.stderr)
    if problems:
        print(f"srexport: error: {len(problems)} of {len(artifact.manifest['files'])} files of {artifact.folder} are "
              "damaged (listed above); rebuild the artifact or restore them", file=sys.stderr)
        return EXIT_PARITY_FAILED
    return 0


def cmd_bench(args) -> int:
    from .bench import BenchConfig, format_report, parse_min_psnr, parse_sizes, run_bench

    _check_threads(args.threads, "--threads")
    _check_threads(args.torch_threads, "--torch-threads")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not path.absolute().parent.is_dir():
            raise UserError(f"the folder of {flag} {path} does not exist; create it first")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise UserError(f"--plot {args.plot} must end in .png")
    config = BenchConfig(
        backends=[b.strip() for b in args.backends.split(",") if b.strip()], sizes=parse_sizes(args.sizes),
        iters=args.iters, warmup=args.warmup, inputs=args.inputs, device=args.device, threads=args.threads,
        torch_threads=args.torch_threads,
        seed=args.seed, timer=args.timer, compile=not args.no_compile,
        min_psnr=parse_min_psnr(args.min_psnr) if args.min_psnr else {}, max_abs=args.max_abs, gpu=args.gpu,
        peak_tflops=args.peak_tflops, peak_gbps=args.peak_gbps, base=args.base, checkpoint=args.checkpoint,
        de_net=args.de_net, controls=_controls(args)).validate()
    report = run_bench(args.artifact, config)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(args.json)
    if args.plot:
        from .plots import plot_bench

        print(plot_bench(report, args.plot))
    return 0 if report["passed"] else EXIT_PARITY_FAILED


def cmd_triton(args) -> int:
    from .serving.repository import write_repository

    if args.threads is not None:
        _check_threads(args.threads, "--threads")
    out = write_repository(args.artifact, args.out, args.backend, args.components, args.instances,
                           args.component_instances, args.max_batch_size, args.threads, args.max_output_mp,
                           args.force)
    print(out)
    return 0


def cmd_serve(args) -> int:
    import time

    from .serving.launcher import TritonServer, check_repository

    check_repository(args.repository)
    server = TritonServer(args.repository, args.host, args.http_port, args.grpc_port, args.metrics_port,
                          log_file=args.log)
    print(f"starting tritonserver on {args.repository} ...", file=sys.stderr, flush=True)
    with server:
        try:  # once ready, Ctrl-C is the way to stop it: exit 0
            for name, url in server.endpoints.items():
                print(f"{name:<8} {url}", flush=True)
            print("ready; Ctrl-C stops it", file=sys.stderr, flush=True)
            while server.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt as e:
            if type(e) is not KeyboardInterrupt:  # SIGTERM: main reports it
                raise
            print("stopping tritonserver", file=sys.stderr, flush=True)
            return 0
        raise UserError(f"tritonserver exited with status {server.process.returncode}; pass --log FILE to see why")


COMMANDS = {"build": cmd_build, "run": cmd_run, "check": cmd_check, "bench": cmd_bench, "inspect": cmd_inspect,
            "engines": cmd_engines, "triton": cmd_triton, "serve": cmd_serve}


# What an interrupted command leaves: every write is atomic (a temporary name, then a rename).
INTERRUPTED = {"build": "nothing was written", "engines": "the artifact is as it was", "triton": "nothing was written",
               "serve": "tritonserver was stopped",
               "run": "images finished before it are complete; nothing half-written was left"}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager, ``kill``): unwinds like Ctrl-C, so temporary files go."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal

    args = _build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"srexport: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(f"srexport: {'terminated' if terminated else 'interrupted'}; "
              f"{INTERRUPTED.get(args.command, 'nothing was written')}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
