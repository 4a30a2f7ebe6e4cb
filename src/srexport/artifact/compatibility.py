"""Whether a built TensorRT engine may load on this machine: the rules, as pure functions.

Part of the artifact contract: an engine's manifest record (TensorRT version, GPU, compute
capability, hardware-compatibility level, version compatibility) is checked against a
``Machine`` before a byte of the engine is read (runtime/trt_runner.py), and the engine builder
(export/engines.py) writes that record. TensorRT and torch are imported lazily, only to read the
running machine, so the rules are tested with simulated versions and GPUs anywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

TENSORRT_PACKAGE = "tensorrt"
ENGINES_COMMAND = "srexport engines ARTIFACT"


def require_tensorrt(purpose: str, instead: str = ""):
    """``import tensorrt``, or a one-line UserError that says what to do instead."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: bindings present, libnvinfer missing
        reason = " ".join(str(exc).split())[:120]
        raise UserError(
            f"{purpose} needs TensorRT, and the Python package '{TENSORRT_PACKAGE}' cannot be imported here "
            f"({reason}); {instead}on an NVIDIA GPU machine run 'pip install {TENSORRT_PACKAGE}', then "
            f"'{ENGINES_COMMAND}' builds the engines into the ONNX artifact") from None
    return trt


def tensorrt_major(version: str) -> int:
    return _version_tuple(version)[0]


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", str(version))
    if not parts:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(p) for p in parts)


AMPERE = (8, 0)
# Cross-major pairs TensorRT runs version-compatible engines across (support
# matrix, 11.4.1): 8 -> 10 and 10 -> 11; every other cross-major pair is refused.
_CROSS_MAJOR_VERSION_COMPAT = {(8, 10), (10, 11)}


@dataclass(frozen=True)
class Machine:
    """What an engine has to match: the running TensorRT and GPU."""

    tensorrt_version: str | None
    device_name: str | None
    compute_capability: tuple[int, int] | None

    def to_dict(self) -> dict:
        return {"tensorrt_version": self.tensorrt_version, "device_name": self.device_name,
                "compute_capability": list(self.compute_capability) if self.compute_capability else None}


def engine_problems(entry: dict, machine: Machine) -> list[str]:
    """Why an engine described by ``entry`` (a manifest engine record) must not load on ``machine``.

    TensorRT version: equal major.minor.patch, unless the engine is version
    compatible: then the runtime may be newer within the major version, or one
    of the cross-major pairs TensorRT supports (10 -> 11). GPU: the same compute
    capability, unless the hardware-compatibility level is AMPERE_PLUS (any GPU
    of compute capability 8.0 or later).
    """
    problems = []
    built = entry.get("tensorrt_version")
    running = machine.tensorrt_version
    if running is None:
        problems.append("TensorRT is not installed here")
    elif built is None:
        problems.append("the manifest does not say which TensorRT built the engine")
    else:
        b, r = _version_tuple(built)[:3], _version_tuple(running)[:3]
        if entry.get("version_compatible"):
            same_major = b[0] == r[0] or (b[0], r[0]) in _CROSS_MAJOR_VERSION_COMPAT
            if r < b or not same_major:
                problems.append(f"version-compatible engine built with TensorRT {built} cannot run on TensorRT "
                                f"{running} (it runs on {b[0]}.x from {built} on"
                                + (f", and on {b[0] + 1}.x" if (b[0], b[0] + 1) in _CROSS_MAJOR_VERSION_COMPAT
                                   else "") + ")")
        elif b != r:
            problems.append(f"engine built with TensorRT {built}, this machine has TensorRT {running} "
                            f"(engines load only on the TensorRT version that built them unless built "
                            f"version-compatible)")

    built_cc = entry.get("compute_capability")
    level = entry.get("hardware_compatibility_level", "NONE")
    running_cc = machine.compute_capability
    if running_cc is None:
        problems.append("no NVIDIA GPU is visible here")
    elif built_cc is None:
        problems.append("the manifest does not say which GPU the engine was built for")
    else:
        b_cc, r_cc = tuple(built_cc), tuple(running_cc)
        if level == "AMPERE_PLUS":
            if r_cc < AMPERE:
                problems.append(f"engine built hardware-compatible for Ampere and later (compute capability >= 8.0); "
                                f"this GPU is {_cc(r_cc)}")
        elif level in ("NONE", "SAME_COMPUTE_CAPABILITY"):
            if b_cc != r_cc:
                problems.append(f"engine built for compute capability {_cc(b_cc)} "
                                f"({entry.get('device_name', 'unknown GPU')}), this GPU "
                                f"({machine.device_name}) is {_cc(r_cc)} (build with --hardware-compat ampere+ "
                                f"for engines that move between GPU generations)")
        else:
            problems.append(f"unknown hardware-compatibility level {level!r} in the manifest")
    return problems


def engine_notes(entry: dict, machine: Machine) -> list[str]:
    """Things worth a warning that do not stop an engine from loading."""
    notes = []
    if (entry.get("hardware_compatibility_level", "NONE") == "NONE" and machine.device_name
            and entry.get("device_name") and machine.device_name != entry["device_name"]):
        notes.append(f"engine was built on {entry['device_name']}, this is {machine.device_name}: same compute "
                     f"capability, so it loads, but its tactics were timed on the other GPU")
    return notes


def check_engine_compatible(name: str, entry: dict, machine: Machine, artifact: Path) -> None:
    """Raise a one-line UserError naming every mismatch and the command that rebuilds."""
    problems = engine_problems(entry, machine)
    if problems:
        raise UserError(f"TensorRT engine '{name}' of {artifact} cannot run here: {'; '.join(problems)}; rebuild "
                        f"the engines on this machine with 'srexport engines {artifact} --force'")


def _cc(cc) -> str:
    return f"{cc[0]}.{cc[1]}"


def current_machine(trt=None) -> Machine:
    """The running TensorRT version and GPU 0 (as PyTorch sees it)."""
    version = getattr(trt, "__version__", None) if trt is not None else None
    try:
        import torch

        if torch.cuda.is_available():
            index = torch.cuda.current_device()
            return Machine(version, torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))
    except Exception:  # a broken CUDA install reads as "no GPU"
        pass
    return Machine(version, None, None)
