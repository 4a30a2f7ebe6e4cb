"""``srexport bench``: latency per stage against the PyTorch reference, with parity in the same run.

For every requested backend (and the precision it runs at), at every LR size:

1. A few seeded LR images are made (crops of the built-in sample, resized,
   flipped and lightly noised) and the PyTorch fp32 reference upscales each
   once: the parity oracle (on a GPU with TF32 off, so it is true fp32).
2. The backend's pipeline runs ``warmup`` times (excluded: first-call
   allocation, autotuning, torch.compile), then ``iters`` timed times, the
   inputs rotating so no run sees the previous run's input.
3. Each stage is timed by a ``runtime.timing`` timer: CUDA events on the
   runners' stream on a GPU, perf_counter on CPU (where every runner is
   synchronous). ``wall`` is the host's view of one whole call (ending with a
   device synchronisation); images/s, megapixels/s and speedups use it.
4. Peak memory over the timed runs: host RSS (kernel high-water mark), and on
   a GPU torch's allocator peak and the device-wide used memory.
5. The output of the first timed run of every input is compared with the
   reference's output for that input (PSNR over [0,1], max abs). A variant
   below its bound fails the run (exit status 1); the report is still written.
6. The cost model (``export.cost``) counts each stage's FLOPs and bytes from
   the artifact's graphs at the shapes the run used, giving achieved TFLOP/s
   and each stage's floor on the named GPU.

Variants: ``torch`` is the PyTorch eager baseline (fp32 on CPU; fp16 on a GPU,
plus ``torch-compile`` fp16 where torch.compile works); every other backend
runs the artifact's graphs at the artifact's precision through
``runtime.loading.load_pipeline``. An unknown backend name is refused before
anything runs (``BenchConfig.validate``, exit status 2). A backend that cannot
load here (missing library, no engines, no GPU) is listed as skipped with the
reason; a run that measured none of the variants it was asked for besides the
baseline (say ``--backends torch,trt`` on a CPU) fails (``passed`` false, one
line in ``failures``, exit status 1): it compared nothing. Asking for the
baseline alone (``--backends torch``) is a measurement of it and passes.

GPU runners tell the bench where they compute through their ``device``
attribute (absent means CPU). CUDA events are recorded on the stream the
pipeline runs on, which the runners join their own stream back to after each
call (see ``_runner_placement``).

JSON report, schema ``srexport.bench`` version 1 (``SCHEMA_VERSION``); times are
seconds, sizes are [width, height], memory is bytes, FLOPs are counts::

    schema, schema_version, created (ISO 8601 UTC), srexport_version
    artifact: {path, model, precision, demo, components: [names]}
    machine: {host, platform, cpu, cores, memory_bytes, python, torch, onnxruntime,
              cuda_device (name or null), cuda_capability, cuda_runtime}
    config: {backends, sizes, iters, warmup, inputs, device, threads (onnxruntime; null = its default),
             torch_threads, seed, timer, compile,
             min_psnr: {precision: dB}, max_abs (or null)}
    peaks: {gpu, name, tflops: {precision: TFLOP/s}, gbps}   # the floor's GPU
    cpu_rates: {gflops: {fp32, int8, bf16: sustained GEMM GFLOP/s measured here}, method, threads,
                side, bf16_native} (null when the bench runs on a GPU; cpu_rates.py)
    reference: {backend: "torch", precision: "fp32", device, tf32: false}
    baseline: variant name the speedups divide by (or null)
    variants: [{name, backend, precision, device, timer, baseline, status: ok|skipped|failed, reason}]
    sizes: [{lr_size, model_input_size (the encoder's first input: a tile when tiled), output_size,
             tiled (the pipelines tile this size; parity is then against the tiled reference),
             calls: {component: runner calls per image},
             cost: {stage: {flops, other_flops, weight_bytes, io_bytes, activation_bytes,
                            min_bytes, flops_by_op, dtype_bytes}} or null, cost_error}]
    results: [{variant, lr_size, output_size, iters, warmup, first_run_seconds,
               stages: {stage: STATS}, total: STATS, wall: STATS,
               images_per_second, output_megapixels_per_second,
               speedup: {end_to_end, stages: {stage: ratio}} (null without a baseline),
               memory: {host_peak_bytes, host_baseline_bytes, host_method,
                        device_used_peak_bytes, device_used_baseline_bytes, device_torch_peak_bytes},
               parity: {psnr_db (null = identical), max_abs, rel_l2, inputs_compared,
                        min_psnr, max_abs_bound, passed},
               roofline: {stage: {flops, achieved_tflops, floor_seconds, floor_over_median,
                                  cpu_fraction (CPU variants: achieved / this CPU's GEMM rate)}}}]
    failures: [one line per parity bound missed, or one saying nothing besides the baseline was measured],
    passed: bool
    STATS = {n, median, p90, mean, min, max, stdev}

``total`` is the timer's first-stage-start to last-stage-end; ``wall`` adds
the host's call overhead and the final synchronisation.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .artifact.precisions import PRECISIONS
from .errors import UserError
from .models.group_norm_stats import graph_modules
from .parity import compare
from .runtime.pipeline import STAGES, SRPipeline
from .runtime.runners import BACKENDS, TorchRunner
from .runtime.timing import DeviceMemoryProbe, HostMemoryProbe, make_timer, summarize

SCHEMA = "srexport.bench"
SCHEMA_VERSION = 1
# End-to-end PSNR bounds against the fp32 reference, per precision (dB, output in [0,1]).
# Looser than the build's (calibration.precision.BOUNDS): they also judge the PyTorch fp16
# eager baseline, which keeps no normalisation in fp32. They catch a broken backend.
DEFAULT_MIN_PSNR = {name: p.bench_min_psnr for name, p in PRECISIONS.items()}
ELEMENT_BYTES = {name: p.element_bytes for name, p in PRECISIONS.items()}
# What --backends accepts: the runtime's backends plus the torch.compile baseline, and the
# onnxruntime backends on the portable graphs (plain attention), to measure what fusion gives.
PLAIN_ATTENTION = "-plain"
ORT_BACKENDS = ("ort", "ort-cuda")
BENCH_BACKENDS = ("torch", "torch-compile", *(b for b in BACKENDS if b != "torch"),
                  *(b + PLAIN_ATTENTION for b in ORT_BACKENDS))


@dataclass
class BenchConfig:
    backends: list[str] = field(default_factory=lambda: ["torch", "ort"])
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(64, 64)])  # LR (width, height)
    iters: int = 20
    warmup: int = 3
    inputs: int = 3
    device: str = "auto"  # where the torch baseline runs: auto | cpu | cuda[:N]
    threads: int | None = None  # onnxruntime intra-op threads
    torch_threads: int | None = None  # torch intra-op threads for the run (default: torch's own)
    seed: int = 0
    timer: str = "auto"  # auto (CUDA events on GPU) | host (perf_counter + sync)
    compile: bool = True  # add torch.compile as a second baseline on a GPU
    min_psnr: dict[str, float] = field(default_factory=dict)  # per precision; "*" for all
    max_abs: float | None = None
    gpu: str = "auto"  # the floor's GPU: auto (the CUDA device's preset, else H100 SXM) or a GPU_PEAKS key
    peak_tflops: float | None = None
    peak_gbps: float | None = None
    base: str | None = None  # reference sources, if they moved since the build
    checkpoint: str | None = None
    de_net: str | None = None
    controls: object = None  # artifact.guidance.Controls: the guidance every variant and the reference run

    def validate(self) -> "BenchConfig":
        if (self.threads is not None and self.threads < 1) or (self.torch_threads is not None and self.torch_threads < 1):
            raise UserError("--threads and --torch-threads must be at least 1")
        if self.iters < 1 or self.warmup < 0 or self.inputs < 1:
            raise UserError("--iters and --inputs must be at least 1 and --warmup at least 0")
        if not self.backends:
            raise UserError(f"--backends is empty; name at least one of {', '.join(BENCH_BACKENDS)}")
        unknown = [b for b in dict.fromkeys(self.backends) if b not in BENCH_BACKENDS]
        if unknown:
            raise UserError(f"--backends {','.join(unknown)}: not {'a backend' if len(unknown) == 1 else 'backends'} "
                            f"srexport bench knows; name one or more of {', '.join(BENCH_BACKENDS)}")
        if not self.sizes or any(w < 1 or h < 1 for w, h in self.sizes):
            raise UserError("--sizes must list positive LR sizes, e.g. 128,512 or 96x128")
        if self.timer not in ("auto", "host"):
            raise UserError(f"--timer {self.timer!r} is not auto or host")
        if any(not v > 0 for v in self.min_psnr.values()) or (self.max_abs is not None and not self.max_abs > 0):
            raise UserError("--min-psnr and --max-abs must be positive numbers")
        return self

    def bound_for(self, precision: str) -> float:
        return self.min_psnr.get(precision, self.min_psnr.get("*", DEFAULT_MIN_PSNR.get(precision, 25.0)))


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"128,512" or "96x128" (width x height) -> [(w, h), ...]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            w, h = (int(v) for v in item.lower().split("x")) if "x" in item.lower() else (int(item),) * 2
        except ValueError:
            raise UserError(f"--sizes item {item!r} is not N or WxH (LR pixels)") from None
        out.append((w, h))
    return out


def parse_min_psnr(text: str) -> dict[str, float]:
    """"40" (every precision) or "fp32=50,fp16=35"."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.rpartition("=")
        try:
            out[key or "*"] = float(value)
        except ValueError:
            raise UserError(f"--min-psnr item {item!r} is not DB or PRECISION=DB") from None
    return out


# --- inputs ------------------------------------------------------------------------


def bench_inputs(width: int, height: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` distinct LR images (1,3,h,w) in [0,1]: seeded crops of the built-in sample,
    resized, flipped and lightly noised, so every run sees natural-looking content."""
    from .kernels import resize
    from .samples import sample_image

    sample = sample_image()
    side = sample.shape[-1]
    out = []
    for k in range(count):
        g = torch.Generator().manual_seed(seed * 1000 + k)
        crop = int(torch.randint(side // 2, side + 1, (1,), generator=g))
        y, x = (int(torch.randint(0, side - crop + 1, (1,), generator=g)) for _ in range(2))
        image = sample[..., y:y + crop, x:x + crop]
        if bool(torch.rand(1, generator=g) < 0.5):
            image = image.flip(-1)
        image = resize(image, (height, width), "bicubic")
        image = image + 0.01 * torch.randn(image.shape, generator=g)
        out.append(image.clamp(0, 1).contiguous())
    return out


# --- variants ----------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    backend: str
    precision: str
    device: str = "cpu"
    baseline: bool = False
    status: str = "ok"
    reason: str | None = None
    timer: str = ""
    pipeline: SRPipeline | None = field(default=None, repr=False)
    stream: object = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "backend": self.backend, "precision": self.precision, "device": self.device,
                "timer": self.timer or None, "baseline": self.baseline, "status": self.status,
                "reason": self.reason}


def _torch_pipeline(artifact, reference, device: str, precision: str, compiled: bool) -> SRPipeline:
    dtype = getattr(torch, PRECISIONS[precision].torch_dtype)
    modules = graph_modules(reference)
    runners = {}
    for name, spec in artifact.components.items():
        module = modules[name]
        if dtype != torch.float32 or compiled:
            module = copy.deepcopy(module).to(device=device, dtype=dtype).eval()
        if compiled:
            module = torch.compile(module)
        runners[name] = TorchRunner(module, spec, dtype)
    return SRPipeline(artifact.manifest, runners)


def _runner_placement(pipeline: SRPipeline) -> tuple[str, object]:
    """(device, timing stream). Events go on the stream the pipeline itself runs on (torch's
    current stream, where pre/post-processing run too): the GPU runners make their own stream
    wait for it before a call and make it wait for theirs after (``caller.wait_stream``), so an
    event recorded there after a call completes after that call's work. A runner that does not
    join back can name the stream to time on as ``timing_stream``."""
    runner = next(iter(pipeline.runners.values()))
    device = str(getattr(runner, "device", "cpu") or "cpu")
    stream = getattr(runner, "timing_stream", None)
    if isinstance(stream, int) and device.startswith("cuda"):
        stream = torch.cuda.ExternalStream(stream)
    return device, stream


def plan_variants(backends: list[str], device: str, compile_baseline: bool, precision: str) -> list[Variant]:
    """The variants to measure, in order: the baseline first."""
    gpu = device.startswith("cuda")
    out: list[Variant] = []
    seen = set()
    for backend in backends:
        if backend in seen:
            continue
        seen.add(backend)
        if backend == "torch":
            out.append(Variant("torch", "torch", "fp16" if gpu else "fp32", device, baseline=True))
            if gpu and compile_baseline and "torch-compile" not in backends:
                out.append(Variant("torch-compile", "torch-compile", "fp16", device))
                seen.add("torch-compile")
        elif backend == "torch-compile":
            out.append(Variant("torch-compile", "torch-compile", "fp16" if gpu else "fp32", device))
        else:
            out.append(Variant(backend, backend, precision))
    out.sort(key=lambda v: not v.baseline)
    return out


# --- the run -----------------------------------------------------------------------


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is visible to PyTorch here; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device!r} is not auto, cpu or cuda[:N]")
    return device


def machine() -> dict:
    import psutil

    info = {"host": platform.node(), "platform": platform.platform(), "cpu": _cpu_name(), "cores": os.cpu_count(),
            "memory_bytes": psutil.virtual_memory().total, "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
            "cuda_device": None, "cuda_capability": None, "cuda_runtime": torch.version.cuda}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
        info["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["cuda_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


def _version(name: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _ShapeRecorder:
    """Wraps a runner for one run and records each call's input shapes (tiles included)."""

    def __init__(self, runner, calls: list):
        self._runner, self._calls = runner, calls

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def __call__(self, feeds):
        self._calls.append({n: tuple(t.shape) for n, t in feeds.items()})
        return self._runner(feeds)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _round(x, digits=6):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(x, digits)


def run_bench(artifact_path: str | Path, config: BenchConfig, log: Callable[[str], None] | None = None) -> dict:
    """Measure every variant at every size; returns the JSON-ready report (schema above)."""
    saved = torch.get_num_threads()
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    try:
        return _run_bench(artifact_path, config, log)
    finally:
        torch.set_num_threads(saved)


def _run_bench(artifact_path, config: BenchConfig, log) -> dict:
    from .artifact.manifest import load_artifact
    from .export.cost import artifact_costs, resolve_peaks
    from .runtime.loading import load_pipeline, reference_for

    config.validate()
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    device = resolve_device(config.device)
    gpu = config.gpu
    if gpu == "auto":
        from .export.cost import DEFAULT_GPU, detect_gpu

        gpu = detect_gpu(torch.cuda.get_device_name(device)) if device.startswith("cuda") else DEFAULT_GPU
    peaks = resolve_peaks(gpu, config.peak_tflops, config.peak_gbps)
    artifact = load_artifact(artifact_path)
    precision = artifact.manifest["export"]["precision"]
    variants = plan_variants(config.backends, device, config.compile, precision)
    cpu_rates = None
    if any(v.device == "cpu" for v in variants):
        from .cpu_rates import measure_cpu_rates

        log("measuring this CPU's sustained GEMM rates (fp32, int8, bf16)")
        cpu_rates = measure_cpu_rates(config.threads)

    log(f"loading the PyTorch fp32 reference ({artifact.model}) on {device}")
    reference = reference_for(artifact, config.base, config.checkpoint, config.de_net)
    if device != "cpu":
        reference = reference.to(device)

    # Inputs and the reference's outputs for them: the parity oracle, fp32, TF32 off. Where the
    # artifact's pipelines tile an image, the oracle is the reference run the tiled way
    # (models.tiled_reference), so parity measures the backend, not what tiling changes.
    sizes = []
    planner = SRPipeline(artifact.manifest, {})
    planner.use_controls(config.controls)  # a bad option is refused before any timing
    resolved = planner.resolved
    for width, height in config.sizes:
        inputs = bench_inputs(width, height, config.inputs, config.seed)
        tiled = planner.will_tile(height, width)
        oracle = reference
        if tiled:
            from .models.tiled_reference import TiledReference

            oracle = TiledReference(reference, planner.tiling)
        expected = []
        with _no_tf32():
            for lr in inputs:
                expected.append(oracle(lr.to(device), resolved).float().cpu())
        sizes.append({"lr": (width, height), "inputs": inputs, "expected": expected, "tiled": tiled,
                      "tile_plan": planner.tile_plan(height, width) if tiled else {}})
        log(f"reference{' (tiled)' if tiled else ''}: {width}x{height} -> "
            f"{expected[0].shape[-1]}x{expected[0].shape[-2]} on {len(inputs)} inputs")

    report = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "srexport_version": __version__,
        "artifact": {"path": str(Path(artifact_path).absolute()), "model": artifact.model, "precision": precision,
                     "demo": bool(artifact.manifest["model"].get("demo")), "components": list(artifact.components)},
        "machine": machine(),
        "config": {"backends": list(config.backends), "sizes": [list(s) for s in config.sizes], "iters": config.iters,
                   "warmup": config.warmup, "inputs": config.inputs, "device": device, "threads": config.threads,
                   "torch_threads": torch.get_num_threads(),
                   "seed": config.seed, "timer": config.timer, "compile": config.compile,
                   "min_psnr": {v.precision: config.bound_for(v.precision) for v in variants},
                   "max_abs": config.max_abs,
                   "guidance": {k: v for k, v in vars(resolved).items() if k != "plan" and v is not None}},
        "peaks": peaks,
        "cpu_rates": cpu_rates,
        "reference": {"backend": "torch", "precision": "fp32", "device": device, "tf32": False},
        "baseline": next((v.name for v in variants if v.baseline), None),
        "variants": [],
        "sizes": [],
        "results": [],
    }
    size_info: dict[tuple, dict] = {}
    for variant in variants:
        _load_variant(variant, artifact, artifact_path, reference, device, config, load_pipeline)
        if variant.pipeline is not None:
            variant.pipeline.use_controls(config.controls)
        if variant.status != "ok":
            log(f"{variant.name}: skipped ({variant.reason})")
            continue
        for size in sizes:
            log(f"{variant.name} {variant.precision} on {variant.device}: {size['lr'][0]}x{size['lr'][1]}, "
                f"{config.warmup} warm-up + {config.iters} timed runs")
            try:
                result, calls = _measure(variant, size, config, need_shapes=size["lr"] not in size_info)
            except Exception as e:  # noqa: BLE001 - a backend that breaks mid-run is reported, not fatal
                if variant.backend == "torch-compile":
                    variant.status, variant.reason = "failed", f"torch.compile failed: {_one_line(e)}"
                    log(f"{variant.name}: {variant.reason}")
                    break
                raise
            if calls is not None:
                size_info[size["lr"]] = _size_entry(artifact, size, result, calls, artifact_costs)
            report["results"].append(result)
        variant.pipeline = None
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    report["variants"] = [v.to_dict() for v in variants]
    report["sizes"] = [size_info[s["lr"]] for s in sizes if s["lr"] in size_info]
    _derive(report, peaks)
    nothing = _nothing_measured(variants, config.backends)
    if nothing:
        report["failures"].append(nothing)
        report["passed"] = False
    return report


def _nothing_measured(variants: list[Variant], requested: list[str]) -> str | None:
    """The failure line for a run that measured none of the requested variants besides the
    baseline (None if it measured one, or was asked for the baseline alone). The baseline's
    own torch.compile companion, added unasked on a GPU, does not count as requested."""
    wanted = [v for v in variants if not v.baseline and v.name in requested]
    if not wanted or any(v.status == "ok" for v in wanted):
        return None
    baseline = next((v for v in variants if v.baseline and v.status == "ok"), None)
    missed = ", ".join(f"{v.name} ({v.status})" for v in wanted)
    measured = f"only the {baseline.name} baseline was measured" if baseline else "nothing was measured"
    return (f"{measured}: {missed} could not run here (reasons above); name a backend this machine runs, "
            f"e.g. ort")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class _no_tf32:
    """True fp32 on a GPU for the reference (cuDNN allows TF32 convolutions by default)."""

    def __enter__(self):
        self._saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._saved


def _load_variant(variant: Variant, artifact, artifact_path, reference, device, config, load_pipeline) -> None:
    try:
        if variant.backend in ("torch", "torch-compile"):
            compiled = variant.backend == "torch-compile"
            if variant.precision == "fp32" and not compiled:
                variant.pipeline = load_pipeline(artifact_path, backend="torch", reference=reference)
            else:
                variant.pipeline = _torch_pipeline(artifact, reference, device, variant.precision, compiled)
            variant.device = device
        else:
            backend = variant.backend.removesuffix(PLAIN_ATTENTION)
            attention = "plain" if backend != variant.backend else "fused"
            variant.pipeline = load_pipeline(artifact_path, backend=backend, threads=config.threads,
                                             attention=attention)
            variant.device, variant.stream = _runner_placement(variant.pipeline)
    except (UserError, ImportError) as e:
        variant.status, variant.reason = "skipped", str(e) or type(e).__name__
        return
    if variant.device.startswith("cuda") and not torch.cuda.is_available():
        variant.status, variant.reason = "skipped", "its runners compute on CUDA, which PyTorch cannot see here"
        variant.pipeline = None
        return
    variant.timer = make_timer(variant.device, variant.stream, config.timer).kind


def _measure(variant: Variant, size: dict, config: BenchConfig, need_shapes: bool):
    pipeline, device = variant.pipeline, variant.device
    inputs = [lr.to(device) for lr in size["inputs"]]
    k = len(inputs)
    calls = None

    def call(index: int, timer=None):
        _sync(device)
        t = time.perf_counter()
        out = pipeline.run_stages(inputs[index % k], timer)
        _sync(device)
        return out, time.perf_counter() - t

    # Warm-up (excluded). The first run records the graphs' input shapes for the cost model.
    first = None
    for i in range(config.warmup):
        if i == 0 and need_shapes:
            calls = _record_shapes(pipeline, lambda: call(i))
            first = calls.pop("_wall")
        else:
            wall = call(i)[1]
            first = wall if first is None else first
    samples: dict[str, list[float]] = {}
    totals, walls = [], []
    compared: dict[int, object] = {}
    output_size = None
    host = HostMemoryProbe()
    dev = DeviceMemoryProbe(device) if device.startswith("cuda") else None
    with host, (dev if dev is not None else contextlib.nullcontext()):
        for i in range(config.iters):
            index = (config.warmup + i) % k
            timer = make_timer(device, variant.stream, config.timer)
            out, wall = call(index, timer)
            for stage, seconds in out.seconds.items():
                samples.setdefault(stage, []).append(seconds)
            totals.append(out.total_seconds)
            walls.append(wall)
            if dev is not None:
                dev.sample()
            if index not in compared:
                actual = out.tensors["output"].float().cpu()
                output_size = (actual.shape[-1], actual.shape[-2])
                compared[index] = compare(actual, size["expected"][index], peak_to_peak=1.0)
            del out
    if need_shapes and calls is None:  # no warm-up: record on one extra, untimed run
        calls = _record_shapes(pipeline, lambda: call(0))
        calls.pop("_wall")
    worst_psnr = min(compared.values(), key=lambda p: p.psnr_db)
    worst_abs = max(p.max_abs for p in compared.values())
    worst_rel = max(p.rel_l2 for p in compared.values())
    bound = config.bound_for(variant.precision)
    passed = worst_psnr.psnr_db >= bound and (config.max_abs is None or worst_abs <= config.max_abs)
    wall_stats = summarize(walls)
    w, h = output_size
    result = {
        "variant": variant.name, "lr_size": list(size["lr"]), "output_size": [w, h],
        "iters": config.iters, "warmup": config.warmup,
        "first_run_seconds": _round(first),
        "stages": {s: summarize(samples[s]).to_dict() for s in STAGES if s in samples},
        "total": summarize(totals).to_dict(), "wall": wall_stats.to_dict(),
        "images_per_second": _round(1.0 / wall_stats.median, 4),
        "output_megapixels_per_second": _round(w * h / 1e6 / wall_stats.median, 4),
        "speedup": None,
        "memory": {"host_peak_bytes": host.peak, "host_baseline_bytes": host.baseline, "host_method": host.method,
                   "device_used_peak_bytes": dev.used_peak if dev else None,
                   "device_used_baseline_bytes": dev.used_baseline if dev else None,
                   "device_torch_peak_bytes": dev.torch_peak if dev else None},
        "parity": {"psnr_db": _round(worst_psnr.psnr_db, 3), "max_abs": worst_abs, "rel_l2": worst_rel,
                   "inputs_compared": len(compared), "min_psnr": bound, "max_abs_bound": config.max_abs,
                   "passed": bool(passed)},
        "roofline": {},
    }
    return result, calls


def _record_shapes(pipeline: SRPipeline, run) -> dict:
    calls: dict[str, list] = {}
    original = pipeline.runners
    pipeline.runners = {name: _ShapeRecorder(r, calls.setdefault(name, [])) for name, r in original.items()}
    try:
        _, wall = run()
    finally:
        pipeline.runners = original
    calls["_wall"] = wall
    return calls


def _size_entry(artifact, size: dict, result: dict, calls: dict, artifact_costs) -> dict:
    model_input = next((shapes for name, c in calls.items() for shapes in c[:1] if "image" in shapes), {})
    entry = {"lr_size": list(size["lr"]), "output_size": result["output_size"], "tiled": size["tiled"],
             # tiles per stage, their shape and computed area, and the work against an untiled pass
             "tile_plan": size["tile_plan"],
             "model_input_size": ([model_input["image"][-1], model_input["image"][-2]] if model_input else None),
             "calls": {name: len(c) for name, c in calls.items()}, "cost": None, "cost_error": None}
    try:
        per_component = artifact_costs(artifact, calls)
    except Exception as e:  # noqa: BLE001 - the cost model must not cost the user the measurements
        entry["cost_error"] = _one_line(e)
        return entry
    stages: dict = {}
    for component, cost in per_component.items():
        stage = artifact.components[component].stage  # the spec's role: time and FLOPs go to its stage
        stages[stage] = stages[stage] + cost if stage in stages else cost
    entry["cost"] = {stage: cost.to_dict() for stage, cost in stages.items()}
    return entry


def _cpu_rate(report: dict, device: str | None, precision: str) -> float | None:
    """GFLOP/s of this CPU's GEMM at the rate a variant's graphs run at (``cpu_rates``)."""
    from .cpu_rates import RATE_OF_PRECISION

    rates = (report.get("cpu_rates") or {}).get("gflops") or {}
    if device != "cpu":
        return None
    return rates.get(RATE_OF_PRECISION.get(precision, "fp32"))


def _derive(report: dict, peaks: dict) -> None:
    """Speedups against the baseline, roofline numbers, and the pass/fail verdict."""
    from .export.cost import GraphCost

    baseline = report["baseline"]
    by_key = {(r["variant"], tuple(r["lr_size"])): r for r in report["results"]}
    costs = {tuple(s["lr_size"]): s["cost"] for s in report["sizes"]}
    precisions = {v["name"]: v["precision"] for v in report["variants"]}
    devices = {v["name"]: v["device"] for v in report["variants"]}
    failures = []
    for r in report["results"]:
        base = by_key.get((baseline, tuple(r["lr_size"]))) if baseline else None
        if base is not None:
            r["speedup"] = {
                "end_to_end": _round(base["wall"]["median"] / r["wall"]["median"], 4),
                "stages": {s: _round(base["stages"][s]["median"] / st["median"], 4)
                           for s, st in r["stages"].items() if s in base["stages"] and st["median"] > 0},
            }
        precision = precisions.get(r["variant"], "fp32")
        rate = peaks["tflops"].get(precision, peaks["tflops"]["fp32"])
        for stage, c in (costs.get(tuple(r["lr_size"])) or {}).items():
            if stage not in r["stages"]:
                continue
            cost = GraphCost(**{k: v for k, v in c.items() if k != "min_bytes"})
            median = r["stages"][stage]["median"]
            floor = cost.floor_seconds(rate, peaks["gbps"], ELEMENT_BYTES.get(precision))
            r["roofline"][stage] = {"flops": cost.flops, "achieved_tflops": _round(cost.flops / median / 1e12, 6),
                                    "floor_seconds": _round(floor, 9), "floor_over_median": _round(floor / median, 6)}
            cpu_rate = _cpu_rate(report, devices.get(r["variant"]), precision)
            if cpu_rate:
                r["roofline"][stage]["cpu_fraction"] = _round(cost.flops / median / (cpu_rate * 1e9), 6)
        p = r["parity"]
        if not p["passed"]:
            psnr = "identical" if p["psnr_db"] is None else f"{p['psnr_db']:.2f} dB"
            text = (f"{r['variant']} at {r['lr_size'][0]}x{r['lr_size'][1]}: PSNR {psnr} "
                    f"(bound {p['min_psnr']:g} dB), max_abs {p['max_abs']:.2e}")
            if p["max_abs_bound"] is not None:
                text += f" (bound {p['max_abs_bound']:g})"
            failures.append(text)
    report["failures"] = failures
    report["passed"] = not failures


# --- the printed tables ------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _psnr(p: dict) -> str:
    return "inf" if p["psnr_db"] is None else f"{p['psnr_db']:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda row: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths)))
    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def format_report(report: dict) -> str:
    """The report as text: per LR size, latency per stage, throughput and parity, and the cost model."""
    cfg, m = report["config"], report["machine"]
    where = m["cuda_device"] if cfg["device"].startswith("cuda") else f"{m['cpu']} ({m['cores']} cores)"
    lines = [f"srexport bench  {report['artifact']['path']}  ({report['artifact']['model']}"
             f"{', DEMO weights' if report['artifact']['demo'] else ''})",
             f"machine: {where}; torch {m['torch']}, onnxruntime {m['onnxruntime']}",
             f"{cfg['warmup']} warm-up runs excluded, {cfg['iters']} timed runs over {cfg['inputs']} rotating inputs; "
             f"times in ms as median/p90; parity against the PyTorch fp32 reference on the same inputs"]
    variants = {v["name"]: v for v in report["variants"]}
    for v in report["variants"]:
        if v["status"] != "ok":
            lines.append(f"{v['name']}: {v['status']}: {v['reason']}")
    sizes = {tuple(s["lr_size"]): s for s in report["sizes"]}
    for lr in [tuple(s) for s in cfg["sizes"]]:
        results = [r for r in report["results"] if tuple(r["lr_size"]) == lr]
        if not results:
            continue
        out = results[0]["output_size"]
        info = sizes.get(lr, {})
        where = ""
        if info.get("model_input_size"):
            w, h = info["model_input_size"]
            where = (f" (tiled: {', '.join(f'{n} x{c}' for n, c in info['calls'].items())} calls, encoder input "
                     f"{w}x{h}; parity against the tiled reference)" if info.get("tiled") else
                     f" (model input {w}x{h})")
        lines += ["", f"LR {lr[0]}x{lr[1]} -> {out[0]}x{out[1]}{where}"]
        stages = [s for s in STAGES if any(s in r["stages"] for r in results)]
        rows = []
        for r in results:
            v = variants[r["variant"]]
            rows.append([v["name"] + (" (baseline)" if v["baseline"] else ""), v["precision"], v["device"],
                         *(f"{_ms(r['stages'][s]['median'])}/{_ms(r['stages'][s]['p90'])}" if s in r["stages"] else "-"
                           for s in stages),
                         f"{_ms(r['wall']['median'])}/{_ms(r['wall']['p90'])}"])
        lines += _table(["variant", "prec", "device", *stages, "end to end"], rows)
        rows = []
        for r in results:
            p, mem, sp = r["parity"], r["memory"], r["speedup"]
            peak = mem["device_used_peak_bytes"] if mem["device_used_peak_bytes"] is not None else mem["host_peak_bytes"]
            rows.append([r["variant"], f"{r['images_per_second']:.3g}", f"{r['output_megapixels_per_second']:.3g}",
                         f"{sp['end_to_end']:.2f}x" if sp else "-",
                         ("dev " if mem["device_used_peak_bytes"] is not None else "host ") + _bytes(peak),
                         _psnr(p), f"{p['max_abs']:.2e}", "ok" if p["passed"] else f"FAIL (< {p['min_psnr']:g} dB)"])
        lines += [""] + _table(["variant", "img/s", "MP/s", "speedup", "peak memory", "PSNR dB", "max abs",
                                "parity"], rows)
        cost = info.get("cost")
        if cost:
            peaks = report["peaks"]
            rows = []
            for stage in [s for s in STAGES if s in cost]:
                c = cost[stage]
                row = [stage, f"{c['flops'] / 1e9:.3g}", f"{c['min_bytes'] / 2**20:.1f}"]
                for r in results:
                    rl = r["roofline"].get(stage)
                    cpu = f" / {100 * rl['cpu_fraction']:.0f}% CPU" if rl and "cpu_fraction" in rl else ""
                    row.append(f"{rl['achieved_tflops']:.3g} / {_ms(rl['floor_seconds'])}{cpu}" if rl else "-")
                rows.append(row)
            rates = report.get("cpu_rates")
            here = ("; % CPU: of this CPU's measured GEMM rate (" + ", ".join(
                f"{k} {v:g} GFLOP/s" for k, v in rates["gflops"].items()) + ")") if rates else ""
            lines += ["", f"cost model (from the graphs): GFLOP, min MiB moved; per variant achieved TFLOP/s / floor ms "
                          f"on {peaks['name']} ({peaks['gbps']:g} GB/s){here}"]
            lines += _table(["stage", "GFLOP", "MiB", *(r["variant"] for r in results)], rows)
        elif info.get("cost_error"):
            lines.append(f"cost model unavailable: {info['cost_error']}")
    lines.append("")
    lines.append("FAILED: " + "; ".join(report["failures"]) if report["failures"] else "all parity bounds hold")
    return "\n".join(lines)
