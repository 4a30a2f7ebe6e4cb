"""Build time and peak memory of `srexport build` on a full-size SD 2.1-shaped PiSA-SR.

Weights are seeded random numbers (time and memory do not depend on them):
a diffusers folder with SD 2.1-base's exact configs and a rank-4 pisa_sr.pkl
in the upstream format are written to a scratch folder, then the real CLI
builds them under /usr/bin/time. Writes benchmarks/results/build_full_size_<host>.json.

    python benchmarks/build_full_size.py [--scratch DIR] [--guidance merged|exact]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    import psutil

    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version()}


def write_sources(scratch: Path) -> tuple[Path, Path]:
    from srexport.models.base import build_base, write_base
    from srexport.models.pisa import make_demo_checkpoint, save_checkpoint

    base_dir, ckpt = scratch / "sd21-random", scratch / "pisa_sr.pkl"
    if not (scratch / "complete").exists():
        t = time.perf_counter()
        base = build_base("sd21", seed=0)
        write_base(base, base_dir)
        save_checkpoint(make_demo_checkpoint(base.unet, rank=4, seed=0), ckpt)
        (scratch / "complete").write_text("ok")
        print(f"wrote SD 2.1-shaped random base + checkpoint in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return base_dir, ckpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/srexport-full-size"))
    ap.add_argument("--guidance", default="merged", choices=["merged", "exact"])
    args = ap.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    base_dir, ckpt = write_sources(args.scratch)
    out = args.scratch / f"artifact-{args.guidance}"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "srexport.cli", "build", "--base", str(base_dir),
           "--checkpoint", str(ckpt), "--scale", "4", "--guidance", args.guidance, "--out", str(out), "--force"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    sys.stderr.write(proc.stderr)
    if proc.returncode:
        raise SystemExit(f"build failed with status {proc.returncode}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    manifest = json.loads((out / "manifest.json").read_text())
    result = {
        "benchmark": "srexport build, full-size SD 2.1-shaped PiSA-SR (random weights)",
        "machine": machine(),
        "guidance": args.guidance,
        "build_seconds": round(seconds, 1),
        "peak_rss_gib": round(peak_kib / 2**20, 2),
        "files_mib": {f["path"]: round(f["bytes"] / 2**20, 1) for f in manifest["files"].values()},
        "checks": manifest["checks"],
        "versions": manifest["versions"],
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"build_full_size_{args.guidance}_cpu{os.cpu_count()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({k: result[k] for k in ("build_seconds", "peak_rss_gib", "files_mib")}, indent=2))
    print(path)


if __name__ == "__main__":
    main()
