"""The artifact folder: graphs (and later engines) plus a self-describing manifest.

Writes are atomic: a build fills a hidden temporary sibling of the target and
renames it into place only when everything (export, checks, manifest) has
succeeded, so an interrupted or failed build leaves nothing behind. Loading
verifies every file's sha256 against the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .specs import ComponentSpec

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_folder(target: Path, force: bool = False):
    """Yield a temporary sibling folder; on success it replaces ``target``."""
    target = Path(target).absolute()
    if target.exists() and not force:
        raise UserError(f"{target} already exists; pass --force to replace it or choose another --out")
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} exists and is not a folder; remove it or choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; an artifact is meant to be shared
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Hash every listed file, then write manifest.json atomically."""
    folder = Path(folder)
    for entry in manifest["files"].values():
        entry["sha256"] = sha256_of(folder / entry["path"])
        entry["bytes"] = (folder / entry["path"]).stat().st_size
    path = folder / MANIFEST
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest-")
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass
class Artifact:
    """A loaded artifact folder: its manifest and verified file paths."""

    folder: Path
    manifest: dict

    @property
    def model(self) -> str:
        return self.manifest["model"]["kind"]

    @property
    def components(self) -> dict[str, ComponentSpec]:
        return {name: ComponentSpec.from_dict(c["spec"]) for name, c in self.manifest["components"].items()}

    def component_file(self, name: str, kind: str = "onnx") -> Path:
        key = self.manifest["components"][name]["files"][kind]
        return self.folder / self.manifest["files"][key]["path"]


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"artifact {folder} is not a folder; pass the --out folder of 'srexport build'")
    if not path.is_file():
        raise UserError(f"{folder} has no {MANIFEST}; it is not an srexport artifact (build one with 'srexport build')")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); rebuild the artifact") from None
    if not isinstance(manifest, dict) or not {"files", "components", "model"} <= manifest.keys():
        raise UserError(f"{path} is not an srexport manifest (missing files/components/model); rebuild the artifact")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path} has format_version {version}; this srexport reads {FORMAT_VERSION}: rebuild the artifact")
    return manifest


def load_artifact(folder: str | Path, verify: bool = True) -> Artifact:
    folder = Path(folder)
    manifest = read_manifest(folder)
    if verify:
        for key, entry in manifest["files"].items():
            path = folder / entry["path"]
            if not path.is_file():
                raise UserError(f"artifact {folder} is missing {entry['path']}; rebuild it or restore the file")
            if path.stat().st_size != entry["bytes"] or sha256_of(path) != entry["sha256"]:
                raise UserError(f"{path} does not match its sha256 in the manifest (modified or truncated); rebuild the artifact")
    return Artifact(folder, manifest)
