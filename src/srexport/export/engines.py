"""TensorRT engines: tile-shaped builds from an artifact's graphs, and whether one may load here.

``build_engines`` adds one serialised engine per component to an existing
artifact (``srexport build --engines`` runs it right after the ONNX build;
``srexport engines ARTIFACT`` runs it later, on the GPU machine that will serve).
Every engine is:
- built from the ONNX graph the artifact already holds and onnxruntime already
  checked, into a *strongly typed* network: the graph's own dtypes decide the
  precision (fp16 graphs give fp16 layers, Q/DQ graphs int8 ones); there are no
  FP16/INT8 builder flags (TensorRT 11 removed them);
- given one optimisation profile read from the component spec at the tile
  geometry the tiled runtime uses (``runtime.tiling.tile_geometries``): batch
  1 to ``tile_batch``, height and width those of the tile (down to the
  smallest side the processing can produce where tiles are not padded);
- described in the manifest with what decides whether it can load elsewhere:
  TensorRT version, GPU name and compute capability, hardware-compatibility
  level, version compatibility, plus the profile, builder optimisation level,
  workspace limit and sha256.

The build goes through Polygraphy's TensorRT loaders (NVIDIA's tested layer
over the builder API): ``create_network(strongly_typed=True)`` makes the
builder and network, ``create_config`` the builder config (profile, optimisation
level, workspace limit, hardware and version compatibility) and
``engine_bytes_from_network`` the serialised engine. Three things stay here,
each because Polygraphy's version would change what this command does:
- the ONNX parse (TensorRT's parser, on Polygraphy's network and logger):
  ``network_from_onnx_path`` reports the parser's errors only to its log and
  raises a generic exception, and a rejected graph must fail with one line
  that names the errors;
- the timing cache (``_TimingCache``): Polygraphy's ``load_timing_cache`` and
  ``save_timing_cache`` ignore TensorRT's verdict on a cache from another GPU
  or TensorRT version, merge into such a cache anyway and rewrite the file
  after every engine; here one cache is shared by every build of a run, a
  rejected file is replaced (and said so), and the file is written once, after
  the last engine;
- writing the engines (no ``SaveEngine``): they are written under temporary
  names, renamed into place and only then listed in the manifest, so a failure
  leaves the ONNX artifact as it was.
Polygraphy's log, which carries TensorRT's, goes to stderr at WARNING during a
build (stdout carries only the command's result).

``artifact.compatibility.engine_problems`` is that decision as a pure function
of a manifest entry and a ``Machine`` (the running TensorRT version and GPU), so
it is tested with simulated values on machines without either.

TensorRT and Polygraphy are imported lazily (``require_tensorrt``,
``require_polygraphy``); where either is missing, the commands that need it
fail at once with one line that says what to install. TensorRT cannot be
installed on the development machines, so the code that calls it runs there
only against a recording fake ``tensorrt`` module, under the real Polygraphy
(tests/test_engines.py); every ``trt.`` name used here is checked against
TensorRT 11.4's bindings (tests/test_trt_support.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..artifact.guidance import LORA_SCALES, samples_per_image
from ..artifact.manifest import load_artifact, read_manifest, sha256_of, write_manifest
from ..artifact.compatibility import (  # noqa: F401  (engines' API: the rules live in the contract)
    ENGINES_COMMAND, TENSORRT_PACKAGE, Machine, check_engine_compatible, current_machine, engine_notes,
    engine_problems, require_tensorrt, tensorrt_major)
from ..artifact.specs import ComponentSpec, Geometry, VAE_FACTOR

POLYGRAPHY_INSTALL = "pip install 'srexport[tensorrt]'"
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
    to ``tile_batch`` (default: the artifact's tiling batch; twice that for an adjustable
    UNet, which runs exact guidance's two samples per tile as one batch); components that
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
        if LORA_SCALES in spec.input_names:  # adjustable exact guidance: two samples per tile in one call
            batch *= samples_per_image(manifest)
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


def require_polygraphy(purpose: str = "building TensorRT engines"):
    """``polygraphy.backend.trt``, or a one-line UserError that says what to install."""
    try:
        import polygraphy.backend.trt as polygraphy_trt
    except ImportError as exc:
        reason = " ".join(str(exc).split())[:120]
        raise UserError(f"{purpose} needs Polygraphy, NVIDIA's TensorRT toolkit, and the Python package "
                        f"'polygraphy' cannot be imported here ({reason}); on the NVIDIA GPU machine run "
                        f"\"{POLYGRAPHY_INSTALL}\"") from None
    return polygraphy_trt


@contextlib.contextmanager
def _tensorrt_log():
    """Polygraphy's log (TensorRT's included) at WARNING, as trt.Logger(WARNING) gave, on stderr.

    Polygraphy prints to stdout, which carries only the command's result. Uncoloured: coloured
    output needs the 'colored' package, and without it Polygraphy says so on the first line it logs.
    """
    from polygraphy.logger import G_LOGGER

    colors, G_LOGGER.colors = G_LOGGER.colors, False
    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING), contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        G_LOGGER.colors = colors


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def build_engine(trt, onnx_path: Path, spec: ComponentSpec, profile: dict, options: EngineOptions,
                 timing_cache: "_TimingCache"):
    """One component's ONNX graph -> serialised engine (an ``IHostMemory``), through Polygraphy.

    A strongly typed network from ``create_network``, filled by TensorRT's ONNX
    parser; a builder config from ``create_config`` with the spec's profile,
    the optimisation level, workspace limit and hardware and version
    compatibility, and the run's shared timing cache; ``engine_bytes_from_network``.
    """
    polygraphy = require_polygraphy()
    from polygraphy.exception import PolygraphyException

    with _tensorrt_log():
        try:
            builder, network = polygraphy.create_network(strongly_typed=True)
        except PolygraphyException as exc:
            raise UserError(f"TensorRT {trt.__version__} could not make a strongly typed network for "
                            f"{onnx_path.name}: {_one_line(exc)}") from None
        # Not network_from_onnx_path: on a rejected graph it logs the parser's errors and raises
        # "Could not parse ONNX correctly", and this error must name them. By path, so graphs with
        # external weights (.onnx.data) load too.
        parser = trt.OnnxParser(network, polygraphy.get_trt_logger())
        if not parser.parse_from_file(str(onnx_path)):
            errors = [" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors)]
            raise UserError(f"TensorRT's ONNX parser rejected {onnx_path.name}: " + "; ".join(errors[:3])
                            + (f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""))
        inputs = sorted(network.get_input(i).name for i in range(network.num_inputs))
        if inputs != sorted(spec.input_names):
            raise UserError(f"{onnx_path.name} has inputs {inputs}, its spec names {sorted(spec.input_names)}; "
                            "rebuild the artifact")

        shapes = polygraphy.Profile()
        for tensor in spec.input_names:
            shapes.add(tensor, profile[tensor]["min"], profile[tensor]["opt"], profile[tensor]["max"])
        level = HARDWARE_LEVELS[options.hardware_compat]
        try:
            config = polygraphy.create_config(
                builder, network, profiles=[shapes], builder_optimization_level=options.opt_level,
                memory_pool_limits=(None if options.workspace_bytes is None
                                    else {trt.MemoryPoolType.WORKSPACE: options.workspace_bytes}),
                hardware_compatibility_level=(None if level == "NONE"
                                              else getattr(trt.HardwareCompatibilityLevel, level)),
                version_compatible=options.version_compatible,
                # TensorRT's own defaults, which Polygraphy's differ from (it clears TF32 and
                # records DETAILED layer information): the engine is the one TensorRT would build.
                tf32=True, profiling_verbosity=trt.ProfilingVerbosity.LAYER_NAMES_ONLY)
        except PolygraphyException as exc:
            raise UserError(f"TensorRT {trt.__version__} cannot build {onnx_path.name} with these options: "
                            f"{_one_line(exc)}") from None
        timing_cache.attach(config)
        try:
            # The parser goes with the network: it owns the weights until the build is done.
            return polygraphy.engine_bytes_from_network((builder, network, parser), config)
        except PolygraphyException:
            raise UserError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above); "
                            "try a larger --workspace-gib or a smaller --tile-batch") from None


class _TimingCache:
    """The tactic timing cache every build of one run shares, kept in a file beside the artifact.

    Read on first use if TensorRT accepts it for this GPU and version, else
    started empty (and said so); written only once every engine is built.
    """

    def __init__(self, path: Path, progress):
        self.path, self.progress, self.cache = Path(path), progress, None

    def attach(self, config) -> None:
        """Make ``config`` (whose own empty cache Polygraphy made) build with the shared cache."""
        if self.cache is None:
            self.cache = self._load(config)
        if not config.set_timing_cache(self.cache, False):
            raise RuntimeError("TensorRT refused the timing cache")

    def _load(self, config):
        if self.path.is_file():
            cache = config.create_timing_cache(self.path.read_bytes())
            if config.set_timing_cache(cache, False):
                self.progress(f"timing cache {self.path} reused")
                return cache
            self.progress(f"timing cache {self.path} is from another GPU or TensorRT; starting a new one")
        return config.create_timing_cache(b"")

    def save(self) -> None:
        if self.cache is not None:
            _write_bytes_atomically(self.path, self.cache.serialize())


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
    manifest = read_manifest(folder)  # a wrong path says so before TensorRT is asked for
    if manifest["export"].get("int8", {}).get("target") == "cpu":
        raise UserError(f"{folder} holds int8 graphs built with --target cpu (asymmetric uint8, for onnxruntime's "
                        "CPU kernels), which TensorRT does not take; rebuild with --target gpu for engines")
    trt = require_tensorrt("building TensorRT engines")
    require_polygraphy()
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
    cache_path = timing_cache_path(folder, options)
    timing_cache = _TimingCache(cache_path, progress)
    precision = manifest["export"]["precision"]  # required by the manifest schema

    written: dict[str, Path] = {}
    records: dict[str, dict] = {}
    try:
        for name, spec in specs.items():
            t = time.perf_counter()
            progress(f"{name}: building ({precision} graph, strongly typed, profile "
                     + ", ".join(f"{k} {v['min']}..{v['max']}" for k, v in profiles[name].items()) + ")")
            plan = build_engine(trt, artifact.component_file(name), spec, profiles[name], options, timing_cache)
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
        timing_cache.save()
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
           "parser_check", "require_polygraphy", "require_tensorrt", "timing_cache_path", "whole_image_geometries"]
