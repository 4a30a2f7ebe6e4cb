"""The TensorRT backend: an artifact's engines run on one CUDA stream, no host round-trips.

``trt_runners(artifact)`` checks every engine's manifest record against the
running TensorRT and GPU (``artifact.compatibility.engine_problems``) before reading a
byte of it, then deserialises the engines and gives each a runner with the
same interface as ``OnnxRuntimeRunner`` (named torch tensors in and out).

Where the time goes, and what is done about it:
- Activation memory: one device block, the largest any of the artifact's
  engines needs, shared by all of them (``USER_MANAGED`` contexts +
  ``set_device_memory``). The runners execute one after another on one
  stream, so they never use the block at the same time.
- I/O buffers: allocated once per input shape (the tile shapes) as torch CUDA
  tensors, with a dedicated execution context per shape whose shapes and
  tensor addresses are set once.
- Launch overhead: each shape's ``execute_async_v3`` is captured once into a
  CUDA graph and replayed (a capture that TensorRT or CUDA refuses falls back
  to plain enqueues, with a warning).
- Data movement: feeds already on the GPU are copied device to device into
  the bound buffers; outputs come back as fresh CUDA tensors. The pipeline puts
  the LR image on ``runner.device`` once, so nothing crosses to the host
  between the uploaded LR image and the downloaded result.

This code cannot run on the development machines (no TensorRT, no GPU); see
README "Engines and GPU backends" for what was and was not executed.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..artifact.compatibility import ENGINES_COMMAND, check_engine_compatible, current_machine, engine_notes, require_tensorrt
from ..artifact.specs import ComponentSpec


def _torch_dtypes(trt) -> dict:
    import torch

    return {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
            trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.INT8: torch.int8,
            trt.DataType.UINT8: torch.uint8, trt.DataType.BOOL: torch.bool}


def _cuda_device():
    """The CUDA device the runners use (a seam: the tests put a CPU simulation here)."""
    import torch

    return torch.device("cuda", torch.cuda.current_device())


def missing_engines(manifest: dict) -> list[str]:
    return [name for name, c in manifest["components"].items() if "engine" not in c["files"] or "engine" not in c]


class EngineSet:
    """An artifact's engines on one GPU: one runtime, one stream, one shared activation-memory block."""

    def __init__(self, artifact, cuda_graphs: bool = True):
        manifest = artifact.manifest
        missing = missing_engines(manifest)
        if missing:
            raise UserError(f"artifact {artifact.folder} has no TensorRT engine for {', '.join(missing)}; build them "
                            f"on the GPU machine with '{ENGINES_COMMAND.replace('ARTIFACT', str(artifact.folder))}'")
        trt = require_tensorrt("--backend trt")
        import torch

        if not torch.cuda.is_available():
            raise UserError("--backend trt needs an NVIDIA GPU visible to PyTorch (torch.cuda.is_available() is "
                            "False: no GPU, or a CPU build of torch)")
        machine = current_machine(trt)
        for name, component in manifest["components"].items():
            check_engine_compatible(name, component["engine"], machine, artifact.folder)
        for note in dict.fromkeys(n for c in manifest["components"].values() for n in engine_notes(c["engine"], machine)):
            print(f"srexport: warning: {note}", file=sys.stderr)

        self.trt = trt
        self.device = _cuda_device()
        self.stream = torch.cuda.Stream(self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if any(c["engine"].get("version_compatible") for c in manifest["components"].values()):
            # Version-compatible plans carry their lean runtime (host code); these are the
            # artifact's own engines, sha256-verified by load_artifact.
            self.runtime.engine_host_code_allowed = True
        self.engines = {}
        for name in manifest["components"]:
            path: Path = artifact.component_file(name, "engine")
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise UserError(f"TensorRT could not load {path} (see its log above); rebuild with "
                                f"'srexport engines {artifact.folder} --force'")
            self.engines[name] = engine
        size = max(engine.device_memory_size_v2 for engine in self.engines.values())
        # 256-byte alignment is required; the caching allocator hands out 512-byte aligned blocks.
        self.memory = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        self.runners = {name: TensorRTRunner(self.engines[name], spec, self, cuda_graphs)
                        for name, spec in artifact.components.items()}


@dataclass
class _Bound:
    """One input shape: its own execution context, I/O buffers, and captured graph."""

    context: object
    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    graph: object = None


class TensorRTRunner:
    """One engine behind the runner interface: named tensors in (CPU or CUDA), CUDA tensors out."""

    backend = "trt"

    def __init__(self, engine, spec: ComponentSpec, shared: EngineSet, cuda_graphs: bool = True):
        trt = shared.trt
        self.spec, self.engine, self.shared = spec, engine, shared
        self.device, self.stream = shared.device, shared.stream  # every engine of the artifact runs on this stream
        self.cuda_graphs = cuda_graphs
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        outputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT}
        if inputs != set(spec.input_names) or outputs != set(spec.output_names):
            raise UserError(f"engine for {spec.name} has inputs {sorted(inputs)} and outputs {sorted(outputs)}, its "
                            f"spec names {spec.input_names} -> {spec.output_names}; rebuild the engines")
        dtypes = _torch_dtypes(trt)
        self.dtypes = {n: dtypes[engine.get_tensor_dtype(n)] for n in names}
        self.out_dtypes = {t.name: t.torch_dtype for t in spec.outputs}
        # (min, opt, max) of optimisation profile 0, the only one srexport builds.
        self.profile = {n: tuple(tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(n, 0))
                        for n in spec.input_names}
        batched = [t.name for t in spec.inputs if t.dims and t.dims[0] == "batch"]
        self.max_batch = min((self.profile[n][2][0] for n in batched), default=None)
        self._bound: dict[tuple, _Bound] = {}

    def __call__(self, feeds: dict):
        import torch

        first = self.spec.input_names[0]
        batch = feeds[first].shape[0]
        if self.max_batch is not None and batch > self.max_batch:
            # More tiles than the profile's batch: run them in chunks of the largest batch.
            parts = [self._run({n: feeds[n][i:i + self.max_batch] for n in self.spec.input_names})
                     for i in range(0, batch, self.max_batch)]
            return {n: torch.cat([p[n] for p in parts]) for n in self.spec.output_names}
        return self._run(feeds)

    def _run(self, feeds: dict) -> dict:
        import torch

        key = tuple(tuple(feeds[n].shape) for n in self.spec.input_names)
        bound = self._bound.get(key) or self._bind(key)
        stream = self.shared.stream
        caller = torch.cuda.current_stream(self.device)
        stream.wait_stream(caller)  # the feeds were made on the caller's stream
        with torch.cuda.stream(stream):
            for n in self.spec.input_names:
                bound.inputs[n].copy_(feeds[n], non_blocking=True)
            if bound.graph is not None:
                bound.graph.replay()
            elif not bound.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution of {self.spec.name} failed (see its log above)")
        caller.wait_stream(stream)
        # Fresh tensors on the caller's stream: the bound buffers are overwritten by the next call.
        return {n: bound.outputs[n].to(self.out_dtypes[n], copy=True) for n in self.spec.output_names}

    def _bind(self, key: tuple) -> _Bound:
        import torch

        trt = self.shared.trt
        for n, shape in zip(self.spec.input_names, key):
            lo, _, hi = self.profile[n]
            if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
                raise UserError(f"{self.spec.name}: input '{n}' has shape {list(shape)}, outside the engine's "
                                f"profile {list(lo)}..{list(hi)} (engines are built for the tile shape; rebuild "
                                "with 'srexport engines ARTIFACT --force' and other --tile-batch/tiling settings)")
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {self.spec.name}")
        context.set_device_memory(self.shared.memory.data_ptr(), self.shared.memory.numel())
        bound = _Bound(context)
        for n, shape in zip(self.spec.input_names, key):
            if not context.set_input_shape(n, shape):
                raise UserError(f"{self.spec.name}: TensorRT refused shape {list(shape)} for input '{n}'")
            bound.inputs[n] = torch.empty(shape, dtype=self.dtypes[n], device=self.device)
        for n in self.spec.output_names:
            shape = tuple(int(d) for d in context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.spec.name}: output '{n}' has unresolved shape {list(shape)}")
            bound.outputs[n] = torch.empty(shape, dtype=self.dtypes[n], device=self.device)
        for n, tensor in (*bound.inputs.items(), *bound.outputs.items()):
            context.set_tensor_address(n, tensor.data_ptr())
        if self.cuda_graphs:
            bound.graph = self._capture(context)
        self._bound[key] = bound
        return bound

    def _capture(self, context):
        """Record one enqueue into a CUDA graph; None (plain enqueues) where capture is refused."""
        import torch

        stream = self.shared.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        # One plain enqueue first: TensorRT defers shape-dependent setup to the first execution.
        with torch.cuda.stream(stream):
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution of {self.spec.name} failed (see its log above)")
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                ok = context.execute_async_v3(stream.cuda_stream)
            if not ok:
                raise RuntimeError("execute_async_v3 returned False during capture")
        except RuntimeError as exc:
            warnings.warn(f"{self.spec.name}: CUDA graph capture failed ({exc}); running without CUDA graphs")
            self.cuda_graphs = False
            return None
        return graph


def trt_runners(artifact, cuda_graphs: bool = True) -> dict:
    return EngineSet(artifact, cuda_graphs=cuda_graphs).runners


__all__ = ["EngineSet", "TensorRTRunner", "missing_engines", "trt_runners"]
