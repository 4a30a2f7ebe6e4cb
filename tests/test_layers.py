"""The layers of DESIGN.md, held by reading every import in src/ (ast): an arrow that runs the
wrong way fails here, lazy imports inside functions included, and so does a private name taken
from another module.

Bottom up: the artifact contract, kernels and the shared pieces below everything (errors,
processing, the parity functions); models; runtime; calibration and export (they build
artifacts and verify them by running them, with the comparator loop of ``checking``);
everything else (bench, cli, ...) on top.
The one arrow DESIGN.md allows upwards: the torch backend reaches into models lazily, which is
downwards anyway (runtime sits above models).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "srexport"

LAYER_OF = {  # first part of the module path below srexport -> layer (higher imports lower)
    "errors": 0, "artifact": 0, "kernels": 0, "processing": 0, "parity": 0,
    "models": 1,
    "runtime": 2,
    # what builds and verifies artifacts: the exporters, calibration, the one comparator loop
    # (checking: build, check and precision measurement all run it) and the built-in sample
    # image they are measured on (read with the runtime's image rules)
    "calibration": 3, "export": 3, "checking": 3, "samples": 3,
}
TOP = 4  # checking, bench, plots, describe, cli, __init__, ... : may import anything


def layer(parts: tuple[str, ...]) -> int:
    return LAYER_OF.get(parts[0], TOP) if parts else TOP


def module_parts(path: Path) -> tuple[str, ...]:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return tuple(parts)


def imports(path: Path):
    """(line, imported module parts below srexport, names) for every srexport import in a file."""
    here = module_parts(path)
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = (*base, *(node.module.split(".") if node.module else ()))
            elif node.module and node.module.split(".")[0] == "srexport":
                target = tuple(node.module.split(".")[1:])
            else:
                continue
            yield node.lineno, target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "srexport":
                    yield node.lineno, tuple(alias.name.split(".")[1:]), []


SOURCES = sorted(SRC.rglob("*.py"))


def test_the_scan_sees_the_package():
    assert len(SOURCES) > 60
    arrows = [(module_parts(p), t) for p in SOURCES for _, t, _ in imports(p)]
    assert (("runtime", "pipeline"), ("processing",)) in arrows  # a relative import, resolved


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_run_down_the_layers(path):
    here = module_parts(path)
    wrong = []
    for line, target, names in imports(path):
        if not target:  # "from . import __version__" at the top
            continue
        if layer(target) > layer(here) and target[0] != here[0]:
            wrong.append(f"line {line}: {'.'.join(here)} (layer {layer(here)}) imports {'.'.join(target)} "
                         f"(layer {layer(target)})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_name_crosses_modules(path):
    here = module_parts(path)
    crossing = [f"line {line}: {name} from {'.'.join(target)}" for line, target, names in imports(path)
                for name in names if name.startswith("_") and not name.startswith("__") and target != here]
    assert not crossing, "\n".join(crossing)
