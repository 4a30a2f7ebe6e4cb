"""The calibration cache: captured component inputs, keyed by everything that made them.

Running the fp32 reference over the calibration photos is the slow part of an
int8 (or fp16) build, so its result is kept under
``<cache_dir>/calibration/<key>/``: one ``<component>.npz`` per component
(its input tensors, stacked over the calibration crops) and ``meta.json``
(what the key was made of, readable). The key is the sha256 of that
description: the model (kind, settings, checkpoint sha256, a fingerprint of
the base folder's files), the component inputs captured, the photo set (names,
or each file's sha256), the crop size and count, the seed, the degradation,
and this format's version. Change any of them and a new entry is made.
Writes are atomic (temporary sibling, then rename), so a killed build leaves
no half entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

CACHE_FORMAT = 1


def cache_root() -> Path:
    from ..models.sources import cache_dir

    return cache_dir() / "calibration"


def cache_key(description: dict) -> str:
    text = json.dumps({"format": CACHE_FORMAT, **description}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def folder_fingerprint(folder: str | Path) -> list:
    """Names, sizes and modification times of a model folder's files: cheap, and
    changes whenever a weight file is replaced (hashing gigabytes per build is not)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            st = path.stat()
            out.append([str(path.relative_to(folder)), st.st_size, int(st.st_mtime)])
    return out


def load(key: str) -> dict[str, dict[str, np.ndarray]] | None:
    """component -> input name -> (N, ...) array, or None when not cached."""
    folder = cache_root() / key
    if not (folder / "meta.json").is_file():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        out = {}
        for component in meta["components"]:
            with np.load(folder / f"{component}.npz") as data:
                out[component] = {name: data[name] for name in data.files}
        return out
    except (OSError, ValueError, KeyError):
        return None  # unreadable entry: recompute (and overwrite it)


def store(key: str, inputs: dict[str, dict[str, np.ndarray]], description: dict) -> Path:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=root))
    try:
        for component, arrays in inputs.items():
            np.savez(tmp / f"{component}.npz", **arrays)
        (tmp / "meta.json").write_text(json.dumps(
            {"format": CACHE_FORMAT, "key": key, "components": list(inputs), "description": description},
            indent=2, default=str) + "\n")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
