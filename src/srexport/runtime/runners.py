"""Interchangeable runners, one per component, in the spirit of Polygraphy's.

A runner is built from a component spec plus something that computes it (an
ONNX file, a PyTorch module) and does one thing: named input tensors in,
named output tensors out, by the spec's names. The pipeline only ever calls
``runner(feeds)``, so it never branches on the backend.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ..errors import UserError
from ..artifact.manifest import ATTENTIONS, ORT_GRAPH
from ..artifact.specs import ComponentSpec

BACKENDS = ("ort", "torch", "ort-cuda", "trt")

# Where each backend wants its inputs; the GPU runners carry their own ``device``.
CPU = torch.device("cpu")


class Runner(Protocol):
    spec: ComponentSpec
    backend: str
    device: torch.device  # the pipeline puts the LR image here once

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


# onnxruntime's CPU memory arena. "shared": one arena for every session of the process, registered
# once on onnxruntime's environment, so a pipeline of nine graphs holds the peak of its largest run
# rather than the sum of nine (demo, 4096x4096 output, fused attention: 2.87 -> 1.64 GB, and faster).
# "session": one per session, onnxruntime's default, grown in powers of two and never returned.
# "off": no arena (the least memory, slower on some graphs).
ARENAS = ("shared", "session", "off")
_shared_arena = []  # the registered allocator's config, once per process


def _use_shared_arena(ort, options) -> None:
    if not _shared_arena:
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        config = ort.OrtArenaCfg({"arena_extend_strategy": 0})  # kNextPowerOfTwo, as a session's own
        ort.create_and_register_allocator(memory, config)
        _shared_arena.append(config)
    options.add_session_config_entry("session.use_env_allocators", "1")


def session_options(ort, threads: int | None = None, arena: str = "shared", optimization: str = "ORT_ENABLE_ALL"):
    """The one way srexport sets up an onnxruntime session (CPU runner, CUDA runner, calibration)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    options.log_severity_level = 3
    # onnxruntime's pool spin-waits after each run; on a few cores that starves the
    # torch pre/post-processing running between graphs (seen: 1 ms -> 70-250 ms).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if arena not in ARENAS:
        raise ValueError(f"arena {arena!r} is not one of {ARENAS}")
    options.enable_cpu_mem_arena = arena != "off"
    if arena == "shared":
        _use_shared_arena(ort, options)
    return options


class OnnxRuntimeRunner:
    """Runs one ONNX graph with onnxruntime (CPU here; a provider list selects others)."""

    backend = "ort"
    device = CPU

    def __init__(self, path, spec: ComponentSpec, providers: list[str] | None = None, threads: int | None = None,
                 arena: str = "shared"):
        import onnxruntime as ort

        self.spec = spec
        self.session = ort.InferenceSession(str(path), session_options(ort, threads=threads, arena=arena),
                                            providers=providers or ["CPUExecutionProvider"])

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = {name: np.ascontiguousarray(feeds[name].detach().cpu().numpy()) for name in self.spec.input_names}
        outputs = self.session.run(self.spec.output_names, arrays)
        return {name: torch.from_numpy(value) for name, value in zip(self.spec.output_names, outputs)}


class TorchRunner:
    """Runs the PyTorch module a graph was exported from (the reference's own component)."""

    backend = "torch"

    def __init__(self, module: torch.nn.Module, spec: ComponentSpec, dtype: torch.dtype | None = None):
        """``dtype``: the module runs at it (bench's fp16/bf16 PyTorch baselines): inputs are cast
        to it on the module's device, outputs back to float32. None: the tensors as they are."""
        self.spec, self.dtype = spec, dtype
        self.module = module.eval()
        self.device = next(self.module.parameters(), torch.empty(0)).device

    @torch.no_grad()
    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = (feeds[name] for name in self.spec.input_names)
        if self.dtype is not None:
            inputs = (t.to(self.device, self.dtype) for t in inputs)
        out = self.module(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        if self.dtype is not None:
            outs = tuple(o.float() for o in outs)
        return dict(zip(self.spec.output_names, outs))


def ort_graph(artifact, name: str, attention: str = "fused"):
    """The graph onnxruntime runs for a component: its fused twin unless ``attention`` is plain
    or the artifact has none (no attention in it, an artifact built before fusion or without it)."""
    files = artifact.manifest["components"][name]["files"]
    return artifact.component_file(name, ORT_GRAPH if attention == "fused" and ORT_GRAPH in files else "onnx")


def ort_runners(artifact, threads: int | None = None, arena: str = "shared",
                attention: str = "fused") -> dict[str, Runner]:
    return {
        name: OnnxRuntimeRunner(ort_graph(artifact, name, attention), spec, threads=threads, arena=arena)
        for name, spec in artifact.components.items()
    }


def torch_runners(artifact, reference) -> dict[str, Runner]:
    from ..models.group_norm_stats import graph_modules

    modules = graph_modules(reference)
    return {name: TorchRunner(modules[name], spec) for name, spec in artifact.components.items()}


def check_attention(name: str) -> str:
    if name not in ATTENTIONS:
        raise UserError(f"--attention {name!r} is not one of {', '.join(ATTENTIONS)}")
    return name


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise UserError(f"--backend {name!r} is not one of {', '.join(BACKENDS)}")
    return name
