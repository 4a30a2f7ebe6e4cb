"""Where a model's weights come from: user files, or the built-in demo.

The built-in demo is a small *trained* PiSA-SR (``assets/demo_pisa``, made by
``tools/train_demo.py``): a diffusers folder whose weights ship as fp16
safetensors, and a ``pisa_sr.pkl`` in the exact upstream format. It is
materialised once into the cache as a real fp32 diffusers folder, so the same
loaders read it as read real files. The seeded random demo of the same
structure is still available (``trained=False``) for code that wants one.

The manifest records the source (paths with sha256, or the demo kind and
seed), so ``check`` and the torch backend can rebuild the exact PyTorch
reference an artifact was exported from.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import UserError
from .base import BaseModel, load_base, write_demo_base
from .pisa import load_pisa_checkpoint, make_demo_checkpoint, save_checkpoint

DEMO_SEED = 0  # the trained demo's training seed; the random demo's weight seed
TRAINED_DEMO_ASSET = "demo_pisa"  # srexport/assets/<this>: base/ (diffusers, fp16) + pisa_sr.pkl


def demo_description(source) -> str:
    """One sentence on what a demo source's weights are (empty for user files)."""
    if not source.demo:
        return ""
    if getattr(source, "trained", False):
        return ("a tiny PiSA-SR with SD 2.1's block structure, trained for minutes on a CPU (tools/train_demo.py): "
                "about as good as bicubic (see the README), far from the real model's quality")
    return ("a tiny model with SD 2.1's block structure and seeded, untrained weights: its output is not a real "
            "super-resolution")


def cache_dir() -> Path:
    return Path(os.environ.get("SREXPORT_CACHE", Path.home() / ".cache" / "srexport"))


@dataclass
class PisaSource:
    base: Path
    checkpoint: Path
    demo: bool = False
    seed: int | None = None
    trained: bool = False  # demo only: the shipped trained weights, or seeded random ones

    def to_dict(self) -> dict:
        from ..artifact.manifest import sha256_of

        d = {"base": str(self.base.absolute()), "checkpoint": str(self.checkpoint.absolute()),
             "checkpoint_sha256": sha256_of(self.checkpoint), "demo": self.demo}
        if self.demo:
            d["seed"] = self.seed
            d["demo_weights"] = "trained" if self.trained else "random"
        return d

    def load(self) -> tuple[BaseModel, object]:
        """Base and checkpoint, validated against each other (all input errors surface here)."""
        from .pisa import validate_against_unet

        ckpt = load_pisa_checkpoint(self.checkpoint)  # cheap checks first
        base = load_base(self.base)
        validate_against_unet(ckpt, base.unet)
        return base, ckpt


def demo_pisa_source(seed: int = DEMO_SEED, trained: bool = True) -> PisaSource:
    """The built-in demo's diffusers folder and pisa_sr.pkl, written (once) into the cache.

    ``trained=True`` (the default): the shipped trained demo, upcast to fp32; its
    cache folder is named by the digest of the shipped files, so new weights
    never meet a stale copy. ``trained=False``: the seeded random-weight demo
    (``configs.DEMO_*``), whose output is not a super-resolved image.
    """
    if trained:
        digest = _trained_demo_digest()
        folder = cache_dir() / f"demo-pisa-sr-trained-{digest[:16]}"
        writer = _write_trained_demo
    else:
        folder = cache_dir() / f"demo-pisa-sr-seed{seed}"
        writer = lambda tmp: _write_random_demo(tmp, seed)  # noqa: E731
    _materialise(folder, writer)
    base_dir, ckpt_path = folder / "base", folder / "pisa_sr.pkl"
    return PisaSource(base_dir, ckpt_path, demo=True, seed=seed if not trained else DEMO_SEED, trained=trained)


def _write_random_demo(folder: Path, seed: int) -> None:
    write_demo_base(folder / "base", seed)
    base = load_base(folder / "base")
    save_checkpoint(make_demo_checkpoint(base.unet, seed=seed), folder / "pisa_sr.pkl")


def trained_demo_source_from(shipped: str | Path, cache: str | Path) -> PisaSource:
    """A trained demo in the shipped layout (e.g. fresh from tools/train_demo.py),
    materialised into ``cache`` the same way as the built-in one."""
    folder = Path(cache) / "demo"
    _materialise(folder, lambda tmp: _write_trained_demo(tmp, _trained_demo_files(Path(shipped))))
    return PisaSource(folder / "base", folder / "pisa_sr.pkl", demo=True, seed=DEMO_SEED, trained=True)


def _trained_demo_files(root=None) -> dict[str, bytes]:
    """Every shipped file of the trained demo, by path relative to its folder."""
    if root is None:
        root = resources.files("srexport") / "assets" / TRAINED_DEMO_ASSET
    files: dict[str, bytes] = {}

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            name = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, name + "/")
            elif not child.name.startswith("."):
                files[name] = child.read_bytes()

    if not root.is_dir() or not root.joinpath("pisa_sr.pkl").is_file():
        raise UserError(
            f"the trained demo's weights (srexport/assets/{TRAINED_DEMO_ASSET}) are missing from this installation; "
            "reinstall srexport, or run tools/train_demo.py to make them"
        )
    walk(root, "")
    return files


def _trained_demo_digest() -> str:
    h = hashlib.sha256()
    for name, data in sorted(_trained_demo_files().items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def _write_trained_demo(folder: Path, files: dict[str, bytes] | None = None) -> None:
    """Copy the shipped files; upcast every safetensors file to fp32 (a real fp32 diffusers folder)."""
    from safetensors.torch import load, save_file

    for name, data in (files if files is not None else _trained_demo_files()).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".safetensors"):
            tensors = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in load(data).items()}
            save_file(tensors, str(path), metadata={"format": "pt"})
        else:
            path.write_bytes(data)


def pisa_source_from_manifest(source: dict, base: str | None = None, checkpoint: str | None = None) -> PisaSource:
    from ..artifact.manifest import sha256_of

    if source.get("demo") and not (base or checkpoint):
        # Artifacts from before the trained demo record no "demo_weights": they were random.
        trained = source.get("demo_weights", "random") == "trained"
        return demo_pisa_source(source.get("seed", DEMO_SEED), trained=trained)
    result = PisaSource(Path(base or source["base"]), Path(checkpoint or source["checkpoint"]))
    if not result.checkpoint.is_file():
        raise UserError(f"the artifact's checkpoint {result.checkpoint} is gone; pass --checkpoint (and --base) to check against it")
    if sha256_of(result.checkpoint) != source["checkpoint_sha256"]:
        raise UserError(f"{result.checkpoint} is not the checkpoint this artifact was built from (sha256 differs)")
    return result


def _materialise(folder: Path, write) -> None:
    """Run ``write(tmp)`` once into a temporary sibling and rename it to ``folder``."""
    if (folder / "complete").is_file():
        return
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=folder.parent))
    try:
        write(tmp)
        (tmp / "complete").write_text("ok\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class S3DiffSource:
    base: Path
    checkpoint: Path
    de_net: Path | None  # not needed for a fixed degradation
    demo: bool = False
    seed: int | None = None

    def to_dict(self) -> dict:
        from ..artifact.manifest import sha256_of

        d = {"base": str(self.base.absolute()), "checkpoint": str(self.checkpoint.absolute()),
             "checkpoint_sha256": sha256_of(self.checkpoint), "demo": self.demo}
        if self.de_net is not None:
            d.update(de_net=str(self.de_net.absolute()), de_net_sha256=sha256_of(self.de_net))
        if self.demo:
            d["seed"] = self.seed
        return d

    def load(self):
        """Base, checkpoint and estimator, validated against each other (all input errors surface here)."""
        from .s3diff import load_de_net, load_s3diff_checkpoint, validate
        from .s3diff.reference import OneStepSchedule

        ckpt = load_s3diff_checkpoint(self.checkpoint)
        de_net = load_de_net(self.de_net) if self.de_net is not None else None
        base = load_base(self.base)
        validate(ckpt, base.unet, base.vae)
        OneStepSchedule.from_config(base.scheduler_config)
        return base, ckpt, de_net


def demo_s3diff_source(seed: int = DEMO_SEED) -> S3DiffSource:
    """The demo's SD-Turbo-shaped diffusers folder, s3diff.pkl and de_net.pth, in the cache."""
    from .s3diff import write_demo_checkpoints

    folder = cache_dir() / f"demo-s3diff-seed{seed}"

    def write(tmp: Path) -> None:
        write_demo_base(tmp / "base", seed)
        write_demo_checkpoints(tmp, seed)

    _materialise(folder, write)
    return S3DiffSource(folder / "base", folder / "s3diff.pkl", folder / "de_net.pth", demo=True, seed=seed)


def s3diff_source_from_manifest(source: dict, base=None, checkpoint=None, de_net=None) -> S3DiffSource:
    from ..artifact.manifest import sha256_of

    if source.get("demo") and not (base or checkpoint or de_net):
        return demo_s3diff_source(source.get("seed", DEMO_SEED))
    result = S3DiffSource(Path(base or source["base"]), Path(checkpoint or source["checkpoint"]),
                          Path(de_net or source["de_net"]) if (de_net or source.get("de_net")) else None)
    for path, key in ((result.checkpoint, "checkpoint"), (result.de_net, "de_net")):
        if path is None:
            continue
        if not path.is_file():
            raise UserError(f"the artifact's {key} {path} is gone; pass --{key.replace('_', '-')} to check against it")
        if sha256_of(path) != source[f"{key}_sha256"]:
            raise UserError(f"{path} is not the {key} this artifact was built from (sha256 differs)")
    return result
