"""Peak memory and time of ``srexport run``: the portable graphs with per-session arenas (the old
runtime) against fused attention with one shared arena (the new default), side by side.

Each case is one ``srexport run`` in its own process under ``/usr/bin/time -v`` (peak RSS is the
process's maximum resident set; onnxruntime's arenas never shrink, so no two settings share a
process), old and new alternated per case. The inputs are the packaged sample LR photo resized
(bicubic) to each LR size; x4 outputs of 1536 and 4096 px tiled, and whole-image runs
(``--no-tile``) up to the new untiled limit. At 1536 px tiled all four combinations run, to
attribute the gain to the fusion and to the shared arena.

Writes benchmarks/results/attention_memory_cpu<cores>.json and .png.

    python benchmarks/attention_memory.py --artifact DIR   # a demo artifact built with fused attention
    python benchmarks/attention_memory.py                  # builds the default (fp16) demo into --scratch
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
OLD = {"attention": "plain", "arena": "session"}
NEW = {"attention": "fused", "arena": "shared"}
# (LR side, whole image?, settings to run): x4 outputs.
CASES = [
    (384, False, [OLD, NEW, {"attention": "fused", "arena": "session"}, {"attention": "plain", "arena": "shared"}]),
    (1024, False, [OLD, NEW]),
    (256, True, [OLD, NEW]),   # 1024 px whole image: within the old untiled limit (2.1 MP)
    (384, True, [NEW]),        # 1536 px: above the old limit (its scores alone 5.3 GiB fp32, x3 with softmax/casts)
    (512, True, [NEW]),        # 2048 px: the new limit (4.2 MP)
]


def label(settings: dict) -> str:
    return f"{settings['attention']} attention, {settings['arena']} arena"


def run_case(artifact: Path, image: Path, out: Path, settings: dict, whole: bool) -> dict:
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "srexport.cli", "run", str(artifact), str(image),
               "-o", str(out), "--force", "--attention", settings["attention"], "--ort-arena", settings["arena"]]
    if whole:
        command += ["--no-tile", "--untiled-max-mp", "100"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak_kib = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    record = {"settings": settings, "whole_image": whole, "returncode": done.returncode, "wall_s": round(wall, 2),
              "peak_rss_gb": round(int(peak_kib.group(1)) * 1024 / 1e9, 3) if peak_kib else None}
    if done.returncode:
        record["error"] = done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "no output"
    return record


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["peak_rss_gb"] is not None and not r["returncode"]]
    names = [f"{r['output_px']}px {'whole' if r['whole_image'] else 'tiled'}\n{label(r['settings'])}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 1.5), sharey=True)
    colours = ["tab:red" if r["settings"] == OLD else "tab:green" if r["settings"] == NEW else "tab:gray" for r in rows]
    for ax, key, title in ((axes[0], "peak_rss_gb", "peak RSS (GB)"), (axes[1], "wall_s", "wall time (s)")):
        ax.barh(range(len(rows)), [r[key] for r in rows], color=colours)
        for i, r in enumerate(rows):
            ax.text(r[key], i, f" {r[key]:g}", va="center", fontsize=8)
        ax.set_title(title)
    axes[0].set_yticks(range(len(rows)), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("srexport run on the demo: red old (plain attention, per-session arenas), green new (fused, shared)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def default_artifact(scratch: Path) -> Path:
    artifact = scratch / "demo-default"
    if not (artifact / "manifest.json").exists():
        print(f"building the default demo artifact into {artifact}", flush=True)
        subprocess.run([sys.executable, "-m", "srexport.cli", "build", "--scale", "4", "--out", str(artifact),
                        "--force", "--quiet"], check=True)
    return artifact


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="a demo artifact with fused graphs (default: build one)")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "srexport-attention-memory")
    args = parser.parse_args()
    from PIL import Image

    from srexport.artifact.manifest import load_artifact

    args.scratch.mkdir(parents=True, exist_ok=True)
    artifact = args.artifact or default_artifact(args.scratch)
    manifest = load_artifact(artifact).manifest
    if "attention_fusion" not in manifest["checks"]:
        raise SystemExit(f"{artifact} has no fused attention graphs; rebuild it with this srexport")
    photo = Image.open(Path(__file__).parents[1] / "src" / "srexport" / "assets" / "sample_lr.png").convert("RGB")
    results = []
    for lr, whole, settings_list in CASES:
        image = args.scratch / f"lr{lr}.png"
        photo.resize((lr, lr), Image.BICUBIC).save(image)
        for settings in settings_list:
            record = run_case(artifact, image, args.scratch / "out.png", settings, whole)
            record.update(lr_px=lr, output_px=lr * 4)
            results.append(record)
            print(f"{lr * 4:>5} px {'whole' if whole else 'tiled'}  {label(settings):34s}  "
                  f"{record['peak_rss_gb']} GB  {record['wall_s']} s" + (f"  FAILED: {record['error']}"
                                                                        if record["returncode"] else ""), flush=True)
    ratios = {}
    for lr, whole, _ in CASES:
        old = next((r for r in results if r["lr_px"] == lr and r["whole_image"] == whole and r["settings"] == OLD
                    and not r["returncode"]), None)
        new = next((r for r in results if r["lr_px"] == lr and r["whole_image"] == whole and r["settings"] == NEW
                    and not r["returncode"]), None)
        if old and new:
            ratios[f"{lr * 4}px {'whole' if whole else 'tiled'}"] = {
                "peak_rss_old_over_new": round(old["peak_rss_gb"] / new["peak_rss_gb"], 2),
                "time_old_over_new": round(old["wall_s"] / new["wall_s"], 2)}
    cores = os.cpu_count()
    report = {"benchmark": "attention_memory", "date": time.strftime("%Y-%m-%d"), "cores": cores,
              "cpu": platform.processor() or platform.machine(), "artifact_precision": manifest["export"]["precision"],
              "old": OLD, "new": NEW, "results": results, "ratios": ratios,
              "note": "wall time is the whole command (start-up, model load, PNG write); one run per case"}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"attention_memory_cpu{cores}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, stem.with_suffix(".png"))
    print(json.dumps(ratios, indent=2))
    print(f"wrote {stem.with_suffix('.json')} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
