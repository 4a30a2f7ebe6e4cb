"""Every GPU path in one command of at most 8 minutes on an H100/H200 (issue 16).

On the GPU machine (PyTorch 2.11 CUDA 13, CPU onnxruntime, no diffusers; a copy of the working
tree, files back from $OUT), in this order:

1. install: joins the onnxruntime-gpu wheel from its parts in benchmarks/gpu_wheels/, checks its
   sha256 against benchmarks/gpu_wheels.json and pip-installs it with the pure-Python wheels the
   machine lacks (diffusers, onnxconverter-common, onnxslim, jsonschema and its needs) into
   SCRATCH/site; srexport itself runs from src/ (PYTHONPATH).
2. probe: the CUDA device, the versions, and a tiny graph on onnxruntime's CUDA provider.
3. tests: the tests that skip without CUDA, by node id (or `-m gpu` once a gpu marker is
   registered), junit XML to --out. They run in the background during 4 and 5, which use the CPU.
4. sources: the full SD 2.1-shaped base and a rank-4 pisa_sr.pkl of seeded random weights
   (build_full_size.write_sources), reused while the machine stays warm.
5. build: `srexport build --precision fp16` of the full-size PiSA-SR artifact.
6. bench-lr128, bench-lr256: `srexport bench --backends torch,torch-compile,ort-cuda,ort-cuda-plain` with
   parity against the PyTorch fp32 reference, JSON and PNG to --out.

A summary (steps, status, seconds, device, versions) is written to --out after every step, with
the combined log. A step starts only if the 8-minute budget leaves it its least useful time, and
is stopped at the budget: what is skipped is recorded with the reason.

    python benchmarks/gpu_check.py --prepare          # here: download the wheels, write the parts + manifest
    python benchmarks/gpu_check.py --dry-run          # here: plan every step, run the CPU checks (~5 s)
    python3 benchmarks/gpu_check.py --check-parts     # GPU machine, while the parts arrive (one line)
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py  # GPU machine: everything, results in $OUT

benchmarks/README.md "GPU check" gives the device calls (the parts travel over consecutive calls).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WHEELS = HERE / "gpu_wheels"  # ignored: the parts and the Python wheels travel by `carry`
MANIFEST = HERE / "gpu_wheels.json"  # committed: what the joined wheel must hash to
SCRATCH = Path("/tmp/srexport-full-size")  # bench_full_size.py's: the random sources are shared
DEFAULT_OUT = HERE / "gpu_check_out"  # ignored; $OUT wins where it is set

BUDGET_S = 480.0  # issue 16: one device command of at most 8 minutes
RESERVE_S = 8.0  # kept back for the summary at the end
CARRY_LIMIT = 64 * 2**20  # the device tool's working tree + carried paths, per call
DEFAULT_PART_MIB = 50  # 50 MiB parts + this ~12 MiB tree fit one call each: 5 calls for 244 MiB

ORT_GPU = "onnxruntime-gpu==1.31.1"  # PyPI's build is for CUDA 13 (libcudart.so.13)
# What pyproject.toml needs that the GPU machine's image lacks (device KINDS.md's package list):
# the versions this repo is developed with. rpds-py is compiled, hence the platform tags below.
PY_WHEELS = ("diffusers==0.42.1", "onnxconverter-common==1.16.0", "onnxslim==0.1.98", "jsonschema==4.26.0",
             "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==2026.9.1")
PY_IMPORTS = ("diffusers", "onnxconverter_common", "onnxslim", "jsonschema")
PIP_TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
              "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
              "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]

# The tests that skip without CUDA (no gpu marker is registered yet: pyproject.toml, conftest.py).
# The TensorRT one skips there too (no TensorRT on the GPU machine): its junit entry says why.
GPU_TESTS = ("tests/test_bench.py::test_cuda_event_timer_on_a_stream",
             "tests/test_engines.py::test_ort_cuda_matches_onnxruntime_cpu",
             "tests/test_engines.py::test_real_engines_build_load_and_match_onnxruntime")

EXPECTED_SKIPS = ("::test_real_engines_build_load_and_match_onnxruntime",)  # junit case names end so

# ort-cuda-plain: the portable graphs beside the fused-attention twins, to measure what the fusion gives
BACKENDS = "torch,torch-compile,ort-cuda,ort-cuda-plain"
SIZES = (128, 256)  # LR: 512x512 and 1024x1024 outputs

# The full-size sources come from the existing builder; this runs it in a child process so its
# ~5 GB of weights leave memory before the build loads them back.
SOURCES_CODE = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
                "from build_full_size import write_sources; print(*write_sources(Path(sys.argv[2])))")

PROBE_CODE = r"""
import importlib.metadata as md, json, sys
import numpy as np
import torch  # first: onnxruntime-gpu then finds the CUDA libraries torch loaded
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name(0), "cuda_capability": list(torch.cuda.get_device_capability(0))}
for dist in ("onnxruntime-gpu", "onnxruntime", "onnx", "diffusers", "transformers", "peft", "onnxconverter-common",
             "onnxslim", "jsonschema", "numpy", "triton"):
    try:
        info[dist] = md.version(dist)
    except md.PackageNotFoundError:
        info[dist] = None
import onnx, onnxruntime as ort
from onnx import TensorProto, helper
graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
info["onnxruntime_module"] = ort.__file__
info["providers_available"] = ort.get_available_providers()
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
info["providers_used"] = session.get_providers()
y = session.run(None, {"x": np.ones((2, 2), np.float32)})[0]
info["ort_cuda_ok"] = info["providers_used"][0] == "CUDAExecutionProvider" and bool((y == 2).all())
print(json.dumps(info))
sys.exit(0 if info["ort_cuda_ok"] else 1)
"""


class CheckError(Exception):
    """A refusal the user can act on: printed as one line, no traceback."""


# ---- wheel parts --------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def part_names(wheel_name: str, count: int) -> list[str]:
    return [f"{wheel_name}.part{i}" for i in range(count)]


def split_wheel(wheel: Path, folder: Path, part_bytes: int, manifest_path: Path) -> dict:
    """Cut the wheel into parts of part_bytes in folder and write the manifest; returns it."""
    if not wheel.is_file():
        raise CheckError(f"--split-wheel {wheel}: no such file")
    if part_bytes < 1:
        raise CheckError("--part-mib must be positive")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{wheel.name}.part*"):  # an earlier split with another part size
        stale.unlink()
    size = wheel.stat().st_size
    count = max(1, -(-size // part_bytes))
    parts = []
    with open(wheel, "rb") as src:
        for name in part_names(wheel.name, count):
            data = src.read(part_bytes)
            (folder / name).write_bytes(data)
            parts.append({"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"wheel": {"name": wheel.name, "bytes": size, "sha256": sha256_of(wheel), "requirement": ORT_GPU},
                "part_bytes": part_bytes, "parts": parts,
                "python_wheels": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_of(p)}
                                  for p in sorted((folder / "py").glob("*.whl"))]}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
        if not (manifest["wheel"]["sha256"] and manifest["parts"][0]["name"]):  # the fields used below
            raise ValueError("empty wheel sha256 or part name")
    except FileNotFoundError:
        raise CheckError(f"no wheel manifest at {path}: prepare the parts here with "
                         "'python benchmarks/gpu_check.py --prepare' (or --split-wheel PATH)") from None
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise CheckError(f"{path} is not a gpu_check wheel manifest ({type(exc).__name__}: {exc})") from None
    return manifest


def part_states(manifest: dict, folder: Path) -> dict[str, str]:
    """Each part's state here: 'ok', 'missing', or why it is corrupt."""
    states = {}
    for part in manifest["parts"]:
        path = folder / part["name"]
        if not path.is_file():
            states[part["name"]] = "missing"
        elif path.stat().st_size != part["bytes"]:
            states[part["name"]] = f"{path.stat().st_size} bytes, not {part['bytes']}"
        elif sha256_of(path) != part["sha256"]:
            states[part["name"]] = "sha256 differs from the manifest"
        else:
            states[part["name"]] = "ok"
    return states


def require_parts(manifest: dict, folder: Path) -> None:
    """One-line CheckError unless every part is here and intact."""
    states = part_states(manifest, folder)
    corrupt = {n: s for n, s in states.items() if s not in ("ok", "missing")}
    if corrupt:
        name, why = next(iter(corrupt.items()))
        raise CheckError(f"wheel part {folder / name} is corrupt ({why}): split the wheel again here "
                         "(--split-wheel) and carry that part again")
    missing = [n for n, s in states.items() if s == "missing"]
    if missing:
        raise CheckError(f"{len(missing)} of {len(states)} onnxruntime-gpu wheel parts missing in {folder}: "
                         f"{', '.join(missing)} (carry them in consecutive device calls; they stay only while "
                         "the machine is warm)")


def join_parts(manifest: dict, folder: Path, dest_dir: Path) -> Path:
    """The wheel rebuilt from its parts in dest_dir, its sha256 checked; one-line CheckError if not."""
    require_parts(manifest, folder)
    dest_dir.mkdir(parents=True, exist_ok=True)
    wheel = dest_dir / manifest["wheel"]["name"]
    digest = hashlib.sha256()
    with open(wheel, "wb") as out:
        for part in manifest["parts"]:
            data = (folder / part["name"]).read_bytes()
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != manifest["wheel"]["sha256"]:
        wheel.unlink()
        raise CheckError(f"the joined {wheel.name} has sha256 {digest.hexdigest()[:16]}..., the manifest says "
                         f"{manifest['wheel']['sha256'][:16]}...: split the wheel again here and carry every part")
    return wheel


def python_wheels(manifest: dict, folder: Path) -> list[Path]:
    """The manifest's pure-Python wheels in folder/py, each hash checked; one-line CheckError if not."""
    paths = []
    for entry in manifest.get("python_wheels", []):
        path = folder / "py" / entry["name"]
        if not path.is_file():
            raise CheckError(f"Python wheel {path} missing: carry the folder {folder / 'py'} (--prepare writes it)")
        if sha256_of(path) != entry["sha256"]:
            raise CheckError(f"Python wheel {path} differs from the manifest (sha256): download it again (--prepare)")
        paths.append(path)
    return paths


def parts_report(manifest: dict, folder: Path) -> str:
    """One line: which parts are here and intact, which are still to carry."""
    states = part_states(manifest, folder)
    here = [n.rsplit(".", 1)[-1] for n, s in states.items() if s == "ok"]
    missing = [n.rsplit(".", 1)[-1] for n, s in states.items() if s == "missing"]
    line = f"wheel parts in {folder}: {len(here)} of {len(states)} intact"
    if missing:
        return f"{line} ({', '.join(here) or 'none'}); still to carry: {', '.join(missing)}"
    return f"{line}; the joined wheel will be checked against sha256 {manifest['wheel']['sha256'][:16]}..."


def prepare(folder: Path, manifest_path: Path, part_bytes: int) -> dict:
    """pip download the onnxruntime-gpu wheel and the Python wheels for the GPU machine, then split."""
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", *PIP_TARGET]
    for dest, requirements in ((folder / "download", [ORT_GPU]), (folder / "py", list(PY_WHEELS))):
        dest.mkdir(parents=True, exist_ok=True)
        print("$", shlex.join([*pip, "-d", str(dest), *requirements]), flush=True)
        if subprocess.run([*pip, "-d", str(dest), *requirements]).returncode:
            raise CheckError(f"pip download of {' '.join(requirements)} failed (see pip's message above)")
    wheel = next((folder / "download").glob("onnxruntime_gpu-*.whl"), None)
    if wheel is None:
        raise CheckError(f"pip saved no onnxruntime_gpu wheel in {folder / 'download'}")
    return split_wheel(wheel, folder, part_bytes, manifest_path)


# ---- what travels: the device calls -------------------------------------------------------------


def tree_bytes(root: Path = ROOT) -> int:
    """What every device call sends: tracked and untracked-not-ignored files (and shared/)."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.split(b"\0")
    files = {root / os.fsdecode(p) for p in listed if p}
    if (root / "shared").is_dir():
        files |= {p for p in (root / "shared").rglob("*") if p.is_file()}
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


def plan_calls(manifest: dict, folder: Path, tree: int, final_command: str) -> list[dict]:
    """Consecutive device calls: each carries parts (and last the Python wheels) within the limit."""
    items = [(str((folder / p["name"]).relative_to(ROOT)), p["bytes"]) for p in manifest["parts"]]
    py_bytes = sum(w["bytes"] for w in manifest.get("python_wheels", []))
    if py_bytes:
        items.append((str((folder / "py").relative_to(ROOT)), py_bytes))
    calls: list[dict] = []
    for path, size in items:  # in order, a new call where the next item would not fit (or 8 paths are named)
        if not calls or calls[-1]["bytes"] + size > CARRY_LIMIT or len(calls[-1]["carry"]) == 8:
            calls.append({"carry": [], "bytes": tree})
        calls[-1]["carry"].append(path)
        calls[-1]["bytes"] += size
    for call in calls:
        call["command"] = "python3 benchmarks/gpu_check.py --check-parts"
        call["fits"] = call["bytes"] <= CARRY_LIMIT
    calls[-1]["command"] = final_command
    return calls


def format_calls(calls: list[dict], tree: int) -> list[str]:
    lines = [(f"device calls, back to back (the machine keeps the parts only while warm; tree here "
              f"{tree / 2**20:.1f} MiB, at most {CARRY_LIMIT / 2**20:.0f} MiB a call):")]
    for i, call in enumerate(calls, 1):
        over = "" if call["fits"] else "  OVER THE LIMIT: split with a smaller --part-mib"
        lines.append(f"  call {i}: {call['bytes'] / 2**20:.1f} MiB, carry {json.dumps(call['carry'])}{over}")
        lines.append(f"          $ {call['command']}")
    return lines


# ---- steps ----------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    needs: str  # what it needs, for the plan
    command: list[str]
    min_s: float  # the least time worth starting it with
    cap_s: float  # the most it may take
    after: tuple[str, ...] = ()  # steps that must have passed first (where they were run)
    background: bool = False
    collect: Callable[[Step], None] | None = None  # reads its outputs into `extra` once it is done
    outputs: list[Path] = field(default_factory=list)
    status: str = "pending"
    reason: str | None = None
    started_s: float | None = None
    seconds: float | None = None
    returncode: int | None = None
    extra: dict = field(default_factory=dict)
    log: Path | None = None
    process: subprocess.Popen | None = None
    deadline: float | None = None

    def record(self) -> dict:
        return {"name": self.name, "status": self.status, "reason": self.reason, "needs": self.needs,
                "command": shown(self.command),
                "started_at_s": _round(self.started_s), "seconds": _round(self.seconds),
                "returncode": self.returncode, "min_s": self.min_s, "cap_s": self.cap_s,
                "outputs": [p.name for p in self.outputs if p.exists()], **self.extra}


def shown(command: list[str]) -> str:
    """The command as a shell line, inline code (the probe) shortened to its first line."""
    return shlex.join(a if "\n" not in a else f"<code: {a.strip().splitlines()[0]} ...>" for a in command)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


@dataclass
class Settings:
    out: Path
    scratch: Path
    wheels: Path
    manifest: Path
    tag: str
    sizes: tuple[int, ...]
    iters: int
    warmup: int
    inputs: int
    coarse_stats: bool
    rebuild: bool

    @property
    def site(self) -> Path:
        return self.scratch / "site"

    @property
    def artifact(self) -> Path:
        return self.scratch / f"artifact-pisa-sr-fp16-gpu-check-{'coarse' if self.coarse_stats else 'per-tile'}"

    def sources(self) -> tuple[Path, Path]:
        return self.scratch / "sd21-random", self.scratch / "pisa_sr.pkl"  # build_full_size.write_sources's layout


def child_env(settings: Settings) -> dict:
    """The installed wheels, then srexport from src/, ahead of the machine's own packages."""
    paths = [str(settings.site), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1"}


def install_step(settings: Settings, wheels: list[Path]) -> Step:
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(settings.site), *map(str, wheels)]
    return Step("install", f"the onnxruntime-gpu wheel parts and the Python wheels in {settings.wheels}; "
                "pip (no index)", command, min_s=15, cap_s=120)


def probe_step(settings: Settings) -> Step:
    def collect(step: Step) -> None:
        lines = step.log.read_text(errors="replace").strip().splitlines() if step.log else []
        try:
            step.extra["device"] = json.loads(lines[-1])
        except (IndexError, ValueError):
            pass

    return Step("probe", "CUDA; onnxruntime-gpu's CUDAExecutionProvider (after install)",
                [sys.executable, "-c", PROBE_CODE], min_s=10, cap_s=90, collect=collect)


def tests_step(settings: Settings, selection: list[str]) -> Step:
    junit = settings.out / f"gpu_tests_{settings.tag}.xml"
    xdist = ["-n", "0"] if _has_module("xdist") else []  # pyproject's addopts ask for -n 2: one process here

    def collect(step: Step) -> None:
        step.extra["tests"] = counts = junit_counts(junit)
        # a GPU test that skips on the GPU machine checked nothing: that is this step failing
        skipped = [case for case, outcome in (counts or {}).get("cases", {}).items()
                   if outcome == "skipped" and not case.endswith(EXPECTED_SKIPS)]
        if step.status == "ok" and skipped:
            step.status, step.reason = "failed", f"skipped there: {', '.join(skipped)} (see the log for why)"

    return Step("tests", "CUDA, onnxruntime-gpu, the demo (built by the tests' fixtures on the CPU)",
                [sys.executable, "-m", "pytest", *xdist, "-v", "-rs", "-p", "no:cacheprovider",
                 f"--junitxml={junit}", *selection],
                min_s=45, cap_s=240, after=("install",), background=True, collect=collect, outputs=[junit])


def sources_step(settings: Settings) -> Step:
    def collect(step: Step) -> None:
        # the build command names write_sources's paths before it has run: they must agree
        written = last_line(step.log).split()
        if step.status == "ok" and written != [str(p) for p in settings.sources()]:
            step.status, step.reason = "failed", f"write_sources wrote {written}, not {settings.sources()}"

    return Step("sources", "diffusers; ~5 GB of disk in the scratch folder (reused while warm)",
                [sys.executable, "-c", SOURCES_CODE, str(HERE), str(settings.scratch)],
                min_s=30, cap_s=180, after=("install",), collect=collect)


def build_command(settings: Settings) -> list[str]:
    base, checkpoint = settings.sources()
    # Per-tile statistics: the coarse passes' six extra graphs roughly double export and checks, and
    # 512 and 1024 px outputs are one VAE tile (only the UNet tiles, at 1024) -- --coarse-stats builds them.
    norms = [] if settings.coarse_stats else ["--vae-norm", "per-tile", "--unet-norm", "per-tile"]
    return [sys.executable, "-m", "srexport.cli", "build", "--base", str(base), "--checkpoint", str(checkpoint),
            "--scale", "4", "--precision", "fp16", *norms, "--out", str(settings.artifact), "--force"]


def build_step(settings: Settings) -> Step:
    def collect(step: Step) -> None:
        manifest = settings.artifact / "manifest.json"
        if manifest.is_file():
            data = json.loads(manifest.read_text())
            step.extra["artifact"] = {"path": str(settings.artifact), "checks": data.get("checks"),
                                      "versions": data.get("versions"),
                                      "files_mib": {f["path"]: round(f["bytes"] / 2**20, 1)
                                                    for f in data.get("files", {}).values()}}

    return Step("build", "the sources; ~20 GB RAM on the CPU", build_command(settings),
                min_s=120, cap_s=360, after=("sources",), collect=collect)


def bench_stem(settings: Settings, size: int) -> Path:
    # bench_*.json: benchmarks/summarise.py puts it in the README's table once copied to results/
    return settings.out / f"bench_gpu_check_pisa-sr_{settings.tag}_lr{size}"


def bench_command(settings: Settings, size: int) -> list[str]:
    stem = bench_stem(settings, size)
    return [sys.executable, "-m", "srexport.cli", "bench", str(settings.artifact), "--backends", BACKENDS,
            "--sizes", str(size), "--iters", str(settings.iters), "--warmup", str(settings.warmup),
            "--inputs", str(settings.inputs), "--device", "cuda", "--json", f"{stem}.json", "--plot", f"{stem}.png"]


def bench_step(settings: Settings, size: int) -> Step:
    stem = bench_stem(settings, size)

    def collect(step: Step) -> None:
        if Path(f"{stem}.json").is_file():
            step.extra["bench"] = bench_digest(json.loads(Path(f"{stem}.json").read_text()))

    # One size per run: a run stopped at the budget writes nothing, so the smaller size lands first.
    return Step(f"bench-lr{size}", "the artifact, CUDA, onnxruntime-gpu; torch.compile's compilers",
                bench_command(settings, size), min_s=60, cap_s=240, after=("build",), collect=collect,
                outputs=[Path(f"{stem}.json"), Path(f"{stem}.png")])


def bench_digest(report: dict) -> dict:
    """What to read first of a bench report: per variant, the end-to-end median and the parity."""
    rows = [{"variant": r["variant"], "lr_size": r["lr_size"], "output_size": r["output_size"],
             "wall_median_ms": _round(r["wall"]["median"] * 1e3), "psnr_db": r["parity"]["psnr_db"],
             "parity_passed": r["parity"]["passed"]} for r in report.get("results", [])]
    return {"passed": report.get("passed"), "failures": report.get("failures"), "results": rows,
            "variants": [{k: v[k] for k in ("name", "precision", "status", "reason")} for v in report["variants"]]}


def junit_counts(path: Path) -> dict | None:
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = {}
    for case in suite.iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        cases[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"cases": cases}


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---- the tests that skip without CUDA -----------------------------------------------------------


def gpu_marker_registered(root: Path = ROOT) -> bool:
    import tomllib

    options = tomllib.loads((root / "pyproject.toml").read_text()).get("tool", {}).get("pytest", {}).get(
        "ini_options", {})
    markers = [m.split(":")[0].strip() for m in options.get("markers", [])]
    conftest = root / "tests" / "conftest.py"
    registered_in_conftest = conftest.is_file() and re.search(r"[\"']markers[\"'],\s*[\"']gpu\b", conftest.read_text())
    return "gpu" in markers or bool(registered_in_conftest)


def test_selection(root: Path = ROOT) -> tuple[list[str], list[str]]:
    """(pytest arguments, node ids no longer found): `-m gpu` once registered, else GPU_TESTS by id."""
    if gpu_marker_registered(root):
        return ["-m", "gpu", "tests"], []
    found, gone = [], []
    for node in GPU_TESTS:
        file, name = node.split("::")
        path = root / file
        tree = ast.parse(path.read_text()) if path.is_file() else ast.Module(body=[], type_ignores=[])
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        (found if name in names else gone).append(node)
    return found, gone


# ---- the run --------------------------------------------------------------------------------------


class Runner:
    """Runs steps as child processes within the budget, one progress line per step."""

    def __init__(self, settings: Settings, budget_s: float, env: dict, selected: set[str]):
        self.settings, self.budget_s, self.env, self.selected = settings, budget_s, env, selected
        self.t0 = time.monotonic()
        self.steps: list[Step] = []
        self.logs = settings.scratch / "gpu_check_logs"
        self.header: dict = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.budget_s - RESERVE_S - self.elapsed()

    def blocked(self, step: Step) -> str | None:
        for name in step.after:
            before = next((s for s in self.steps if s.name == name), None)
            if before is not None and before.status not in PASSED:
                return f"needs {name}, which is {before.status}"
        if self.remaining() < step.min_s:
            return (f"budget: {max(0.0, self.remaining()):.0f} s left of {self.budget_s:.0f}, "
                    f"this step needs at least {step.min_s:.0f} s")
        return None

    def start(self, step: Step) -> bool:
        self.steps.append(step)
        if step.name not in self.selected:
            step.status = "deselected"
            self.done(step)
            return False
        reason = self.blocked(step)
        if reason:
            step.status, step.reason = "skipped", reason
            self.done(step)
            return False
        self.logs.mkdir(parents=True, exist_ok=True)
        step.log = self.logs / f"{step.name}.log"
        step.started_s = self.elapsed()
        step.deadline = time.monotonic() + min(step.cap_s, self.remaining())
        with open(step.log, "wb") as log:
            # a session of its own: a step stopped at the budget takes its children (compilers, workers) along
            step.process = subprocess.Popen(step.command, cwd=ROOT, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        return True

    def wait(self, step: Step) -> None:
        if step.process is None:
            return
        try:
            step.returncode = step.process.wait(timeout=max(0.0, step.deadline - time.monotonic()))
            step.status = "ok" if step.returncode == 0 else "failed"
            if step.returncode:
                step.reason = f"exit status {step.returncode}: {last_line(step.log)}"
        except subprocess.TimeoutExpired:
            os.killpg(step.process.pid, signal.SIGKILL)
            step.process.wait()
            allowed = step.deadline - (self.t0 + step.started_s)
            step.status, step.reason = "timeout", f"stopped at its limit, {allowed:.0f} s (budget or cap)"
        step.seconds = self.elapsed() - step.started_s
        step.process = None
        if step.collect:
            step.collect(step)
        self.done(step)

    def run(self, step: Step) -> None:
        if self.start(step):
            self.wait(step)

    def mark(self, step: Step, status: str, reason: str) -> None:
        """A step settled without running (reused)."""
        step.status, step.reason, step.seconds = status, reason, 0.0
        self.steps.append(step)
        if step.collect:
            step.collect(step)
        self.done(step)

    def done(self, step: Step) -> None:
        took = "" if step.seconds is None else f"{step.seconds:6.1f} s"
        note = f"  {step.reason}" if step.reason else ""
        print(f"[{self.elapsed():6.1f} s] {step.name:<12} {step.status:<8} {took}{note}", flush=True)
        self.write()

    def write(self) -> None:
        """Summary and combined log into --out, after every step: a run cut short still leaves them."""
        out, tag = self.settings.out, self.settings.tag
        probed = next((s.extra["device"] for s in self.steps if "device" in s.extra), None)
        summary = {**self.header, "versions": probed,  # the probe's: device, torch, CUDA, onnxruntime, packages
                   "elapsed_s": _round(self.elapsed()), "steps": [s.record() for s in self.steps],
                   "passed": bool(self.steps) and all(s.status in PASSED for s in self.steps)}
        (out / f"gpu_check_{tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
        with open(out / f"gpu_check_{tag}.log", "w") as combined:
            for s in self.steps:
                combined.write(f"===== {s.name}: {s.status} {s.reason or ''}\n$ {shown(s.command)}\n")
                if s.log and s.log.is_file():
                    combined.write(s.log.read_text(errors="replace")[-2**22:])  # the last 4 MiB of each
                combined.write("\n")


# checked: the dry run's CPU check of a step passed; deselected: left out by --steps, not a failure
PASSED = ("ok", "reused", "checked", "deselected")


def last_line(log: Path | None) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log and log.is_file() else []
    return lines[-1][:240] if lines else "no output"


def machine() -> dict:
    return {"host": platform.node(), "platform": platform.platform(), "cores": os.cpu_count(),
            "python": platform.python_version()}


def header(settings: Settings, budget_s: float, dry_run: bool, device: str | None) -> dict:
    return {"schema": "srexport.gpu_check", "schema_version": 1,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dry_run": dry_run, "budget_s": budget_s, "cuda_device": device, "machine": machine(),
            "config": {"backends": BACKENDS, "sizes": list(settings.sizes), "iters": settings.iters,
                       "warmup": settings.warmup, "inputs": settings.inputs, "coarse_stats": settings.coarse_stats,
                       "artifact": str(settings.artifact), "scratch": str(settings.scratch)}}


def require_cuda() -> str:
    """The CUDA device's name, or a one-line CheckError naming what is missing."""
    hint = "run on the GPU machine or pass --dry-run"
    try:
        import torch
    except ImportError as exc:
        raise CheckError(f"no CUDA device: torch cannot be imported ({exc}); {hint}") from None
    if not torch.cuda.is_available():
        build = "a CPU build of torch" if torch.version.cuda is None else f"torch {torch.__version__} sees no GPU"
        raise CheckError(f"no CUDA device: torch.cuda.is_available() is False ({build}); {hint}")
    return torch.cuda.get_device_name(0)


def device_tag(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")  # as bench_full_size.device_tag


def installed_marker(settings: Settings, manifest: dict) -> tuple[Path, str]:
    shas = [manifest["wheel"]["sha256"], *(w["sha256"] for w in manifest.get("python_wheels", []))]
    return settings.site / ".gpu_check_installed", "\n".join(shas)


def gpu_run(settings: Settings, budget_s: float, selected: set[str]) -> int:
    device = require_cuda()
    settings.tag = device_tag(device)
    runner = Runner(settings, budget_s, child_env(settings), selected)
    settings.out.mkdir(parents=True, exist_ok=True)
    runner.header = header(settings, budget_s, False, device)
    print(f"gpu_check on {device}: budget {budget_s:.0f} s, results in {settings.out}", flush=True)

    if "install" in selected:
        install(runner, settings)
    else:
        runner.start(install_step(settings, []))  # recorded as deselected
    runner.run(probe_step(settings))
    selection, gone = test_selection()
    tests = tests_step(settings, selection)
    tests.extra["not_found"] = gone
    runner.start(tests)  # in the background: sources and build use the CPU, the tests mostly the GPU
    runner.run(sources_step(settings))
    build = build_step(settings)
    if (settings.artifact / "manifest.json").is_file() and not settings.rebuild and "build" in selected:
        runner.mark(build, "reused", f"{settings.artifact} exists (--rebuild to build again)")
    else:
        runner.run(build)
    runner.wait(tests)  # the bench times a quiet machine
    for size in settings.sizes:
        runner.run(bench_step(settings, size))
    runner.write()
    print(summary_table(runner.steps), flush=True)
    return 0 if all(s.status in PASSED for s in runner.steps) else 1


def install(runner: Runner, settings: Settings) -> None:
    """Join and check the wheel (a bad part refuses the whole run in one line), then pip install."""
    manifest = read_manifest(settings.manifest)
    marker, shas = installed_marker(settings, manifest)
    if marker.is_file() and marker.read_text() == shas:
        runner.mark(install_step(settings, []), "reused", f"{settings.site} holds these wheels already")
        return
    started = time.monotonic()
    wheels = [join_parts(manifest, settings.wheels, settings.scratch / "wheels"),
              *python_wheels(manifest, settings.wheels)]
    step = install_step(settings, wheels)
    step.extra["join_seconds"] = _round(time.monotonic() - started)
    runner.run(step)
    if step.status == "ok":
        marker.write_text(shas)


def summary_table(steps: list[Step]) -> str:
    lines = ["step          status    seconds  note"]
    for s in steps:
        took = "-" if s.seconds is None else f"{s.seconds:.1f}"
        note = s.reason or ""
        if "bench" in s.extra:
            note = "; ".join(f"{r['variant']} {r['wall_median_ms']} ms, "
                             f"{'identical' if r['psnr_db'] is None else round(r['psnr_db'], 1)} dB"
                             for r in s.extra["bench"]["results"]) or note
        if s.extra.get("tests"):
            t = s.extra["tests"]
            note = (f"{t['tests']} tests, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"
                    + (f"; {s.reason}" if s.reason else ""))
        if s.extra.get("device"):
            d = s.extra["device"]
            note = f"{d['cuda_device']}, torch {d['torch']}, onnxruntime {d['onnxruntime-gpu']}: {d['providers_used']}"
        lines.append(f"{s.name:<13} {s.status:<9} {took:>7}  {note}"[:300])
    return "\n".join(lines)


# ---- the dry run ----------------------------------------------------------------------------------


def dry_run(settings: Settings, budget_s: float) -> int:
    """Plans every step and runs what a CPU can check of each; 0 when nothing would refuse to start."""
    settings.tag = "dry-run"
    sys.path.insert(0, str(ROOT / "src"))  # as the GPU run's children see srexport, installed here or not
    settings.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(settings, budget_s, child_env(settings), set())
    runner.header = header(settings, budget_s, True, None)
    steps = planned_steps(settings)
    print(f"gpu_check dry run: {len(steps)} steps within {budget_s:.0f} s on the GPU machine "
          f"(order: install, probe, tests in the background during sources and build, then the benches)")
    failed = False
    for number, (step, check) in enumerate(steps, 1):
        t = time.monotonic()
        try:
            step.status, step.reason = "checked", check()
        except CheckError as exc:
            step.status, step.reason, failed = "failed", str(exc), True
        step.seconds = time.monotonic() - t
        runner.steps.append(step)
        print(f"{number}. {step.name}: needs {step.needs}; at least {step.min_s:.0f} s, at most {step.cap_s:.0f} s"
              f"{'; in the background' if step.background else ''}")
        print(f"   $ {shown(step.command)}")
        print(f"   {step.status}: {step.reason}")
    carry = carry_plan(settings)
    print("\n".join(carry))
    runner.header["device_calls"] = carry
    runner.write()
    print(f"summary: {settings.out / 'gpu_check_dry-run.json'}")
    return 1 if failed else 0


def planned_steps(settings: Settings) -> list[tuple[Step, Callable[[], str]]]:
    selection, _ = test_selection()
    wheels = [settings.scratch / "wheels" / "<joined onnxruntime-gpu wheel>", settings.wheels / "py" / "*.whl"]
    return [(install_step(settings, wheels), lambda: check_wheels(settings)),
            (probe_step(settings), check_probe),
            (tests_step(settings, selection), check_tests),
            (sources_step(settings), check_sources),
            (build_step(settings), lambda: check_cli(build_command(settings)[3:])),
            *((bench_step(settings, size), lambda size=size: check_bench(settings, size))
              for size in settings.sizes)]


def check_wheels(settings: Settings) -> str:
    if not settings.manifest.is_file():
        return f"not prepared here: no {settings.manifest.name} (run --prepare); the GPU run would refuse"
    manifest = read_manifest(settings.manifest)
    states = part_states(manifest, settings.wheels)
    if all(s == "missing" for s in states.values()):
        return f"manifest for {manifest['wheel']['name']}; its {len(states)} parts are not here (run --prepare)"
    require_parts(manifest, settings.wheels)
    joined = hashlib.sha256()
    for part in manifest["parts"]:
        joined.update((settings.wheels / part["name"]).read_bytes())
    if joined.hexdigest() != manifest["wheel"]["sha256"]:
        raise CheckError(f"the parts in {settings.wheels} join to sha256 {joined.hexdigest()[:16]}..., not the "
                         f"manifest's {manifest['wheel']['sha256'][:16]}...: split the wheel again")
    count = len(python_wheels(manifest, settings.wheels))
    return f"{len(states)} parts intact, joined sha256 matches; {count} Python wheels intact"


def check_probe() -> str:
    compile(PROBE_CODE, "probe", "exec")
    import torch

    here = "a CUDA device is visible" if torch.cuda.is_available() else "no CUDA device here (needed there)"
    try:
        import onnxruntime as ort

        providers = ", ".join(ort.get_available_providers())
    except ImportError:
        providers = "onnxruntime not installed"
    return f"probe code compiles; torch {torch.__version__}, {here}; onnxruntime providers here: {providers}"


def check_tests() -> str:
    selection, gone = test_selection()
    if gone:
        raise CheckError(f"GPU_TESTS names tests that no longer exist: {', '.join(gone)}")
    how = "the gpu marker" if selection[:2] == ["-m", "gpu"] else f"{len(selection)} node ids (no gpu marker registered)"
    return f"selected by {how}: all found"


def check_sources() -> str:
    sys.path.insert(0, str(HERE))
    from build_full_size import write_sources  # noqa: F401 - the builder the step runs
    from srexport.models.configs import ARCHITECTURES

    if "sd21" not in ARCHITECTURES:
        raise CheckError("srexport.models.configs.ARCHITECTURES has no 'sd21' (the full-size shapes)")
    return "build_full_size.write_sources and the 'sd21' architecture import"


def check_cli(argv: list[str]) -> str:
    """The arguments parse with srexport's own CLI parser (one-line errors, exit status 2)."""
    from srexport.cli import _build_parser

    try:
        _build_parser().parse_args(argv)
    except SystemExit as exc:
        raise CheckError(f"srexport {argv[0]} refuses the planned arguments (exit status {exc.code})") from None
    return f"'srexport {argv[0]}' accepts these arguments"


def check_bench(settings: Settings, size: int) -> str:
    from srexport.bench import BENCH_BACKENDS

    unknown = [b for b in BACKENDS.split(",") if b not in BENCH_BACKENDS]
    if unknown:
        raise CheckError(f"srexport bench knows no backend {', '.join(unknown)}")
    return check_cli(bench_command(settings, size)[3:])


def carry_plan(settings: Settings) -> list[str]:
    if not settings.manifest.is_file():
        return ["device calls: not planned (no wheel manifest yet: run --prepare)"]
    manifest = read_manifest(settings.manifest)
    if not settings.wheels.is_relative_to(ROOT):
        return [f"device calls: not planned ({settings.wheels} is outside the repository, so it cannot travel)"]
    tree = tree_bytes()
    calls = plan_calls(manifest, settings.wheels, tree, "PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py")
    return format_calls(calls, tree)


# ---- command line ---------------------------------------------------------------------------------


STEP_NAMES = ("install", "probe", "tests", "sources", "build", "bench")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="plan every step and run the CPU checks")
    mode.add_argument("--prepare", action="store_true",
                      help="here: pip download onnxruntime-gpu and the Python wheels, then split (--split-wheel)")
    mode.add_argument("--split-wheel", type=Path, metavar="WHEEL",
                      help="cut WHEEL into parts in --wheels-dir and write the sha256 manifest")
    mode.add_argument("--check-parts", action="store_true",
                      help="one line: which parts are here and intact (the device calls that carry them)")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else DEFAULT_OUT,
                    help="results folder (default: $OUT where set, else benchmarks/gpu_check_out)")
    ap.add_argument("--scratch", type=Path, default=SCRATCH, help="sources, artifact, installed wheels, logs")
    ap.add_argument("--wheels-dir", type=Path, default=WHEELS, help="the parts and py/ (default: %(default)s)")
    ap.add_argument("--manifest", type=Path, default=MANIFEST, help="the parts' sha256 manifest")
    ap.add_argument("--part-mib", type=float, default=DEFAULT_PART_MIB, help="part size (default: %(default)s)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole run's time (default: %(default)s)")
    ap.add_argument("--steps", default=",".join(STEP_NAMES), help="the steps to run (default: all)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="LR sizes, one bench each")
    ap.add_argument("--iters", type=int, default=10, help="timed runs per variant and size")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs first (torch.compile compiles there)")
    ap.add_argument("--inputs", type=int, default=2, help="distinct LR inputs rotated through")
    ap.add_argument("--coarse-stats", action="store_true",
                    help="build with the default coarse statistics graphs (longer build)")
    ap.add_argument("--rebuild", action="store_true", help="build again even if the artifact is there")
    return ap.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    try:
        sizes = tuple(int(s) for s in args.sizes.split(",") if s)
    except ValueError:
        raise CheckError(f"--sizes {args.sizes}: not comma-separated integers") from None
    if not sizes or min(sizes) < 1 or min(args.iters, args.inputs) < 1 or args.warmup < 0:
        raise CheckError("--sizes, --iters and --inputs must be positive, --warmup at least 0")
    return Settings(out=args.out.absolute(), scratch=args.scratch.absolute(), wheels=args.wheels_dir.absolute(),
                    manifest=args.manifest.absolute(), tag="", sizes=sizes, iters=args.iters, warmup=args.warmup,
                    inputs=args.inputs, coarse_stats=args.coarse_stats, rebuild=args.rebuild)


def selected_steps(text: str, sizes: tuple[int, ...]) -> set[str]:
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = names - set(STEP_NAMES)
    if unknown:
        raise CheckError(f"--steps {','.join(sorted(unknown))}: not a step; name some of {', '.join(STEP_NAMES)}")
    return (names - {"bench"}) | ({f"bench-lr{s}" for s in sizes} if "bench" in names else set())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from(args)
        part_bytes = int(args.part_mib * 2**20)
        if args.prepare or args.split_wheel:
            manifest = (prepare(settings.wheels, settings.manifest, part_bytes) if args.prepare
                        else split_wheel(args.split_wheel, settings.wheels, part_bytes, settings.manifest))
            print(f"{len(manifest['parts'])} parts of {manifest['wheel']['name']} in {settings.wheels}, "
                  f"sha256 {manifest['wheel']['sha256']}; manifest {settings.manifest}")
            print("\n".join(carry_plan(settings)))
            return 0
        if args.check_parts:
            manifest = read_manifest(settings.manifest)
            print(parts_report(manifest, settings.wheels))
            states = part_states(manifest, settings.wheels)
            if any(s not in ("ok", "missing") for s in states.values()):
                require_parts(manifest, settings.wheels)  # names the corrupt part in one line
            return 0
        if args.dry_run:
            return dry_run(settings, args.budget_s)
        return gpu_run(settings, args.budget_s, selected_steps(args.steps, settings.sizes))
    except CheckError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
