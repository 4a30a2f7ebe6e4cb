"""The README's precision table: fp16 and int8 error against the fp32 reference on the held-out photos.

    python benchmarks/precision_table.py [--artifact FP32_ARTIFACT] [--calib-size 32] [--held-out-lr 64]
        [--json out.json]

Converts an fp32 artifact (built here from the built-in demo at --process-size 128 when none is
given) to fp16 and int8 with the same code ``srexport build --precision`` runs, measures each
against the fp32 PyTorch reference on the held-out photos only (scikit-image's, never used for
calibration or training), and prints a Markdown table: per-component relative L2 error (worst
image) and end-to-end PSNR / SSIM (mean and worst), both as onnxruntime CPU computes the graphs
and with every fp16 tensor rounded (the GPU-like number).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


class _Print:
    def __call__(self, message):
        print(message, file=sys.stderr, flush=True)

    note = __call__


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, help="an fp32 artifact (default: build the demo into a temp folder)")
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--lr-tile", type=int, default=None, help="calibration tile side (default: as build)")
    p.add_argument("--held-out-lr", type=int, default=64)
    p.add_argument("--method", default="minmax")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    from srexport.calibration.capture import CalibrationSettings, held_out_inputs
    from srexport.calibration.precision import PrecisionOptions, convert_graphs, emulated_dir, measure, runners_for
    from srexport.cli import main as cli
    from srexport.artifact.manifest import load_artifact, read_manifest
    from srexport.runtime.loading import reference_for
    from srexport.runtime.pipeline import SRPipeline

    work = Path(tempfile.mkdtemp(prefix="srexport-precision-"))
    try:
        fp32 = args.artifact
        if fp32 is None:
            fp32 = work / "fp32"
            assert cli(["build", "--process-size", "128", "--precision", "fp32", "--out", str(fp32), "--quiet"]) == 0
        art = load_artifact(fp32)
        assert art.manifest["export"]["precision"] == "fp32", "pass an fp32 artifact"
        reference = reference_for(art)
        images = held_out_inputs(art.manifest["processing"]["scale"], args.held_out_lr)
        rows, raw = [], {}
        for precision in ("fp16", "int8"):
            folder = work / precision
            shutil.copytree(fp32, folder)
            manifest = read_manifest(folder)
            options = PrecisionOptions(precision, CalibrationSettings(size=args.calib_size, lr_tile=args.lr_tile),
                                       method=args.method).validate()
            t = time.perf_counter()
            record = convert_graphs(folder, manifest, reference, options, _Print())
            twin = emulated_dir(folder, manifest, work / f"{precision}-twin")
            result = measure({"onnxruntime CPU": SRPipeline(manifest, runners_for(folder, manifest), tiled=False),
                              "fp16 rounding": SRPipeline(manifest, runners_for(twin, manifest), tiled=False)},
                             reference, images)
            raw[precision] = {"record": record, "result": result, "seconds": time.perf_counter() - t}
            calib = record.get("calibration") or {}
            for way, r in result.items():
                e = r["end_to_end"]
                rows.append([precision, way] + [f"{r['components'][c]['rel_l2']:.2e}" for c in art.components]
                            + [f"{e['mean_psnr_db']:.1f} / {e['min_psnr_db']:.1f}",
                               f"{e['mean_ssim']:.4f} / {e['min_ssim']:.4f}",
                               f"{calib.get('size', '-')} x {calib.get('lr_tile', '-')}px"])
        header = (["precision", "computed as"] + [f"{c} rel L2" for c in art.components]
                  + ["PSNR dB mean / worst", "SSIM mean / worst", "calibration tiles (LR)"])
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print(f"\nHeld-out photos: {', '.join(n for n, _ in images)}; model: "
              f"{art.manifest['model']['kind']} {'demo ' + str(art.manifest['model']['source'].get('demo_weights', '')) if art.manifest['model'].get('demo') else ''}")
        if args.json:
            args.json.write_text(json.dumps(raw, indent=2, default=str) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
