"""Artifact folder + backend name -> a ready pipeline."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..artifact.manifest import load_artifact
from .pipeline import SRPipeline
from .runners import check_backend, ort_runners, torch_runners


def reference_for(artifact, base: str | None = None, checkpoint: str | None = None, de_net: str | None = None):
    """Rebuild the PyTorch reference an artifact was exported from (its manifest's source)."""
    manifest = artifact.manifest
    kind = manifest["model"]["kind"]
    if kind == "pisa-sr":
        from ..models.pisa_reference import PisaReference, PisaSettings
        from ..models.sources import pisa_source_from_manifest

        source = pisa_source_from_manifest(manifest["model"]["source"], base, checkpoint)
        loaded_base, ckpt = source.load()
        return PisaReference(loaded_base, ckpt, PisaSettings.from_manifest(manifest["model"]["settings"]))
    if kind == "s3diff":
        from ..models.s3diff.settings import S3DiffSettings
        from ..models.s3diff.reference import S3DiffReference
        from ..models.sources import s3diff_source_from_manifest

        settings = S3DiffSettings(**manifest["model"]["settings"])
        source = s3diff_source_from_manifest(manifest["model"]["source"], base, checkpoint, de_net)
        loaded_base, ckpt, estimator = source.load()
        return S3DiffReference(loaded_base, ckpt, estimator, cfg_scale=settings.cfg_scale,
                               degradation=settings.degradation, color_fix=settings.color_fix)
    raise UserError(f"artifact model kind {kind!r} is not known to this srexport")


def load_pipeline(artifact: str | Path, backend: str = "ort", threads: int | None = None,
                  reference=None) -> SRPipeline:
    art = load_artifact(artifact)
    check_backend(backend)
    if backend == "ort":
        runners = ort_runners(art, threads=threads)
    elif backend == "trt":
        from .trt_runner import trt_runners

        runners = trt_runners(art)
    elif backend == "ort-cuda":
        from .ort_cuda import ort_cuda_runners

        runners = ort_cuda_runners(art)
    else:
        runners = torch_runners(art, reference if reference is not None else reference_for(art))
    return SRPipeline(art.manifest, runners)
