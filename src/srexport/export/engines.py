"""TensorRT engines: tile-shaped builds from an artifact's graphs, and whether one may load here.

``build_engines`` adds one serialised engine per component to an existing
artifact (``srexport build --engines`` runs it right after the ONNX build;
``srexport engines ARTIFACT`` runs it later, on the GPU machine that will serve).
Every engine is:
- built from the ONNX graph the artifact already holds and onnxruntime already
  checked, by TensorRT's ONNX parser into a *strongly typed* network: the
  graph's own dtypes decide the precision (fp16 graphs give fp16 layers, Q/DQ
  graphs int8 ones); there are no FP16/INT8 builder flags (TensorRT 11 removed
  them);
- given one optimisation profile read from the component spec at the tile
  geometry the tiled runtime uses (``runtime.tiling.tile_geometries``): batch
  1 to ``tile_batch``, height and width those of the tile (down to the
  smallest side the processing can produce where tiles are not padded);
- described in the manifest with what decides whether it can load elsewhere:
  TensorRT version, GPU name and compute capability, hardware-compatibility
  level, version compatibility, plus the profile, builder optimisation level,
  workspace limit and sha256.

``artifact.compatibility.engine_problems`` is that decision as a pure function
of a manifest entry and a ``Machine`` (the running TensorRT version and GPU), so
it is tested with simulated values on machines without either.

TensorRT is imported lazily (``require_tensorrt``); where it is missing, the
commands that need it fail at once with one line that names the package and
the command that builds engines on a GPU machine. It cannot be installed on
the development machines, so the code that calls it is exercised there only
through a recording fake (tests/test_engines.py); every ``trt.`` name used here
is checked against TensorRT 11.4's bindings (tests/test_trt_support.py).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..artifact.manifest import load_artifact, read_manifest, sha256_of, write_manifest
from ..artifact.compatibility import (  # noqa: F401  (engines' API: the rules live in the contract)
    ENGINES_COMMAND, TENSORRT_PACKAGE, Machine, check_engine_compatible, current_machine, engine_notes,
    engine_problems, require_tensorrt, tensorrt_major)
from ..artifact.specs import ComponentSpec, Geometry, VAE_FACTOR

ENGINE_SUFFIX = ".engine"
TIMING_CACHE_SUFFIX = ".trt-timing-cache"

# --hardware-compat value -> TensorRT's HardwareCompatibilityLevel member name.
HARDWARE_LEVELS = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}

# Components that run once on the whole LR image (spec.whole_image: S3Diff's degradation
# estimator) get a profile that spans image sizes, batch 1, up to this LR side.
WHOLE_IMAGE_MAX_LR_SIDE = 2048


# ----------------------------------------------------------------------------------------
# Build options and profiles (pure; tested everywhere).


@dataclass(frozen=True)
class EngineOptions:
    """How engines are built. ``workspace_gib`` None leaves TensorRT's default (the device's memory)."""

    tile_batch: int | None = None  # None: the artifact's tiling batch
    opt_level: int = 3
    workspace_gib: float | None = None
    hardware_compat: str = "none"
    version_compatible: bool = False
    timing_cache: Path | None = None  # default: <artifact>.trt-timing-cache beside the folder

    def validate(self) -> "EngineOptions":
        if self.tile_batch is not None and not 1 <= self.tile_batch <= 256:
            raise UserError(f"--tile-batch {self.tile_batch} is out of range; use 1 to 256")
        if not 0 <= self.opt_level <= 5:
            raise UserError(f"--opt-level {self.opt_level} is out of range; TensorRT's levels are 0 to 5")
        if self.workspace_gib is not None and not self.workspace_gib > 0:
            raise UserError(f"--workspace-gib {self.workspace_gib} must be a positive number of GiB")
        if self.hardware_compat not in HARDWARE_LEVELS:
            raise UserError(f"--hardware-compat {self.hardware_compat!r} is not one of {', '.join(HARDWARE_LEVELS)}")
        return self

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace_gib is None else int(self.workspace_gib * 2**30)


def timing_cache_path(folder: Path, options: EngineOptions) -> Path:
    """Beside the artifact (not in it: a rebuild with --force replaces the folder, the cache survives)."""
    if options.timing_cache is not None:
        return Path(options.timing_cache)
    folder = Path(folder).absolute()
    return folder.parent / (folder.name + TIMING_CACHE_SUFFIX)


def engine_geometries(manifest: dict, components: dict[str, ComponentSpec], tile_batch: int | None = None
                      ) -> tuple[dict[str, tuple[Geometry, Geometry, Geometry]], str]:
    """component -> (smallest, typical, largest) geometry of its profile, and where the shapes came from.

    Tiled components get the tiles the tiled runtime calls them with, batch 1
    to ``tile_batch`` (default: the artifact's tiling batch); components that
    run once on the whole LR image (``ComponentSpec.whole_image``) span image sizes.
    """
    from ..runtime.tiling import tile_geometries  # the single source of the tile shapes

    scale = int(manifest["processing"]["scale"])
    out: dict[str, tuple[Geometry, Geometry, Geometry]] = {}
    source = "whole images only"
    for name, spec in components.items():
        if spec.whole_image:
            out[name] = whole_image_geometries(manifest)
            continue
        if has_tiling(manifest):
            smallest, typical, largest = tile_geometries(manifest, name)
            source = "runtime.tiling.tile_geometries (the artifact's tiling section)"
        else:
            # An artifact built before tiling runs whole images: 64 px to twice the process size per side.
            side = _process_side(manifest, scale)
            smallest, typical, largest = (Geometry(1, VAE_FACTOR * 8, VAE_FACTOR * 8, scale),
                                          Geometry(4, side, side, scale), Geometry(4, 2 * side, 2 * side, scale))
            source = "no tiling section: whole images from 64 px to twice the process size per side"
        batch = tile_batch or largest.batch
        out[name] = (dataclasses.replace(smallest, batch=1), dataclasses.replace(typical, batch=batch),
                     dataclasses.replace(largest, batch=batch))
    return out, source


def has_tiling(manifest: dict) -> bool:
    """Whether the artifact was built with a tiling section (older artifacts run whole images)."""
    return "tiling" in manifest


def _process_side(manifest: dict, scale: int) -> int:
    side = int(manifest["processing"].get("min_lr_side") or 0) * scale or 512
    return max(VAE_FACTOR * 8, side // VAE_FACTOR * VAE_FACTOR)


def whole_image_geometries(manifest: dict) -> tuple[Geometry, Geometry, Geometry]:
    """Profile of a whole-image component: the smallest LR the model accepts up to WHOLE_IMAGE_MAX_LR_SIDE."""
    from ..processing import Processing

    processing = Processing.from_dict(manifest["processing"])
    s = processing.scale
    lo = processing.min_input_side()
    opt = max(lo, _process_side(manifest, s) // s)
    return Geometry(1, lo * s, lo * s, s), Geometry(1, opt * s, opt * s, s), \
        Geometry(1, WHOLE_IMAGE_MAX_LR_SIDE * s, WHOLE_IMAGE_MAX_LR_SIDE * s, s)


def engine_profiles(specs: dict[str, ComponentSpec],
                    geometries: dict[str, tuple[Geometry, Geometry, Geometry]]) -> dict[str, dict]:
    """component -> input -> {"min", "opt", "max"} shapes, read from the specs (nothing restated)."""
    return {name: {tensor: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                   for tensor, (lo, opt, hi) in spec.profile(*geometries[name]).items()}
            for name, spec in specs.items()}


# ----------------------------------------------------------------------------------------
# The TensorRT parser op check, on every graph of an artifact.


def parser_check(folder: Path, manifest: dict, majors: tuple[int, ...] = (10, 11)) -> dict:
    """component -> {"10": [problems], "11": [problems]}: the static TensorRT parser check of each graph."""
    from .trt_support import check_graph

    results = {}
    for name, component in manifest["components"].items():
        path = Path(folder) / manifest["files"][component["files"]["onnx"]]["path"]
        results[name] = {str(major): check_graph(path, trt_major=major) for major in majors}
    return results


def _op_check_major(version: str) -> int:
    from .trt_support import OP_SUPPORT

    major = tensorrt_major(version)
    return major if major in OP_SUPPORT else max(OP_SUPPORT)


# ----------------------------------------------------------------------------------------
# Building (needs TensorRT and a GPU).


class _Progress:
    def __init__(self, quiet: bool):
        self.quiet, self.start = quiet, time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[engines] {message}  ({time.perf_counter() - self.start:.1f} s)", file=sys.stderr, flush=True)


def build_engine(trt, logger, onnx_path: Path, spec: ComponentSpec, profile: dict, options: EngineOptions,
                 timing_cache=None):
    """One component's ONNX graph -> serialised engine (an ``IHostMemory``), and the timing cache used.

    The calls follow TensorRT's documented order: builder, strongly typed
    network, ONNX parser, builder config (optimisation level, workspace,
    hardware and version compatibility, timing cache), one optimisation
    profile from the spec, ``build_serialized_network``.
    """
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    # By path, so graphs with external weights (.onnx.data) load too.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors)]
        raise UserError(f"TensorRT's ONNX parser rejected {onnx_path.name}: " + "; ".join(errors[:3])
                        + (f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""))
    inputs = sorted(network.get_input(i).name for i in range(network.num_inputs))
    if inputs != sorted(spec.input_names):
        raise UserError(f"{onnx_path.name} has inputs {inputs}, its spec names {sorted(spec.input_names)}; "
                        "rebuild the artifact")

    config = builder.create_builder_config()
    config.builder_optimization_level = options.opt_level
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    level = HARDWARE_LEVELS[options.hardware_compat]
    if level != "NONE":
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if timing_cache is None:
        timing_cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(timing_cache, False):
        raise RuntimeError("TensorRT refused the timing cache")

    trt_profile = builder.create_optimization_profile()
    for tensor in spec.input_names:
        shapes = profile[tensor]
        trt_profile.set_shape(tensor, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(trt_profile)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above); "
                        "try a larger --workspace-gib or a smaller --tile-batch")
    return plan, timing_cache


def _load_timing_cache(trt, logger, path: Path, progress) -> tuple[object, bool]:
    """An ITimingCache from ``path`` if TensorRT accepts it for this GPU, else a fresh one."""
    config = trt.Builder(logger).create_builder_config()
    if path.is_file():
        cache = config.create_timing_cache(path.read_bytes())
        if config.set_timing_cache(cache, False):
            progress(f"timing cache {path} reused")
            return cache, True
        progress(f"timing cache {path} is from another GPU or TensorRT; starting a new one")
    return config.create_timing_cache(b""), False


def _write_bytes_atomically(path: Path, data) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_engines(folder: str | Path, options: EngineOptions = EngineOptions(), force: bool = False,
                  quiet: bool = False) -> Path:
    """Add one TensorRT engine per component to the artifact ``folder``; rewrite its manifest atomically.

    The artifact stays valid at every moment: engines are written under
    temporary names, renamed into place, and only then listed in the manifest
    (with every file re-hashed). A failure leaves the ONNX artifact as it was.
    """
    options = options.validate()
    folder = Path(folder)
    read_manifest(folder)  # a wrong path says so before TensorRT is asked for
    trt = require_tensorrt("building TensorRT engines")
    artifact = load_artifact(folder)
    manifest = artifact.manifest
    if any("engine" in c["files"] for c in manifest["components"].values()) and not force:
        raise UserError(f"{folder} already has TensorRT engines; pass --force to rebuild them")
    machine = current_machine(trt)
    if machine.compute_capability is None:
        raise UserError("building TensorRT engines needs an NVIDIA GPU visible to PyTorch "
                        "(torch.cuda.is_available() is False here)")
    progress = _Progress(quiet)
    specs = artifact.components

    # The static parser check first: a graph TensorRT can't read fails in seconds, not mid-build.
    major = _op_check_major(trt.__version__)
    from .trt_support import check_graph

    for name in specs:
        problems = check_graph(artifact.component_file(name), trt_major=major)
        if problems:
            raise UserError(f"{name}.onnx has {len(problems)} problem(s) for TensorRT {major}'s ONNX parser: "
                            + "; ".join(problems[:3]))

    geometries, tile_source = engine_geometries(manifest, specs, options.tile_batch)
    profiles = engine_profiles(specs, geometries)
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = timing_cache_path(folder, options)
    timing_cache, _ = _load_timing_cache(trt, logger, cache_path, progress)
    precision = manifest.get("export", {}).get("precision", "fp32")

    written: dict[str, Path] = {}
    records: dict[str, dict] = {}
    try:
        for name, spec in specs.items():
            t = time.perf_counter()
            progress(f"{name}: building ({precision} graph, strongly typed, profile "
                     + ", ".join(f"{k} {v['min']}..{v['max']}" for k, v in profiles[name].items()) + ")")
            plan, timing_cache = build_engine(trt, logger, artifact.component_file(name), spec, profiles[name],
                                              options, timing_cache)
            tmp = folder / f".{name}{ENGINE_SUFFIX}.building"
            _write_bytes_atomically(tmp, plan)
            written[name] = tmp
            records[name] = {
                "file": f"{name}{ENGINE_SUFFIX}",
                "tensorrt_version": trt.__version__,
                "device_name": machine.device_name,
                "compute_capability": list(machine.compute_capability),
                "hardware_compatibility_level": HARDWARE_LEVELS[options.hardware_compat],
                "version_compatible": options.version_compatible,
                "strongly_typed": True,
                "precision": precision,
                "profiles": profiles[name],
                "builder_optimization_level": options.opt_level,
                "workspace_bytes": options.workspace_bytes,
                "sha256": sha256_of(tmp),
                "build_seconds": round(time.perf_counter() - t, 1),
            }
            progress(f"{name}{ENGINE_SUFFIX}  {tmp.stat().st_size / 2**20:.1f} MiB")
        _write_bytes_atomically(cache_path, timing_cache.serialize())
    except BaseException:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
        raise

    # Old engines leave the manifest before their files are replaced, so the
    # manifest never lists a file whose hash it does not match.
    old = {n: c["files"].pop("engine") for n, c in manifest["components"].items() if "engine" in c["files"]}
    if old:
        for name, key in old.items():
            manifest["components"][name].pop("engine", None)
            manifest["files"].pop(key, None)
        write_manifest(folder, manifest)
    for name, tmp in written.items():
        os.replace(tmp, folder / records[name]["file"])
    for name, record in records.items():
        manifest["files"][record["file"]] = {"path": record["file"]}
        manifest["components"][name]["files"]["engine"] = record["file"]
        manifest["components"][name]["engine"] = record
    manifest["engines"] = {
        "tensorrt_version": trt.__version__, "built_on": machine.to_dict(), "precision": precision,
        "tile_batch": max((g[2].batch for n, g in geometries.items() if not specs[n].whole_image), default=None),
        "shapes_from": tile_source, "timing_cache": cache_path.name,
    }
    manifest.setdefault("checks", {})["tensorrt_parser"] = parser_check(folder, manifest)
    write_manifest(folder, manifest)
    load_artifact(folder)  # hashes and format must round-trip
    progress(f"{len(records)} engines written to {folder}; timing cache {cache_path}")
    return folder


__all__ = ["EngineOptions", "Machine", "build_engine", "build_engines", "check_engine_compatible",
           "current_machine", "engine_geometries", "engine_notes", "engine_problems", "engine_profiles",
           "parser_check", "require_tensorrt", "timing_cache_path", "whole_image_geometries"]
