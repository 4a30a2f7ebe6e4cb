"""Check the TensorRT Python names our code uses against the names TensorRT binds.

TensorRT's libraries can't be installed here, so ``import tensorrt`` never runs
in the tests. The ``tensorrt-cu13-bindings`` wheel (TensorRT 11.4, 1.3 MB on
PyPI) does install, and although its extension module can't be loaded without
libnvinfer, every Python name it binds (classes, enum members, methods,
properties) is a NUL-terminated string literal in ``tensorrt_bindings/tensorrt.so``.
So a name our code uses that is not among those strings (``EXPLICIT_BATCH``,
``BuilderFlag.FP16``, the int8 calibrators, ``execute_async_v2``: all removed
by TensorRT 11) fails a CPU test instead of an engine build on a GPU box.

One wrinkle: the linker merges a string literal into a longer one that ends
with it, so ``"Builder"`` only exists as the tail of ``"IExprBuilder"`` and
``"INT8"`` as the tail of ``"UINT8"``. ``bound_names`` therefore includes every
identifier-shaped tail of every string. That can let through a removed name
that happens to end another bound name (``INT8``: both ``DataType.INT8``, still
bound, and ``BuilderFlag.INT8``, removed, look alike), but every whole name
removed in 11.x that we know of is caught.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from collections import defaultdict
from pathlib import Path

BINDINGS_PACKAGE = "tensorrt_bindings"
BINDINGS_DISTRIBUTION = "tensorrt-cu13-bindings"

# Methods and properties our code calls on TensorRT objects (config, network,
# parser, timing cache, engine, context, runtime). A receiver's type can't be
# known from the source, so these are listed here and checked as well. The
# builder, network creation, builder config, profiles and the build itself go
# through Polygraphy (export/engines.py), whose calls are its own.
TRT_METHODS_USED: tuple[str, ...] = (
    # build: the ONNX parse, the input check and the shared timing cache
    "parse_from_file", "num_errors", "get_error", "num_inputs", "get_input", "name",
    "create_timing_cache", "set_timing_cache", "serialize",
    # enum members reached with getattr (export.engines.HARDWARE_LEVELS)
    "NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY",
    # load and run
    "deserialize_cuda_engine", "engine_host_code_allowed", "create_execution_context",
    "num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_shape",
    "get_tensor_dtype", "get_tensor_profile_shape", "set_input_shape", "set_tensor_address",
    "execute_async_v3", "device_memory_size_v2", "set_device_memory",
)

_IDENTIFIER = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
_ROOT_NAMES = frozenset({"trt", "tensorrt", BINDINGS_PACKAGE})


def bindings_so_path() -> Path | None:
    """``tensorrt_bindings/tensorrt*.so`` of the installed wheel, found without importing it
    (the import fails where libnvinfer is missing); None where the wheel is not installed."""
    try:
        spec = importlib.util.find_spec(BINDINGS_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        candidates = sorted(Path(folder).glob("tensorrt*.so")) + sorted(
            Path(folder).glob("tensorrt*.pyd"))
        if candidates:
            return candidates[0]
    return None


def bindings_version() -> str | None:
    """Version of the installed bindings wheel, e.g. '11.4.0.106'."""
    from importlib import metadata

    try:
        return metadata.version(BINDINGS_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def bound_names(so_path: str | Path | None = None, *, tails: bool = True) -> set[str]:
    """Every identifier-shaped string in the bindings module (and, with ``tails``, every
    identifier-shaped tail of one: see the module docstring on string merging)."""
    path = Path(so_path) if so_path is not None else bindings_so_path()
    if path is None:
        raise FileNotFoundError(
            f"{BINDINGS_DISTRIBUTION} is not installed (pip install {BINDINGS_DISTRIBUTION})")
    names: set[str] = set()
    for piece in path.read_bytes().split(b"\0"):
        if 0 < len(piece) <= 128 and _IDENTIFIER.fullmatch(piece):
            names.add(piece.decode("ascii"))
    if tails:
        for name in list(names):
            for i in range(1, len(name) - 1):
                tail = name[i:]
                if tail[0].isalpha() or tail[0] == "_":
                    names.add(tail)
    return names


def _trt_aliases(tree: ast.AST) -> set[str]:
    """Names the module binds to tensorrt: ``trt`` by convention, plus import aliases."""
    aliases = set(_ROOT_NAMES)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("tensorrt", BINDINGS_PACKAGE):
                    aliases.add(alias.asname or alias.name.split(".")[0])
    return aliases


def _root_name(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def names_used_in(source_dir: str | Path) -> dict[str, list[str]]:
    """TensorRT names used in the .py files under ``source_dir``: name -> ['file:line', ...].

    Counts every attribute in a chain rooted at a tensorrt alias
    (``trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED`` gives both names) and
    names imported with ``from tensorrt import X``.
    """
    root = Path(source_dir)
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    used: dict[str, list[str]] = defaultdict(list)
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError):
            continue
        aliases = _trt_aliases(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _root_name(node) in aliases:
                used[node.attr].append(f"{path}:{node.lineno}")
            elif isinstance(node, ast.ImportFrom) and node.module and (
                    node.module.split(".")[0] in ("tensorrt", BINDINGS_PACKAGE)):
                for alias in node.names:
                    if alias.name != "*":
                        used[alias.name].append(f"{path}:{node.lineno}")
    return {name: sorted(set(where)) for name, where in sorted(used.items())}


def unbound_names(source_dir: str | Path, extra: tuple[str, ...] = TRT_METHODS_USED,
                  so_path: str | Path | None = None) -> dict[str, list[str]]:
    """Names used under ``source_dir`` (plus ``extra``) that the bindings don't bind."""
    bound = bound_names(so_path)
    used = names_used_in(source_dir)
    for name in extra:
        used.setdefault(name, []).append("<TRT_METHODS_USED>")
    return {name: where for name, where in used.items() if name not in bound}


__all__ = ["TRT_METHODS_USED", "bindings_so_path", "bindings_version", "bound_names",
           "names_used_in", "unbound_names"]
