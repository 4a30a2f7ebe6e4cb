"""`srexport bench` on full-size SD 2.1-shaped PiSA-SR and S3Diff (random weights).

Latency does not depend on the weights, so a diffusers folder with SD 2.1's
exact configs and upstream-format checkpoints of seeded random numbers (as in
build_full_size.py) stand in for the real files. The script writes them to a
scratch folder once, builds the artifact once with the real CLI (PiSA-SR: ~10
min and ~18 GB RAM on a 2-core machine), then runs the real `srexport bench`,
which writes JSON and PNG into benchmarks/results/ with the machine described:

    python benchmarks/bench_full_size.py --model pisa-sr                  # CPU defaults: LR 128 (512x512 out)
    python benchmarks/bench_full_size.py --model s3diff
    python benchmarks/bench_full_size.py --model pisa-sr --backends torch,ort-cuda,trt --sizes 128,256,512 --iters 50

On CPU the defaults are small (3 timed runs after 1 warm-up, 2 inputs): one
512x512 output takes tens of seconds. benchmarks/summarise.py puts every
result into the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def pisa_sources(scratch: Path) -> list[str]:
    sys.path.insert(0, str(HERE))
    from build_full_size import write_sources  # the same SD 2.1-shaped base + rank-4 pisa_sr.pkl

    base_dir, ckpt = write_sources(scratch)
    return ["--model", "pisa-sr", "--base", str(base_dir), "--checkpoint", str(ckpt)]


def s3diff_sources(scratch: Path) -> list[str]:
    """SD-Turbo has SD 2.1's architecture: the same random base, plus an s3diff.pkl with upstream's
    ranks (UNet 32, VAE 16) on the full-size layers and a default-width de_net.pth."""
    import torch

    from srexport.models.base import build_base, write_base
    from srexport.models.s3diff import demo

    folder = scratch / "s3diff"
    base_dir, ckpt, de_net = folder / "sd-turbo-random", folder / "s3diff.pkl", folder / "de_net.pth"
    if not (folder / "complete").exists():
        t = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        write_base(build_base("sd21", seed=0), base_dir)
        torch.save(demo.build_demo_checkpoint(seed=0, arch="sd21"), ckpt)
        torch.save(demo.build_demo_de_net(seed=0).state_dict(), de_net)
        (folder / "complete").write_text("ok")
        print(f"wrote SD-Turbo-shaped random base + s3diff.pkl + de_net.pth in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)
    return ["--model", "s3diff", "--base", str(base_dir), "--checkpoint", str(ckpt), "--de-net", str(de_net)]


def device_tag(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return f"cpu{os.cpu_count()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["pisa-sr", "s3diff"], default="pisa-sr")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/srexport-full-size"))
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (where the torch baseline runs)")
    ap.add_argument("--backends", default=None, help="default: torch,ort on CPU; torch,ort-cuda,trt on a GPU")
    ap.add_argument("--sizes", default=None, help="LR sizes (default: 128 on CPU, 128,256,512 on a GPU)")
    ap.add_argument("--iters", type=int, default=None, help="default: 3 on CPU, 50 on a GPU")
    ap.add_argument("--warmup", type=int, default=None, help="default: 1 on CPU, 5 on a GPU")
    ap.add_argument("--inputs", type=int, default=None, help="default: 2 on CPU, 3 on a GPU")
    ap.add_argument("--precision", default=None,
                    help="graphs to build: default fp32 on CPU (onnxruntime CPU has no fp16 Conv/MatMul kernels, "
                         "and the torch baseline is fp32 there), fp16 on a GPU")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the artifact even if it exists")
    ap.add_argument("--build-only", action="store_true",
                    help="write the sources and build the artifact, then stop (bench later on a quiet machine)")
    args = ap.parse_args()

    import torch

    gpu = args.device != "cpu" and torch.cuda.is_available()
    backends = args.backends or ("torch,ort-cuda,trt" if gpu else "torch,ort")
    sizes = args.sizes or ("128,256,512" if gpu else "128")
    iters = args.iters or (50 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    inputs = args.inputs or (3 if gpu else 2)
    precision = args.precision or ("fp16" if gpu else "fp32")

    args.scratch.mkdir(parents=True, exist_ok=True)
    sources = (pisa_sources if args.model == "pisa-sr" else s3diff_sources)(args.scratch)
    artifact = args.scratch / f"artifact-{args.model}-{precision}"
    if args.rebuild or not (artifact / "manifest.json").is_file():
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "srexport.cli", "build", *sources, "--scale", "4", "--precision", precision,
               "--out", str(artifact), "--force"]
        if subprocess.run(cmd).returncode:
            raise SystemExit("build failed")
        print(f"built {artifact} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if args.build_only:
        return

    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"bench_full_size_{args.model}_{device_tag(args.device)}"
    cmd = [sys.executable, "-m", "srexport.cli", "bench", str(artifact), "--backends", backends, "--sizes", sizes,
           "--iters", str(iters), "--warmup", str(warmup), "--inputs", str(inputs), "--device", args.device,
           "--json", f"{stem}.json", "--plot", f"{stem}.png"]
    status = subprocess.run(cmd).returncode
    print(f"{stem}.json\n{stem}.png")
    sys.exit(status)


if __name__ == "__main__":
    main()
