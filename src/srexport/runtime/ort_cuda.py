"""onnxruntime's CUDA execution provider behind the runner interface (``--backend ort-cuda``).

The artifact's ONNX graphs (the very files the CPU tests run) on the GPU,
with I/O bound to torch CUDA tensors (``IOBinding`` on ``data_ptr()``), so
tensors stay on the device between components. Buffers are allocated once
per input shape; each shape gets its own CUDA graph (``enable_cuda_graph`` with
one ``gpu_graph_id`` per shape) where onnxruntime allows it: it refuses graphs
whose nodes are not all on the CUDA provider, and then this runner runs
without graphs and says so once.

Needs the onnxruntime-gpu wheel (it replaces the CPU onnxruntime) and an
NVIDIA GPU; without them it fails with one line. Never executed on the
development machines (no GPU); see README "Engines and GPU backends".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from ..errors import UserError
from ..artifact.specs import ComponentSpec, Geometry, VAE_FACTOR
from .runners import session_options

NEEDS = "--backend ort-cuda needs onnxruntime-gpu and an NVIDIA GPU: pip install onnxruntime-gpu"
PROVIDER = "CUDAExecutionProvider"
DEVICE_TYPE = "cuda"  # IOBinding's name for the provider's memory

_ORT_TYPES = {"tensor(float)": ("float32", "float32"), "tensor(float16)": ("float16", "float16"),
              "tensor(bfloat16)": ("bfloat16", None), "tensor(int64)": ("int64", "int64"),
              "tensor(int32)": ("int32", "int32"), "tensor(bool)": ("bool", "bool_")}


def require_ort_cuda():
    """(onnxruntime, torch) where onnxruntime-gpu and a CUDA device are usable; else a one-line UserError."""
    import torch  # first: onnxruntime-gpu then finds the CUDA and cuDNN libraries torch loaded

    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"{NEEDS} (onnxruntime is not installed)") from None
    if PROVIDER not in ort.get_available_providers():
        raise UserError(f"{NEEDS} (this onnxruntime {ort.__version__} has no {PROVIDER}: it is the CPU wheel)")
    if not torch.cuda.is_available():
        raise UserError(f"{NEEDS} (torch.cuda.is_available() is False: no GPU, or a CPU build of torch)")
    return ort, torch


def _cuda_device():
    """The CUDA device the runners use (a seam: the tests put a CPU simulation here)."""
    import torch

    return torch.device("cuda", torch.cuda.current_device())


def output_shapes(spec: ComponentSpec, input_shapes: dict[str, tuple], scale: int) -> dict[str, tuple]:
    """The outputs' shapes from the inputs', by the spec's named dims (latent = pixels / 8, LR = pixels / scale)."""
    known: dict[str, int] = {}
    for tensor in spec.inputs:
        for dim, size in zip(tensor.dims, input_shapes[tensor.name]):
            if isinstance(dim, str):
                known[dim] = int(size)

    def pixels(axis: str) -> int:
        if axis in known:
            return known[axis]
        if f"latent_{axis}" in known:
            return known[f"latent_{axis}"] * VAE_FACTOR
        if f"lr_{axis}" in known:
            return known[f"lr_{axis}"] * scale
        return 0

    geometry = Geometry(known.get("batch", 1), pixels("height"), pixels("width"), scale)
    resolved = {**geometry.dims(), **known}
    return {t.name: tuple(d if isinstance(d, int) else resolved[d] for d in t.dims) for t in spec.outputs}


@dataclass
class _Bound:
    binding: object
    run_options: object
    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)


class OrtCudaRunner:
    """One ONNX graph on onnxruntime's CUDA provider: named tensors in (CPU or CUDA), CUDA tensors out."""

    backend = "ort-cuda"

    def __init__(self, path, spec: ComponentSpec, scale: int, cuda_graphs: bool = True):
        self.ort, torch = require_ort_cuda()
        self.path, self.spec, self.scale = str(path), spec, scale
        self.device = _cuda_device()
        self.stream = torch.cuda.Stream(self.device)
        self.cuda_graphs = cuda_graphs
        self.session = self._session()
        self._bound: dict[tuple, _Bound] = {}

    def _session(self):
        ort = self.ort
        try:
            session = ort.InferenceSession(self.path, session_options(ort),
                                           providers=[(PROVIDER, self._provider_options()), "CPUExecutionProvider"])
        except Exception as exc:
            if not self.cuda_graphs:
                raise
            warnings.warn(f"{self.spec.name}: onnxruntime refused CUDA graphs ({' '.join(str(exc).split())[:160]}); "
                          "running without them")
            self.cuda_graphs = False
            return self._session()
        if session.get_providers()[0] != PROVIDER:
            raise UserError(f"{NEEDS} (onnxruntime could not start {PROVIDER}: CUDA or cuDNN libraries missing?)")
        types = {v.name: v.type for v in (*session.get_inputs(), *session.get_outputs())}
        unknown = {n: t for n, t in types.items() if _ORT_TYPES.get(t, (None, None))[1] is None}
        if unknown:
            raise UserError(f"{self.spec.name}: I/O types {unknown} are not supported by the ort-cuda runner")
        self.types = {n: _ORT_TYPES[t] for n, t in types.items()}
        return session

    def _provider_options(self) -> dict:
        return {"device_id": str(self.device.index),
                # onnxruntime launches on this torch stream, so ordering against torch work is explicit
                "user_compute_stream": str(self.stream.cuda_stream),
                "cudnn_conv_algo_search": "EXHAUSTIVE",
                "cudnn_conv_use_max_workspace": "1",
                "enable_cuda_graph": "1" if self.cuda_graphs else "0"}

    def __call__(self, feeds: dict) -> dict:
        import torch

        key = tuple(tuple(feeds[n].shape) for n in self.spec.input_names)
        bound = self._bound.get(key) or self._bind(key)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            for n in self.spec.input_names:
                bound.inputs[n].copy_(feeds[n], non_blocking=True)
        try:
            self.session.run_with_iobinding(bound.binding, bound.run_options)
        except Exception as exc:
            if not self.cuda_graphs:
                raise
            # Capture refused at run time: rebuild the session without graphs and run again.
            warnings.warn(f"{self.spec.name}: CUDA graph capture failed in onnxruntime "
                          f"({' '.join(str(exc).split())[:160]}); running without CUDA graphs")
            self.cuda_graphs = False
            self.session, self._bound = self._session(), {}
            return self(feeds)
        caller.wait_stream(self.stream)
        return {n: bound.outputs[n].to(_torch_dtype(t.dtype), copy=True) for n, t in
                zip(self.spec.output_names, self.spec.outputs)}

    def _bind(self, key: tuple) -> _Bound:
        import numpy as np
        import torch

        run_options = self.ort.RunOptions()
        if self.cuda_graphs:
            # One graph per input shape; 0 is reserved by onnxruntime, -1 disables capture.
            run_options.add_run_config_entry("gpu_graph_id", str(len(self._bound) + 1))
        bound = _Bound(self.session.io_binding(), run_options)
        shapes = dict(zip(self.spec.input_names, key))
        index = self.device.index or 0
        for n, shape in shapes.items():
            torch_type, np_type = self.types[n]
            bound.inputs[n] = tensor = torch.empty(shape, dtype=getattr(torch, torch_type), device=self.device)
            bound.binding.bind_input(n, DEVICE_TYPE, index, getattr(np, np_type), list(shape), tensor.data_ptr())
        for n, shape in output_shapes(self.spec, shapes, self.scale).items():
            torch_type, np_type = self.types[n]
            bound.outputs[n] = tensor = torch.empty(shape, dtype=getattr(torch, torch_type), device=self.device)
            bound.binding.bind_output(n, DEVICE_TYPE, index, getattr(np, np_type), list(shape), tensor.data_ptr())
        self._bound[key] = bound
        return bound


def _torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16}[dtype]


def ort_cuda_runners(artifact, cuda_graphs: bool = True, attention: str = "fused") -> dict:
    from .runners import ort_graph

    require_ort_cuda()  # one clear line before any session is made
    scale = int(artifact.manifest["processing"]["scale"])
    return {name: OrtCudaRunner(ort_graph(artifact, name, attention), spec, scale, cuda_graphs)
            for name, spec in artifact.components.items()}


__all__ = ["OrtCudaRunner", "ort_cuda_runners", "output_shapes", "require_ort_cuda"]
