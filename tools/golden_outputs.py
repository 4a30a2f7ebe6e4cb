"""Golden outputs of the demo models, for refactors that must not change behaviour.

Builds the demo artifacts (PiSA-SR merged and exact, fp32/fp16/int8, per-tile and two-pass VAE;
S3Diff dynamic and fixed), then records, per artifact and backend (ort, torch):
- the sha256 of the PNG that ``srexport run`` writes for two fixed images, tiled and untiled;
- the sha256 of every graph's outputs (float32 bytes) on the spec's seeded sample inputs.

    python tools/golden_outputs.py --out /tmp/golden-before            # writes golden.json there
    python tools/golden_outputs.py --out /tmp/golden-after --compare /tmp/golden-before/golden.json

``--compare`` lists every entry that differs and exits 1 if any does. Not a test: it builds nine
artifacts (about 10 minutes on a 2-core CPU). The suite keeps the small cases
(tests/test_golden.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

# name -> build flags (all with --process-size 128 where the model takes it, as the tests do)
ARTIFACTS = {
    "pisa-merged-fp32": ["--precision", "fp32", "--process-size", "128"],
    "pisa-exact-fp32": ["--precision", "fp32", "--process-size", "128", "--guidance", "exact",
                        "--lambda-pix", "0.8", "--lambda-sem", "0.5"],
    "pisa-merged-fp16": ["--process-size", "128"],
    "pisa-merged-int8": ["--precision", "int8", "--process-size", "128", "--calib-size", "8"],
    "pisa-two-pass-fp32": ["--precision", "fp32", "--process-size", "128", "--vae-norm", "two-pass",
                           "--tile", "64", "--tile-overlap", "16", "--vae-tile", "128", "--vae-tile-overlap", "32"],
    "pisa-small-tiles-fp32": ["--precision", "fp32", "--process-size", "128", "--tile", "64", "--tile-overlap",
                              "16", "--vae-tile", "64", "--vae-tile-overlap", "16"],
    "s3diff-dynamic-fp16": ["--model", "s3diff"],
    "s3diff-fixed-fp32": ["--model", "s3diff", "--precision", "fp32", "--degradation", "0.3,0.1",
                          "--tile", "64", "--tile-overlap", "16", "--vae-tile", "64", "--vae-tile-overlap", "16"],
}
IMAGES = {"crop-37x45": (8, 45, 4, 41), "crop-24x32": (8, 32, 4, 36)}  # (top, bottom, left, right) of the sample
BACKENDS = ("ort", "torch")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def graph_outputs(artifact: Path) -> dict[str, str]:
    """sha256 of each graph's outputs on its spec's seeded sample inputs (onnxruntime)."""
    from srexport.artifact.manifest import load_artifact
    from srexport.artifact.specs import Geometry
    from srexport.runtime.runners import ort_runners

    art = load_artifact(artifact)
    out = {}
    for name, runner in ort_runners(art).items():
        feeds = runner.spec.sample_inputs(Geometry(batch=1, height=64, width=96), seed=7)
        for tensor_name, value in sorted(runner(feeds).items()):
            out[f"{name}.{tensor_name}"] = sha256(value.float().contiguous().numpy().tobytes())
    return out


def capture(out: Path) -> dict:
    from PIL import Image

    from srexport.cli import main
    from srexport.samples import sample_image
    from srexport.runtime.images import tensor_to_pil

    out.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, (top, bottom, left, right) in IMAGES.items():
        path = out / f"{name}.png"
        tensor_to_pil(sample_image()[..., top:bottom, left:right]).save(path)
        images[name] = path
    golden = {}
    for name, flags in ARTIFACTS.items():
        t = time.perf_counter()
        artifact = out / name
        if not (artifact / "manifest.json").is_file():
            if main(["build", *flags, "--out", str(artifact), "--quiet"]) != 0:
                raise SystemExit(f"build {name} failed")
        entry = {"graphs": graph_outputs(artifact)}
        for backend in BACKENDS:
            for image_name, image in images.items():
                for tiled in (True, False):
                    result = out / f"{name}-{backend}-{image_name}-{'tiled' if tiled else 'whole'}.png"
                    argv = ["run", str(artifact), str(image), "-o", str(result), "--backend", backend, "--force"]
                    if main(argv + ([] if tiled else ["--no-tile"])) != 0:
                        raise SystemExit(f"run {result.name} failed")
                    with Image.open(result) as im:
                        size = im.size
                    entry[result.stem] = {"png_sha256": sha256(result.read_bytes()), "size": list(size)}
        golden[name] = entry
        print(f"{name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    (out / "golden.json").write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    return golden


def differences(old: dict, new: dict) -> list[str]:
    keys = sorted({(a, k) for a in old for k in old[a]} | {(a, k) for a in new for k in new[a]})
    return [f"{a} {k}: {old.get(a, {}).get(k)} != {new.get(a, {}).get(k)}" for a, k in keys
            if old.get(a, {}).get(k) != new.get(a, {}).get(k)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the artifacts, images and golden.json")
    parser.add_argument("--compare", type=Path, help="an earlier golden.json to compare with")
    args = parser.parse_args()
    golden = capture(args.out)
    if args.compare is None:
        print(args.out / "golden.json")
        return 0
    diff = differences(json.loads(args.compare.read_text()), golden)
    for line in diff:
        print(line)
    print(f"{len(diff)} difference(s) from {args.compare}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
