"""Where a model's weights come from: user files, or the built-in seeded demo.

The manifest records the source (paths with sha256, or the demo seed), so
``check`` and the torch backend can rebuild the exact PyTorch reference an
artifact was exported from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .base import BaseModel, load_base, write_demo_base
from .pisa import load_pisa_checkpoint, make_demo_checkpoint, save_checkpoint

DEMO_SEED = 0


def cache_dir() -> Path:
    return Path(os.environ.get("SREXPORT_CACHE", Path.home() / ".cache" / "srexport"))


@dataclass
class PisaSource:
    base: Path
    checkpoint: Path
    demo: bool = False
    seed: int | None = None

    def to_dict(self) -> dict:
        from ..export.artifact import sha256_of

        d = {"base": str(self.base.absolute()), "checkpoint": str(self.checkpoint.absolute()),
             "checkpoint_sha256": sha256_of(self.checkpoint), "demo": self.demo}
        if self.demo:
            d["seed"] = self.seed
        return d

    def load(self) -> tuple[BaseModel, object]:
        """Base and checkpoint, validated against each other (all input errors surface here)."""
        from .pisa import validate_against_unet

        ckpt = load_pisa_checkpoint(self.checkpoint)  # cheap checks first
        base = load_base(self.base)
        validate_against_unet(ckpt, base.unet)
        return base, ckpt


def demo_pisa_source(seed: int = DEMO_SEED) -> PisaSource:
    """Write (once) the demo's diffusers folder and pisa_sr.pkl into the cache.

    The demo goes through the same loaders as real files. Its weights are
    seeded random numbers: the output is not a super-resolved image.
    """
    folder = cache_dir() / f"demo-pisa-sr-seed{seed}"
    base_dir, ckpt_path = folder / "base", folder / "pisa_sr.pkl"
    if not (folder / "complete").is_file():
        import shutil
        import tempfile

        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=folder.parent))
        try:
            write_demo_base(tmp / "base", seed)
            base = load_base(tmp / "base")
            save_checkpoint(make_demo_checkpoint(base.unet, seed=seed), tmp / "pisa_sr.pkl")
            (tmp / "complete").write_text("ok\n")
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return PisaSource(base_dir, ckpt_path, demo=True, seed=seed)


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
        from ..export.artifact import sha256_of

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
    from ..export.artifact import sha256_of

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


def pisa_source_from_manifest(source: dict, base: str | None = None, checkpoint: str | None = None) -> PisaSource:
    from ..export.artifact import sha256_of

    if source.get("demo") and not (base or checkpoint):
        return demo_pisa_source(source.get("seed", DEMO_SEED))
    result = PisaSource(Path(base or source["base"]), Path(checkpoint or source["checkpoint"]))
    if not result.checkpoint.is_file():
        raise UserError(f"the artifact's checkpoint {result.checkpoint} is gone; pass --checkpoint (and --base) to check against it")
    if sha256_of(result.checkpoint) != source["checkpoint_sha256"]:
        raise UserError(f"{result.checkpoint} is not the checkpoint this artifact was built from (sha256 differs)")
    return result
