"""benchmarks/gpu_check.py where no GPU is: the dry run, the refusal without CUDA, the wheel parts
(split, join, sha256 refusals), the step budget and a real install of a small wheel from parts."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_check.py"
sys.path.insert(0, str(BENCHMARKS))
import gpu_check  # noqa: E402 - from benchmarks/

STEPS = ["install", "probe", "tests", "sources", "build", "bench-lr128", "bench-lr256"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # --out is always given
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env)


def fake_wheel(path: Path, size: int = 250_001) -> bytes:
    data = random.Random(0).randbytes(size)
    path.write_bytes(data)
    return data


def split(tmp_path: Path, size: int = 250_001) -> tuple[Path, Path, dict, bytes]:
    wheels, manifest_path = tmp_path / "wheels", tmp_path / "gpu_wheels.json"
    data = fake_wheel(tmp_path / "fake_pkg-1.0-py3-none-any.whl", size)
    manifest = gpu_check.split_wheel(tmp_path / "fake_pkg-1.0-py3-none-any.whl", wheels, 100_000, manifest_path)
    return wheels, manifest_path, manifest, data


def wheel_args(wheels: Path, manifest: Path) -> list[str]:
    return ["--wheels-dir", str(wheels), "--manifest", str(manifest)]


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_split_and_join_restore_the_wheel(tmp_path):
    wheels, manifest_path, manifest, data = split(tmp_path)
    assert [p["bytes"] for p in manifest["parts"]] == [100_000, 100_000, 50_001]
    assert json.loads(manifest_path.read_text()) == manifest
    assert manifest["wheel"]["sha256"] == hashlib.sha256(data).hexdigest()
    joined = gpu_check.join_parts(gpu_check.read_manifest(manifest_path), wheels, tmp_path / "joined")
    assert joined.name == "fake_pkg-1.0-py3-none-any.whl"
    assert joined.read_bytes() == data


def test_a_corrupt_part_is_refused_in_one_line(tmp_path):
    wheels, manifest_path, manifest, _ = split(tmp_path)
    part = wheels / manifest["parts"][1]["name"]
    flipped = bytearray(part.read_bytes())
    flipped[1234] ^= 0xFF  # same size, other bytes: only the sha256 tells
    part.write_bytes(bytes(flipped))

    with pytest.raises(gpu_check.CheckError, match=r"part1 is corrupt \(sha256 differs"):
        gpu_check.join_parts(manifest, wheels, tmp_path / "joined")
    assert not (tmp_path / "joined" / manifest["wheel"]["name"]).exists()

    done = run_script("--check-parts", *wheel_args(wheels, manifest_path))
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert line.startswith("gpu_check: wheel part ") and "part1 is corrupt" in line

    part.write_bytes(bytes(flipped[:-1]))  # truncated: the size tells
    with pytest.raises(gpu_check.CheckError, match="99999 bytes, not 100000"):
        gpu_check.require_parts(manifest, wheels)

    dry = run_script("--dry-run", "--out", str(tmp_path / "out"), *wheel_args(wheels, manifest_path))
    assert dry.returncode == 1 and "failed: wheel part" in dry.stdout


def test_missing_parts_are_named(tmp_path):
    wheels, manifest_path, manifest, _ = split(tmp_path)
    (wheels / manifest["parts"][2]["name"]).unlink()
    with pytest.raises(gpu_check.CheckError, match=r"1 of 3 .* missing .*part2 \(carry them"):
        gpu_check.join_parts(manifest, wheels, tmp_path / "joined")
    done = run_script("--check-parts", *wheel_args(wheels, manifest_path))
    assert done.returncode == 0, done.stderr  # parts still on their way are no error
    assert "2 of 3 intact (part0, part1); still to carry: part2" in done.stdout


def test_dry_run_plans_every_step_and_exits_0_on_cpu(tmp_path):
    wheels, manifest_path, _, _ = split(tmp_path)
    out = tmp_path / "out"
    done = run_script("--dry-run", "--out", str(out), *wheel_args(wheels, manifest_path))
    assert done.returncode == 0, done.stdout + done.stderr
    for number, name in enumerate(STEPS, 1):
        assert f"{number}. {name}: needs " in done.stdout
    for planned in ("--backends torch,torch-compile,ort-cuda,ort-cuda-plain --sizes 128", "--sizes 256", "--precision fp16",
                    "--json", "--plot", "--junitxml", "pip install", "build_full_size import write_sources"):
        assert planned in done.stdout, planned
    assert "3 parts intact, joined sha256 matches" in done.stdout
    summary = json.loads((out / "gpu_check_dry-run.json").read_text())
    assert summary["dry_run"] is True and summary["passed"] is True
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert {s["status"] for s in summary["steps"]} == {"checked"}
    tests = next(s for s in summary["steps"] if s["name"] == "tests")
    assert "::test_ort_cuda_matches_onnxruntime_cpu" in tests["command"]


def test_dry_run_without_prepared_wheels_still_plans(tmp_path):
    done = run_script("--dry-run", "--out", str(tmp_path / "out"), *wheel_args(tmp_path / "none", tmp_path / "no.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not prepared here" in done.stdout and "device calls: not planned" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the check would run")
def test_without_cuda_it_refuses_in_one_line(tmp_path):
    done = run_script("--out", str(tmp_path / "out"), *wheel_args(tmp_path / "none", tmp_path / "no.json"))
    assert done.returncode != 0
    line = one_line(done.stderr)
    assert line.startswith("gpu_check: no CUDA device: torch.cuda.is_available() is False")
    assert "--dry-run" in line
    assert done.stdout == "" and not (tmp_path / "out").exists()


def test_bad_arguments_are_one_line(tmp_path):
    done = run_script("--dry-run", "--sizes", "128,big", "--out", str(tmp_path))
    assert done.returncode == 2 and "--sizes 128,big" in one_line(done.stderr)
    with pytest.raises(gpu_check.CheckError, match="--steps benchmark: not a step"):
        gpu_check.selected_steps("build,benchmark", (128,))


def test_steps_are_skipped_and_stopped_at_the_budget(tmp_path):
    settings = gpu_check.settings_from(gpu_check.parse_args(["--out", str(tmp_path), "--scratch", str(tmp_path)]))
    settings.tag = "budget"
    quick = gpu_check.Step("quick", "", [sys.executable, "-c", "print('hello')"], min_s=0, cap_s=30)
    slow = gpu_check.Step("slow", "", [sys.executable, "-c", "import time; time.sleep(60)"], min_s=0, cap_s=1)
    after_slow = gpu_check.Step("after-slow", "", [sys.executable, "-c", "pass"], min_s=0, cap_s=30, after=("slow",))
    late = gpu_check.Step("late", "", [sys.executable, "-c", "pass"], min_s=3600, cap_s=30)
    left_out = gpu_check.Step("left-out", "", [sys.executable, "-c", "pass"], min_s=0, cap_s=30)
    runner = gpu_check.Runner(settings, gpu_check.RESERVE_S + 120, dict(os.environ),
                              {"quick", "slow", "after-slow", "late"})
    t = time.monotonic()
    for step in (quick, slow, after_slow, late, left_out):
        runner.run(step)
    assert time.monotonic() - t < 20  # the sleeper was stopped at its cap, not waited for
    assert [s.status for s in runner.steps] == ["ok", "timeout", "skipped", "skipped", "deselected"]
    assert after_slow.reason == "needs slow, which is timeout"
    assert late.reason.startswith("budget: ") and "needs at least 3600 s" in late.reason
    summary = json.loads((tmp_path / "gpu_check_budget.json").read_text())
    assert summary["passed"] is False and [s["status"] for s in summary["steps"]][:2] == ["ok", "timeout"]
    assert "hello" in (tmp_path / "gpu_check_budget.log").read_text()


def small_wheel(folder: Path) -> Path:
    """A real, installable wheel of one module (stands in for onnxruntime-gpu)."""
    files = {"fakeortgpu/__init__.py": b"VERSION = '1.0'\n",
             "fakeortgpu-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: fakeortgpu\nVersion: 1.0\n",
             "fakeortgpu-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items()) + "fakeortgpu-1.0.dist-info/RECORD,,\n"
    path = folder / "fakeortgpu-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("fakeortgpu-1.0.dist-info/RECORD", record)
    return path


def test_install_joins_the_parts_and_installs_once(tmp_path, monkeypatch):
    """The install step end to end on a small wheel: the other steps left out with --steps."""
    wheels, manifest_path = tmp_path / "wheels", tmp_path / "gpu_wheels.json"
    gpu_check.split_wheel(small_wheel(tmp_path), wheels, 300, manifest_path)
    monkeypatch.setattr(gpu_check, "require_cuda", lambda: "Fake GPU 9000")
    args = ["--steps", "install", "--out", str(tmp_path / "out"), "--scratch", str(tmp_path / "scratch"),
            *wheel_args(wheels, manifest_path)]
    assert gpu_check.main(args) == 0
    assert (tmp_path / "scratch" / "site" / "fakeortgpu" / "__init__.py").is_file()
    summary = json.loads((tmp_path / "out" / "gpu_check_fake-gpu-9000.json").read_text())
    assert summary["cuda_device"] == "Fake GPU 9000"
    install, *others = summary["steps"]
    assert install["name"] == "install" and install["status"] == "ok" and install["join_seconds"] is not None
    assert [s["status"] for s in others] == ["deselected"] * len(others) and len(others) == len(STEPS) - 1

    assert gpu_check.main(args) == 0  # again, while the machine is warm: nothing to do
    summary = json.loads((tmp_path / "out" / "gpu_check_fake-gpu-9000.json").read_text())
    assert summary["steps"][0]["status"] == "reused"
