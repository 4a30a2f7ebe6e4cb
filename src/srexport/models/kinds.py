"""The model kinds srexport knows, one entry each: how to rebuild a kind's PyTorch reference from an
artifact's manifest (its settings and source), and what a build of it needs first.

``runtime.loading.reference_for`` and ``cli`` dispatch through ``MODEL_KINDS`` instead of
``if kind == ...``; a third kind adds an entry here (and its recipe in ``export/``). Torch-free at
import: the entries import their model code when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import UserError


@dataclass(frozen=True)
class ModelKind:
    name: str
    # (manifest's model section, base, checkpoint, de_net overrides) -> the reference module
    reference_from_manifest: Callable
    # build settings that belong to this kind alone, with their defaults (``srexport build``
    # refuses them for another kind: they would be ignored)
    build_options: dict = None
    # a build from local files reads the base folder's scheduler config (S3Diff's DDPM step)
    reads_scheduler_config: bool = False


def _pisa_reference(model: dict, base=None, checkpoint=None, de_net=None):
    from .pisa_reference import PisaReference, PisaSettings
    from .sources import pisa_source_from_manifest

    loaded_base, ckpt = pisa_source_from_manifest(model["source"], base, checkpoint).load()
    return PisaReference(loaded_base, ckpt, PisaSettings.from_manifest(model["settings"]))


def _s3diff_reference(model: dict, base=None, checkpoint=None, de_net=None):
    from .s3diff.reference import S3DiffReference
    from .s3diff.settings import S3DiffSettings
    from .sources import s3diff_source_from_manifest

    settings = S3DiffSettings(**model["settings"])
    loaded_base, ckpt, estimator = s3diff_source_from_manifest(model["source"], base, checkpoint, de_net).load()
    return S3DiffReference(loaded_base, ckpt, estimator, cfg_scale=settings.cfg_scale,
                           degradation=settings.degradation, color_fix=settings.color_fix)


MODEL_KINDS: dict[str, ModelKind] = {
    "pisa-sr": ModelKind("pisa-sr", _pisa_reference, build_options={
        "lambda_pix": 1.0, "lambda_sem": 1.0, "guidance": "merged", "process_size": 512, "size_policy": "pad"}),
    "s3diff": ModelKind("s3diff", _s3diff_reference, build_options={"degradation": "dynamic", "cfg_scale": 1.07},
                        reads_scheduler_config=True),
}


def model_kind(name: str) -> ModelKind:
    if name not in MODEL_KINDS:
        raise UserError(f"model kind {name!r} is not known to this srexport (it knows {', '.join(MODEL_KINDS)}); "
                        "use the srexport that built the artifact, or rebuild it")
    return MODEL_KINDS[name]
