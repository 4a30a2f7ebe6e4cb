"""TensorRT engines and GPU backends, as far as this machine can check them.

Everywhere: profile derivation from the specs and the tile geometry; the
engine/machine compatibility rules with simulated versions and GPUs; the
engine build through Polygraphy's loaders against a recording fake
``tensorrt`` module (what each build was given: network flags, profile,
builder config, timing cache); the manifest the engines step writes; the
one-line errors where TensorRT, Polygraphy, an NVIDIA GPU or onnxruntime-gpu
are missing, a graph is rejected or a build fails; the static parser
check on the demo's graphs at fp32, fp16 and int8 (Q/DQ).
Where TensorRT (or onnxruntime-gpu) and a GPU exist: real engines, run and
compared with onnxruntime on CPU.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import itertools
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from srexport.cli import main
from srexport.errors import UserError
from srexport.export import engines
from srexport.artifact.manifest import load_artifact, read_manifest
from srexport.export.engines import (EngineOptions, Machine, check_engine_compatible, engine_geometries,
                                     engine_notes, engine_problems, engine_profiles, parser_check)
from srexport.artifact.specs import Geometry, degradation_spec, unet_spec, vae_decoder_spec, vae_encoder_spec
from srexport.export.trt_support import check_graph
from srexport.runtime.ort_cuda import output_shapes

H100 = Machine("11.4.0.106", "NVIDIA H100 80GB HBM3", (9, 0))
PISA_SPECS = {"vae_encoder": vae_encoder_spec(), "unet": unet_spec(), "vae_decoder": vae_decoder_spec()}
S3_PROCESSING = {"scale": 4, "upscale_filter": "bilinear", "color_fix": "wavelet", "min_lr_side": 0,
                 "size_policy": "reflect_pad", "size_multiple": 64}


# A demo artifact's files: the portable graphs and their attention-fused onnxruntime twins.
ARTIFACT_FILES = sorted(["manifest.json"] + [f"{n}{suffix}" for n in ("vae_encoder", "unet", "vae_decoder")
                                             for suffix in (".onnx", ".ort.onnx")])

def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def artifact_copy(demo_artifact, tmp_path):
    """A private copy of the session's demo artifact (the engines step writes into it)."""
    folder = tmp_path / "pisa"
    shutil.copytree(demo_artifact, folder)
    return folder


@pytest.fixture
def tiling(monkeypatch):
    """Stand in for runtime/tiling.py's ``tile_geometries(manifest, component)``: 96 px tiles, batch 2,
    and a 64 px smallest side (unpadded tiles of small images)."""
    module = types.ModuleType("srexport.runtime.tiling")

    def tile_geometries(manifest, component=None):
        assert component != "degradation"
        return Geometry(1, 64, 64), Geometry(2, 96, 96), Geometry(2, 96, 96)

    module.tile_geometries = tile_geometries
    monkeypatch.setitem(sys.modules, "srexport.runtime.tiling", module)
    monkeypatch.setattr(engines, "has_tiling", lambda manifest: True)  # whatever the demo's manifest says


def test_profiles_come_from_the_specs_at_the_tile_shape(tiling):
    manifest = {"processing": {"scale": 4, "min_lr_side": 32}}
    geometries, source = engine_geometries(manifest, PISA_SPECS, tile_batch=3)
    assert source.startswith("runtime.tiling.tile_geometries")
    assert [g.batch for g in geometries["unet"]] == [1, 3, 3]  # batch 1..--tile-batch
    profiles = engine_profiles(PISA_SPECS, geometries)
    assert profiles["vae_encoder"] == {"image": {"min": [1, 3, 64, 64], "opt": [3, 3, 96, 96],
                                                 "max": [3, 3, 96, 96]}}
    assert profiles["unet"] == {"latent": {"min": [1, 4, 8, 8], "opt": [3, 4, 12, 12], "max": [3, 4, 12, 12]}}
    assert profiles["vae_decoder"]["denoised"]["max"] == [3, 4, 12, 12]
    # without --tile-batch, the tiling's own batch
    assert [g.batch for g in engine_geometries(manifest, PISA_SPECS)[0]["unet"]] == [1, 2, 2]


def test_profiles_from_the_demo_artifacts_own_tiling(demo_artifact):
    manifest = read_manifest(demo_artifact)
    if "tiling" not in manifest:
        pytest.skip("this build writes no tiling section yet")
    from srexport.runtime.tiling import tile_geometries

    specs = load_artifact(demo_artifact, verify=False).components
    profiles = engine_profiles(specs, engine_geometries(manifest, specs)[0])
    for name, spec in specs.items():
        lo, opt, hi = tile_geometries(manifest, name)
        for tensor in spec.inputs:
            assert profiles[name][tensor.name]["max"] == list(tensor.shape(hi)), name
            assert profiles[name][tensor.name]["min"][0] == 1


def test_artifact_without_tiling_gets_whole_image_profiles():
    geometries, source = engine_geometries({"processing": {"scale": 4, "min_lr_side": 32}}, {"unet": unet_spec()}, 2)
    assert [(g.batch, g.height) for g in geometries["unet"]] == [(1, 64), (2, 128), (2, 256)]
    assert "no tiling" in source


def test_whole_image_component_spans_image_sizes_at_batch_one(tiling):
    manifest = {"processing": S3_PROCESSING}
    specs = {"degradation": degradation_spec(), "unet": unet_spec(with_scores=True)}
    profiles = engine_profiles(specs, engine_geometries(manifest, specs, tile_batch=4)[0])
    assert profiles["degradation"]["lr_image"] == {"min": [1, 3, 16, 16], "opt": [1, 3, 128, 128],
                                                   "max": [1, 3, 2048, 2048]}
    assert profiles["unet"]["scores"] == {"min": [1, 2], "opt": [4, 2], "max": [4, 2]}


@pytest.mark.parametrize("bad, match", [({"tile_batch": 0}, "--tile-batch"), ({"opt_level": 6}, "--opt-level"),
                                        ({"workspace_gib": 0}, "--workspace-gib"),
                                        ({"hardware_compat": "turing"}, "--hardware-compat")])
def test_engine_options_are_validated(bad, match):
    with pytest.raises(UserError, match=match):
        EngineOptions(**bad).validate()


def test_output_shapes_follow_the_named_dims():
    scale = 4
    assert output_shapes(vae_decoder_spec(), {"denoised": (2, 4, 16, 24)}, scale) == {"decoded": (2, 3, 128, 192)}
    assert output_shapes(vae_encoder_spec(True), {"image": (3, 3, 64, 64), "scores": (3, 2)}, scale) == {
        "latent": (3, 4, 8, 8)}
    assert output_shapes(degradation_spec(), {"lr_image": (1, 3, 30, 41)}, scale) == {"scores": (1, 2)}


# ---- compatibility of an engine with the running machine (simulated) --------------------------------


def _entry(**kw):
    entry = {"tensorrt_version": "11.4.0.106", "device_name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0],
             "hardware_compatibility_level": "NONE", "version_compatible": False}
    entry.update(kw)
    return entry


def test_same_machine_is_compatible():
    assert engine_problems(_entry(), H100) == [] and engine_notes(_entry(), H100) == []
    # the build number is not part of the check
    assert engine_problems(_entry(tensorrt_version="11.4.0.200"), H100) == []


def test_other_compute_capability_is_refused_unless_ampere_plus():
    ada = Machine("11.4.0.106", "NVIDIA L40S", (8, 9))
    problems = engine_problems(_entry(), ada)
    assert len(problems) == 1 and "compute capability 9.0" in problems[0] and "8.9" in problems[0]
    assert engine_problems(_entry(hardware_compatibility_level="SAME_COMPUTE_CAPABILITY"), ada) != []
    assert engine_problems(_entry(hardware_compatibility_level="AMPERE_PLUS"), ada) == []
    turing = Machine("11.4.0.106", "Tesla T4", (7, 5))
    assert "Ampere" in engine_problems(_entry(hardware_compatibility_level="AMPERE_PLUS"), turing)[0]
    # AMPERE_PLUS does not lift the TensorRT version rule
    assert engine_problems(_entry(hardware_compatibility_level="AMPERE_PLUS"),
                           Machine("11.5.0.1", "NVIDIA L40S", (8, 9))) != []


def test_same_compute_capability_other_gpu_model():
    h200 = Machine("11.4.0.106", "NVIDIA H200", (9, 0))
    assert engine_problems(_entry(), h200) == []
    assert "NVIDIA H100" in engine_notes(_entry(), h200)[0]
    assert engine_notes(_entry(hardware_compatibility_level="SAME_COMPUTE_CAPABILITY"), h200) == []


@pytest.mark.parametrize("built, running, version_compatible, ok", [
    ("11.4.0.106", "11.3.0.1", False, False),
    ("11.4.0.106", "11.5.0.1", False, False),
    ("11.4.0.106", "11.4.1.2", False, False),
    ("11.4.0.106", "11.5.0.1", True, True),    # later minor of the same major
    ("11.4.0.106", "11.3.0.1", True, False),   # never an older runtime
    ("10.8.0.43", "11.4.0.106", True, True),   # 10 -> 11 is a supported cross-major pair
    ("10.8.0.43", "11.4.0.106", False, False),
    ("11.4.0.106", "12.0.0.1", True, False),   # no other cross-major pair
])
def test_tensorrt_version_rules(built, running, version_compatible, ok):
    problems = engine_problems(_entry(tensorrt_version=built, version_compatible=version_compatible),
                               Machine(running, H100.device_name, (9, 0)))
    assert (problems == []) == ok, problems


def test_missing_tensorrt_or_gpu_and_the_error_message():
    problems = engine_problems(_entry(), Machine(None, None, None))
    assert any("TensorRT is not installed" in p for p in problems) and any("no NVIDIA GPU" in p for p in problems)
    with pytest.raises(UserError, match=r"cannot run here: .*compute capability 9\.0.*srexport engines art --force"):
        check_engine_compatible("unet", _entry(), Machine("11.4.0.106", "NVIDIA A100", (8, 0)), Path("art"))


# ---- the build, through Polygraphy, against a recording fake tensorrt -------------------------------


_FAKE_IDS = itertools.count()


def fake_tensorrt(calls: list, version: str = "11.4.0.106", parse_errors: tuple = (), build_fails: bool = False,
                  rejected_caches: tuple = ()) -> types.ModuleType:
    """Just enough of the tensorrt module for export.engines and Polygraphy's loaders, recording every
    call in order. Each build records what it was given (``("build_serialized_network", built)``): the
    network's creation flags and the builder config's state at that moment; it logs one INFO and one
    WARNING line through the logger its builder was made with (``trt.fake_warning``)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.fake_warning = f"fake TensorRT warning {next(_FAKE_IDS)}"  # Polygraphy logs a warning once a process

    class ILogger:
        def __init__(self):
            pass

    class Logger(ILogger):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = "INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"

        def __init__(self, level=WARNING):
            calls.append(("Logger", level))

    trt.ILogger, trt.Logger = ILogger, Logger
    # Enums where Polygraphy lists members or takes int(); plain names elsewhere.
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 5})
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", {"TF32": 7, "VERSION_COMPATIBLE": 18})
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    trt.HardwareCompatibilityLevel = types.SimpleNamespace(NONE="NONE", AMPERE_PLUS="AMPERE_PLUS",
                                                           SAME_COMPUTE_CAPABILITY="SAME_COMPUTE_CAPABILITY")
    trt.ProfilingVerbosity = types.SimpleNamespace(LAYER_NAMES_ONLY="LAYER_NAMES_ONLY", DETAILED="DETAILED",
                                                   NONE="NONE")
    trt.DeviceType = types.SimpleNamespace(GPU="GPU", DLA="DLA")

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs = flags, []

        def get_flag(self, flag):
            return bool(self.flags & (1 << int(flag)))

        def __iter__(self):  # the layers; none set a precision
            return iter(())

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i], dtype="FLOAT", shape=(-1, -1, -1, -1),
                                         is_shape_tensor=False)

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            calls.append(("OnnxParser",))

        def parse_from_file(self, path):
            calls.append(("parse_from_file", Path(path).name))
            self.network.onnx = str(path)
            self.network.inputs = [i.name for i in onnx.load(path, load_external_data=False).graph.input]
            return not parse_errors

        @property
        def num_errors(self):
            return len(parse_errors)

        def get_error(self, i):
            return parse_errors[i]

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return b"timing-cache:" + self.data

    class Config:
        DLA_core = -1
        default_device_type = "GPU"

        def __init__(self):
            for name, value in (("flags", set()), ("pools", {}), ("profiles", []), ("timing_cache", None)):
                object.__setattr__(self, name, value)

        def __setattr__(self, name, value):
            calls.append((name, value))
            object.__setattr__(self, name, value)

        def set_flag(self, flag):
            calls.append(("set_flag", flag.name))
            self.flags.add(flag)

        def clear_flag(self, flag):
            calls.append(("clear_flag", flag.name))
            self.flags.discard(flag)

        def get_flag(self, flag):
            return flag in self.flags

        def set_memory_pool_limit(self, pool, size):
            calls.append(("set_memory_pool_limit", pool.name, size))
            self.pools[pool] = size

        def get_memory_pool_limit(self, pool):
            return self.pools.get(pool, 80 * 2**30)

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", bytes(data)))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", cache.data, ignore_mismatch))
            if cache.data in rejected_caches:
                return False
            object.__setattr__(self, "timing_cache", cache)
            return True

        def add_optimization_profile(self, profile):
            calls.append(("add_optimization_profile", profile.shapes))
            self.profiles.append(profile.shapes)

        @property
        def num_optimization_profiles(self):
            return len(self.profiles)

    class OptimizationProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            calls.append(("set_shape", name, list(lo), list(opt), list(hi)))
            self.shapes[name] = (list(lo), list(opt), list(hi))

    class Builder:
        def __init__(self, logger):
            self.logger = logger
            calls.append(("Builder",))

        def create_network(self, flags=0):
            calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            calls.append(("create_builder_config",))
            return Config()

        def create_optimization_profile(self):
            calls.append(("create_optimization_profile",))
            return OptimizationProfile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network", {
                "onnx": Path(network.onnx).name, "network_flags": network.flags,
                "flags": sorted(f.name for f in config.flags),
                "builder_optimization_level": getattr(config, "builder_optimization_level", None),
                "memory_pool_limits": {pool.name: size for pool, size in config.pools.items()},
                "hardware_compatibility_level": getattr(config, "hardware_compatibility_level", "NONE"),
                "profiling_verbosity": getattr(config, "profiling_verbosity", None),
                "profiles": list(config.profiles), "timing_cache": config.timing_cache}))
            self.logger.log(Logger.INFO, "fake TensorRT info line")
            self.logger.log(Logger.WARNING, trt.fake_warning)
            if build_fails:
                return None
            # The fake "plan": what the fake runtime below needs to run the graph with onnxruntime.
            return json.dumps({"onnx": network.onnx, "profile": config.profiles[0]}).encode()

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    _add_fake_runtime(trt, calls)
    return trt


# A CPU simulation of the TensorRT runtime and of CUDA streams and graphs: engines are
# onnxruntime sessions that read and write tensors at the raw addresses bound with
# set_tensor_address, and a "captured" graph replays exactly the enqueues made during
# capture (with the addresses of that moment), as a real CUDA graph does.
_CAPTURING: list = []


def _at(address: int, shape) -> np.ndarray:
    count = int(np.prod(shape))
    return np.frombuffer((ctypes.c_float * count).from_address(address), dtype=np.float32).reshape(shape)


def _add_fake_runtime(trt, calls: list) -> None:
    import onnxruntime as ort

    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.DataType = types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", BF16="BF16", INT32="INT32", INT64="INT64",
                                         INT8="INT8", UINT8="UINT8", BOOL="BOOL")
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="USER_MANAGED", STATIC="STATIC")

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_device_memory(self, address, size):
            calls.append(("set_device_memory", size))
            assert size >= engine_memory

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.profile[name]
            self.shapes[name] = tuple(shape)
            return len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))

        def get_tensor_shape(self, name):
            if name not in self.shapes:  # an output: shape inference by running on zeros
                feeds = {n: np.zeros(self.shapes[n], np.float32) for n in self.engine.inputs}
                for n, value in zip(self.engine.outputs, self.engine.session.run(None, feeds)):
                    self.shapes[n] = value.shape
            return self.shapes[name]

        def set_tensor_address(self, name, address):
            self.addresses[name] = address

        def execute_async_v3(self, stream_handle):
            assert stream_handle == FakeStream.cuda_stream
            addresses, shapes = dict(self.addresses), dict(self.shapes)

            def run():
                feeds = {n: _at(addresses[n], shapes[n]).copy() for n in self.engine.inputs}
                for n, value in zip(self.engine.outputs, self.engine.session.run(None, feeds)):
                    _at(addresses[n], shapes[n])[...] = value

            if _CAPTURING:
                _CAPTURING[-1].ops.append(run)
            else:
                run()
                calls.append(("execute_async_v3",))
            return True

    engine_memory = 4096

    class Engine:
        device_memory_size_v2 = engine_memory

        def __init__(self, plan: dict):
            self.path = plan["onnx"]
            graph = onnx.load(self.path, load_external_data=False).graph
            self.inputs = [i.name for i in graph.input]
            self.outputs = [o.name for o in graph.output]
            self.profile = {n: [tuple(s) for s in shapes] for n, shapes in plan["profile"].items()}

        @functools.cached_property
        def session(self):  # made when first run (session creation dominates these tests' time)
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as OnnxRuntimeRunner
            return ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])

        @property
        def num_io_tensors(self):
            return len(self.inputs) + len(self.outputs)

        def get_tensor_name(self, i):
            return (self.inputs + self.outputs)[i]

        def get_tensor_mode(self, name):
            return "INPUT" if name in self.inputs else "OUTPUT"

        def get_tensor_dtype(self, name):
            return "FLOAT"

        def get_tensor_profile_shape(self, name, index):
            assert index == 0
            return self.profile[name]

        def create_execution_context(self, strategy):
            calls.append(("create_execution_context", strategy))
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, plan):
            return Engine(json.loads(bytes(plan)))

    trt.Runtime = Runtime


class FakeStream:
    cuda_stream = 0x5EED

    def __init__(self, device=None):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


class FakeGraph:
    def __init__(self):
        self.ops = []

    def replay(self):
        for op in self.ops:
            op()


class _Capture:
    def __init__(self, graph, stream=None, capture_error_mode="global"):
        self.graph = graph

    def __enter__(self):
        _CAPTURING.append(self.graph)

    def __exit__(self, *exc):
        _CAPTURING.pop()


@pytest.fixture
def simulated_cuda(monkeypatch):
    """torch.cuda's streams and graphs as CPU stand-ins, and the runners' device set to the CPU."""
    import contextlib

    from srexport.runtime import ort_cuda, trt_runner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _Capture)
    for module in (trt_runner, ort_cuda):
        monkeypatch.setattr(module, "_cuda_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(trt_runner, "current_machine",
                        lambda trt=None: Machine(trt.__version__, H100.device_name, H100.compute_capability))


def _polygraphy_uses(trt, monkeypatch) -> None:
    """Point Polygraphy at ``trt`` for one test. Its modules bind tensorrt lazily, once a process, and
    make their TensorRT logger from that binding once: both would keep the first test's fake (and hand
    it to a later test, a real-TensorRT one included)."""
    import polygraphy.backend.trt  # noqa: F401  (loads the modules that hold a binding)

    for name, module in list(sys.modules.items()):
        binding = getattr(module, "__dict__", {}).get("trt")
        if name.startswith("polygraphy") and type(binding).__name__ == "LazyModule":
            monkeypatch.setattr(module, "trt", trt)
    monkeypatch.setattr(sys.modules["polygraphy.backend.trt.util"], "TRT_LOGGER", None)


@pytest.fixture
def fake_gpu(monkeypatch):
    def install(calls, **kw):
        trt = fake_tensorrt(calls, **kw)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        _polygraphy_uses(trt, monkeypatch)
        monkeypatch.setattr(engines, "current_machine",
                            lambda trt=None: Machine(trt.__version__, H100.device_name, H100.compute_capability))
        return trt
    return install


def _builds(calls: list) -> list[dict]:
    return [c[1] for c in calls if c[0] == "build_serialized_network"]


def test_engines_are_built_through_polygraphy_with_the_spec_and_options(artifact_copy, fake_gpu, tiling, capsys):
    calls: list = []
    trt = fake_gpu(calls)
    onnx_hashes = {k: v["sha256"] for k, v in read_manifest(artifact_copy)["files"].items()}
    assert main(["engines", str(artifact_copy), "--tile-batch", "2", "--opt-level", "5", "--workspace-gib", "1",
                 "--hardware-compat", "ampere+", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(artifact_copy)  # TensorRT's log goes to stderr, at WARNING
    assert trt.fake_warning in err and "fake TensorRT info line" not in err
    assert not [line for line in err.splitlines() if line.startswith("[I]")]  # nor Polygraphy's own INFO

    builds = _builds(calls)
    assert [b["onnx"] for b in builds] == ["vae_encoder.onnx", "unet.onnx", "vae_decoder.onnx"]
    for build in builds:
        assert build["network_flags"] == 1 << 5  # STRONGLY_TYPED alone
        assert build["flags"] == ["TF32"]  # TensorRT's default; no precision flags
        assert build["builder_optimization_level"] == 5
        assert build["memory_pool_limits"] == {"WORKSPACE": 2**30}
        assert build["hardware_compatibility_level"] == "AMPERE_PLUS"
        assert build["profiling_verbosity"] == "LAYER_NAMES_ONLY"  # TensorRT's default, not Polygraphy's
    assert builds[0]["profiles"] == [{"image": ([1, 3, 64, 64], [2, 3, 96, 96], [2, 3, 96, 96])}]
    assert builds[1]["profiles"] == [{"latent": ([1, 4, 8, 8], [2, 4, 12, 12], [2, 4, 12, 12])}]
    assert builds[2]["profiles"] == [{"denoised": ([1, 4, 8, 8], [2, 4, 12, 12], [2, 4, 12, 12])}]
    # each graph parsed (by path) into its network before its config is made
    kinds = [c[0] for c in calls]
    assert [calls[i + 1] for i, k in enumerate(kinds) if k == "OnnxParser"] == [
        ("parse_from_file", f"{n}.onnx") for n in ("vae_encoder", "unet", "vae_decoder")]
    assert kinds.index("parse_from_file") < kinds.index("create_builder_config")
    # one timing cache, started empty, shared by every build, written beside the artifact
    assert len({id(b["timing_cache"]) for b in builds}) == 1 and builds[0]["timing_cache"].data == b""
    cache = artifact_copy.parent / "pisa.trt-timing-cache"
    assert cache.read_bytes() == b"timing-cache:"

    artifact = load_artifact(artifact_copy)  # every hash, engines included, verifies
    manifest = artifact.manifest
    assert {k: v["sha256"] for k, v in manifest["files"].items() if k in onnx_hashes} == onnx_hashes
    unet = manifest["components"]["unet"]
    assert json.loads(artifact.component_file("unet", "engine").read_bytes())["onnx"].endswith("unet.onnx")
    record = unet["engine"]
    assert record["sha256"] == manifest["files"]["unet.engine"]["sha256"]
    assert {k: record[k] for k in ("tensorrt_version", "device_name", "compute_capability",
                                   "hardware_compatibility_level", "version_compatible", "precision",
                                   "builder_optimization_level", "workspace_bytes", "strongly_typed")} == {
        "tensorrt_version": "11.4.0.106", "device_name": H100.device_name, "compute_capability": [9, 0],
        "hardware_compatibility_level": "AMPERE_PLUS", "version_compatible": False,
        "precision": manifest["export"]["precision"],
        "builder_optimization_level": 5, "workspace_bytes": 2**30, "strongly_typed": True}
    assert record["profiles"] == {"latent": {"min": [1, 4, 8, 8], "opt": [2, 4, 12, 12], "max": [2, 4, 12, 12]}}
    assert manifest["engines"]["tile_batch"] == 2
    assert engine_problems(record, H100) == []
    assert engine_problems(record, Machine("11.4.0.106", "NVIDIA A100", (8, 0))) == []  # ampere+
    assert main(["inspect", str(artifact_copy)]) == 0
    assert "TensorRT 11.4.0.106 engine for NVIDIA H100 80GB HBM3 (sm 9.0, hardware compat AMPERE_PLUS)" in \
        capsys.readouterr().out

    # A second run needs --force; it reuses the timing cache and replaces the engines.
    assert main(["engines", str(artifact_copy), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    calls.clear()
    assert main(["engines", str(artifact_copy), "--force", "--quiet", "--version-compatible"]) == 0
    builds = _builds(calls)
    assert len({id(b["timing_cache"]) for b in builds}) == 1
    assert builds[0]["timing_cache"].data == b"timing-cache:"  # the file's bytes
    assert all(b["flags"] == ["TF32", "VERSION_COMPATIBLE"] for b in builds)
    # no --workspace-gib: no pool limit; no --hardware-compat: TensorRT's NONE; the default opt level
    assert all(b["memory_pool_limits"] == {} and b["hardware_compatibility_level"] == "NONE"
               and b["builder_optimization_level"] == 3 for b in builds)
    assert load_artifact(artifact_copy).manifest["components"]["unet"]["engine"]["version_compatible"] is True


def test_timing_cache_from_another_gpu_is_replaced(artifact_copy, fake_gpu, tiling, capsys):
    cache = artifact_copy.parent / "pisa.trt-timing-cache"
    cache.write_bytes(b"other-gpu")
    calls: list = []
    fake_gpu(calls, rejected_caches=(b"other-gpu",))
    assert main(["engines", str(artifact_copy)]) == 0
    assert f"timing cache {cache} is from another GPU or TensorRT; starting a new one" in capsys.readouterr().err
    assert {b["timing_cache"].data for b in _builds(calls)} == {b""}
    assert cache.read_bytes() == b"timing-cache:"


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_parser_rejection_leaves_the_artifact_as_it_was(artifact_copy, fake_gpu, tiling, capsys):
    fake_gpu([], parse_errors=("In node 7 (Conv): unsupported",))
    before = (artifact_copy / "manifest.json").read_bytes()
    assert main(["engines", str(artifact_copy), "--quiet"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "TensorRT's ONNX parser rejected vae_encoder.onnx: In node 7 (Conv): unsupported" in err
    assert (artifact_copy / "manifest.json").read_bytes() == before
    assert _files(artifact_copy) == ARTIFACT_FILES


def test_graph_inputs_not_matching_the_spec(artifact_copy, fake_gpu, tiling, capsys, monkeypatch):
    from srexport.artifact.specs import ComponentSpec

    fake_gpu([])
    monkeypatch.setattr(ComponentSpec, "input_names", property(lambda self: ["pixels"]))
    assert main(["engines", str(artifact_copy), "--quiet"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "vae_encoder.onnx has inputs ['image'], its spec names ['pixels']; rebuild the artifact" in err


def test_failed_build_names_the_options_and_leaves_the_artifact(artifact_copy, fake_gpu, tiling, capsys):
    calls: list = []
    trt = fake_gpu(calls, build_fails=True)
    before = (artifact_copy / "manifest.json").read_bytes()
    assert main(["engines", str(artifact_copy), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert trt.fake_warning in err  # TensorRT's log, above the one line that says what to do
    last = err.strip().splitlines()[-1]
    assert "TensorRT could not build an engine from vae_encoder.onnx (see its log above); " \
           "try a larger --workspace-gib or a smaller --tile-batch" in last
    assert len(_builds(calls)) == 1
    assert (artifact_copy / "manifest.json").read_bytes() == before
    assert _files(artifact_copy) == ARTIFACT_FILES
    assert not (artifact_copy.parent / "pisa.trt-timing-cache").exists()


def test_engines_without_polygraphy(artifact_copy, fake_gpu, tiling, monkeypatch, capsys):
    fake_gpu([])
    for name in [n for n in sys.modules if n == "polygraphy" or n.startswith("polygraphy.")]:
        monkeypatch.setitem(sys.modules, name, None)
    before = (artifact_copy / "manifest.json").read_bytes()
    assert main(["engines", str(artifact_copy)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "'polygraphy'" in err and "pip install 'srexport[tensorrt]'" in err
    assert (artifact_copy / "manifest.json").read_bytes() == before


# ---- the GPU runners' logic, simulated on the CPU -----------------------------------------------------


def test_trt_runner_binds_chunks_captures_and_replays(artifact_copy, fake_gpu, tiling, simulated_cuda):
    from srexport.runtime.runners import OnnxRuntimeRunner
    from srexport.runtime.trt_runner import EngineSet

    calls: list = []
    fake_gpu(calls)
    assert main(["engines", str(artifact_copy), "--quiet"]) == 0  # profiles: batch 1..2, 64..96 px
    artifact = load_artifact(artifact_copy)
    calls.clear()
    engines_ = EngineSet(artifact)
    unet, reference = engines_.runners["unet"], OnnxRuntimeRunner(artifact.component_file("unet"),
                                                                   artifact.components["unet"])
    assert unet.backend == "trt" and unet.max_batch == 2 and engines_.memory.numel() == 4096
    spec = artifact.components["unet"]
    for seed in (1, 2):  # the second call replays the captured graph with new inputs
        feeds = spec.sample_inputs(Geometry(2, 96, 96), seed=seed)
        out = unet(feeds)["denoised"]
        torch.testing.assert_close(out, reference(feeds)["denoised"], rtol=1e-5, atol=1e-5)
    # 3 tiles with a batch-2 profile: a chunk of 2 and a chunk of 1, each its own context and graph
    feeds = spec.sample_inputs(Geometry(3, 96, 96), seed=3)
    torch.testing.assert_close(unet(feeds)["denoised"], reference(feeds)["denoised"], rtol=1e-5, atol=1e-5)
    assert sorted(unet._bound) == [((1, 4, 12, 12),), ((2, 4, 12, 12),)]
    assert all(b.graph is not None and len(b.graph.ops) == 1 for b in unet._bound.values())
    # one warm-up enqueue per shape before its capture; every other run is a replay
    assert calls.count(("execute_async_v3",)) == 2
    assert calls.count(("create_execution_context", "USER_MANAGED")) == 2
    assert calls.count(("set_device_memory", 4096)) == 2
    # a shape outside the profile is refused with the way out
    with pytest.raises(UserError, match=r"outside the engine's profile \[1, 4, 8, 8\]\.\.\[2, 4, 12, 12\]"):
        unet(spec.sample_inputs(Geometry(1, 256, 256)))


def test_trt_runner_refuses_an_engine_for_another_gpu(artifact_copy, fake_gpu, tiling, simulated_cuda, monkeypatch):
    from srexport.runtime import trt_runner

    fake_gpu([])
    assert main(["engines", str(artifact_copy), "--quiet"]) == 0
    monkeypatch.setattr(trt_runner, "current_machine",
                        lambda trt=None: Machine(trt.__version__, "NVIDIA A100-SXM4-80GB", (8, 0)))
    with pytest.raises(UserError, match=r"compute capability 9\.0 .*is 8\.0.*srexport engines .* --force"):
        trt_runner.trt_runners(load_artifact(artifact_copy))


def test_ort_cuda_runner_binds_device_buffers(demo_artifact, simulated_cuda, monkeypatch):
    """The ort-cuda runner's binding logic on onnxruntime's CPU provider (CPU pointers for CUDA ones)."""
    import onnxruntime

    from srexport.runtime import ort_cuda
    from srexport.runtime.runners import OnnxRuntimeRunner

    monkeypatch.setattr(ort_cuda, "require_ort_cuda", lambda: (onnxruntime, torch))
    monkeypatch.setattr(ort_cuda, "PROVIDER", "CPUExecutionProvider")
    monkeypatch.setattr(ort_cuda, "DEVICE_TYPE", "cpu")
    monkeypatch.setattr(ort_cuda.OrtCudaRunner, "_provider_options", lambda self: {})
    artifact = load_artifact(demo_artifact)
    runners = ort_cuda.ort_cuda_runners(artifact)
    assert {r.backend for r in runners.values()} == {"ort-cuda"}
    for name, runner in runners.items():
        spec = artifact.components[name]
        reference = OnnxRuntimeRunner(artifact.component_file(name), spec)
        for geometry in (Geometry(2, 64, 96), Geometry(1, 64, 64), Geometry(2, 64, 96)):
            feeds = spec.sample_inputs(geometry, seed=geometry.batch)
            expected = reference(feeds)
            for out_name, value in runner(feeds).items():
                torch.testing.assert_close(value, expected[out_name], rtol=1e-5, atol=1e-5)
        assert len(runner._bound) == 2  # buffers and bindings once per shape
        ids = sorted(b.run_options.get_run_config_entry("gpu_graph_id") for b in runner._bound.values())
        assert ids == ["1", "2"]  # one CUDA graph id per shape


def test_trt_pipeline_simulated_matches_onnxruntime(artifact_copy, fake_gpu, simulated_cuda, small_lr):
    """The whole pipeline over the simulated TensorRT runners, at the shapes the artifact's own tiling gives."""
    from srexport.parity import compare
    from srexport.runtime.loading import load_pipeline

    fake_gpu([])
    assert main(["engines", str(artifact_copy), "--quiet"]) == 0
    expected = load_pipeline(artifact_copy, backend="ort")(small_lr)
    trt = load_pipeline(artifact_copy, backend="trt")
    assert trt.backend == "trt" and trt.device == torch.device("cpu")  # (the simulation's "GPU")
    assert compare(trt(small_lr), expected).max_abs < 1e-5


# ---- without TensorRT / GPU / onnxruntime-gpu: one line, exit 2 --------------------------------------


def test_build_engines_without_tensorrt_fails_before_exporting(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without TensorRT
    out = tmp_path / "never"
    assert main(["build", "--engines", "--out", str(out)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "--engines needs TensorRT" in err and "'tensorrt'" in err and "pip install tensorrt" in err
    assert "srexport engines ARTIFACT" in err
    assert list(tmp_path.iterdir()) == []  # nothing exported, no temporary folder left


def test_engines_command_without_tensorrt(demo_artifact, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    before = (demo_artifact / "manifest.json").read_bytes()
    assert main(["engines", str(demo_artifact)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "'tensorrt'" in err and "srexport engines ARTIFACT" in err
    assert (demo_artifact / "manifest.json").read_bytes() == before


def test_engines_need_a_gpu(artifact_copy, tiling, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt([]))
    monkeypatch.setattr(engines, "current_machine", lambda trt=None: Machine(trt.__version__, None, None))
    assert main(["engines", str(artifact_copy)]) == 2
    assert "NVIDIA GPU" in _one_line(capsys.readouterr().err)


@pytest.fixture
def lr_png(tmp_path, small_lr):
    from srexport.runtime.images import save_image

    return save_image(small_lr, tmp_path / "lr.png")


def test_run_trt_on_an_artifact_without_engines(demo_artifact, lr_png, tmp_path, capsys):
    assert main(["run", str(demo_artifact), str(lr_png), "-o", str(tmp_path / "sr.png"), "--backend", "trt"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "has no TensorRT engine for vae_encoder, unet, vae_decoder" in err
    assert f"srexport engines {demo_artifact}" in err
    assert not (tmp_path / "sr.png").exists()


def test_run_trt_with_engines_but_without_tensorrt(artifact_copy, fake_gpu, tiling, lr_png, tmp_path, monkeypatch,
                                                    capsys):
    fake_gpu([])
    assert main(["engines", str(artifact_copy), "--quiet"]) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["run", str(artifact_copy), str(lr_png), "-o", str(tmp_path / "sr.png"), "--backend", "trt"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "--backend trt needs TensorRT" in err and "'tensorrt'" in err


def _ort_cuda_usable() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


@pytest.mark.skipif(_ort_cuda_usable(), reason="onnxruntime-gpu and a GPU are present: ort-cuda runs here")
def test_run_ort_cuda_without_onnxruntime_gpu(demo_artifact, lr_png, tmp_path, capsys):
    assert main(["run", str(demo_artifact), str(lr_png), "-o", str(tmp_path / "sr.png"),
                 "--backend", "ort-cuda"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "--backend ort-cuda needs onnxruntime-gpu and an NVIDIA GPU: pip install onnxruntime-gpu" in err


# ---- the static TensorRT parser check, wired into the build -----------------------------------------


def test_build_records_the_parser_check_and_demo_graphs_pass(demo_artifact):
    manifest = read_manifest(demo_artifact)
    recorded = manifest["checks"]["tensorrt_parser"]
    assert recorded == {name: {"10": [], "11": []} for name in manifest["components"]}
    assert parser_check(demo_artifact, manifest) == recorded


def test_fp16_and_int8_qdq_graphs_of_the_demo_pass(demo_artifact, tmp_path):
    """The demo's encoder and decoder converted to fp16 (fp32 I/O) and quantised to int8 Q/DQ."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.transformers.float16 import convert_float_to_float16

    artifact = load_artifact(demo_artifact)
    for name in ("vae_encoder", "vae_decoder"):
        spec, path = artifact.components[name], artifact.component_file(name)
        fp16 = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
        assert check_graph(fp16, trt_major=11) == [], name

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = iter([{k: v.numpy() for k, v in spec.sample_inputs(Geometry(1, 64, 64), s).items()}
                                   for s in range(2)])

            def get_next(self):
                return next(self.feeds, None)

        def quantize(quantize_bias: bool) -> Path:
            out = tmp_path / f"{name}-int8-{quantize_bias}.onnx"
            quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                           "QuantizeBias": quantize_bias})
            return out

        assert check_graph(quantize(False), trt_major=11) == [], name
        # onnxruntime's default also quantises biases to INT32, which TensorRT's parser rejects.
        problems = check_graph(quantize(True), trt_major=11)
        assert problems and all("INT32" in p for p in problems), problems[:3]


# ---- where TensorRT / onnxruntime-gpu and a GPU exist ----------------------------------------------


def _has_tensorrt() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"TensorRT not importable here ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return "TensorRT present but no CUDA device"
    return None


@pytest.mark.skipif(_has_tensorrt() is not None, reason=_has_tensorrt() or "")
def test_real_engines_build_load_and_match_onnxruntime(artifact_copy, small_lr):
    from srexport.parity import compare
    from srexport.runtime.loading import load_pipeline

    engines.build_engines(artifact_copy, EngineOptions(tile_batch=2, opt_level=1), quiet=True)
    trt_pipeline = load_pipeline(artifact_copy, backend="trt")
    assert trt_pipeline.device.type == "cuda"
    ort_out = load_pipeline(artifact_copy, backend="ort")(small_lr)
    trt_out = trt_pipeline(small_lr)
    assert trt_out.device.type == "cpu"  # back on the caller's device
    assert compare(trt_out, ort_out, peak_to_peak=1.0).psnr_db > 35
    again = trt_pipeline(small_lr)  # replayed CUDA graphs give the same result
    assert torch.equal(again, trt_out)


@pytest.mark.skipif(not _ort_cuda_usable(), reason="needs onnxruntime-gpu (CUDAExecutionProvider) and a CUDA device")
def test_ort_cuda_matches_onnxruntime_cpu(demo_artifact, small_lr):
    from srexport.parity import compare
    from srexport.runtime.loading import load_pipeline

    gpu = load_pipeline(demo_artifact, backend="ort-cuda")
    cpu_out = load_pipeline(demo_artifact, backend="ort")(small_lr)
    out = gpu(small_lr)
    assert compare(out, cpu_out, peak_to_peak=1.0).psnr_db > 35
    assert torch.equal(gpu(small_lr), out)
