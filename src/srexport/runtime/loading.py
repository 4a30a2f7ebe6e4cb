"""Artifact folder + backend name -> a ready pipeline."""

from __future__ import annotations

from pathlib import Path

from ..artifact.manifest import load_artifact
from .pipeline import SRPipeline
from .runners import check_attention, check_backend, ort_graph, ort_runners, torch_runners


def reference_for(artifact, base: str | None = None, checkpoint: str | None = None, de_net: str | None = None):
    """Rebuild the PyTorch reference an artifact was exported from (its manifest's source)."""
    from ..models.kinds import model_kind

    model = artifact.manifest["model"]
    return model_kind(model["kind"]).reference_from_manifest(model, base, checkpoint, de_net)


def load_pipeline(artifact: str | Path, backend: str = "ort", threads: int | None = None,
                  reference=None, attention: str = "fused", arena: str = "shared") -> SRPipeline:
    """``attention`` (onnxruntime backends): "fused" runs each component's MultiHeadAttention twin
    where the artifact has one, "plain" the portable graphs. ``arena``: onnxruntime's CPU memory
    arena (runners.ARENAS)."""
    art = load_artifact(artifact)
    check_backend(backend)
    check_attention(attention)
    if backend == "ort":
        runners = ort_runners(art, threads=threads, attention=attention, arena=arena)
    elif backend == "trt":
        from .trt_runner import trt_runners

        runners = trt_runners(art)
    elif backend == "ort-cuda":
        from .ort_cuda import ort_cuda_runners

        runners = ort_cuda_runners(art, attention=attention)
    else:
        runners = torch_runners(art, reference if reference is not None else reference_for(art))
    return SRPipeline(art.manifest, runners)


def component_runner(artifact, name: str, backend: str = "ort", threads: int | None = None):
    """One component's runner on a backend (a serving process that runs one graph)."""
    check_backend(backend)
    if backend == "ort":
        from .runners import OnnxRuntimeRunner

        return OnnxRuntimeRunner(ort_graph(artifact, name), artifact.components[name], threads=threads)
    if backend == "ort-cuda":
        from .ort_cuda import OrtCudaRunner, require_ort_cuda

        require_ort_cuda()
        return OrtCudaRunner(ort_graph(artifact, name), artifact.components[name],
                             int(artifact.manifest["processing"]["scale"]), cuda_graphs=False)
    if backend == "trt":
        from .trt_runner import trt_runners

        return trt_runners(artifact, cuda_graphs=False)[name]
    raise ValueError(f"a component runs on ort, ort-cuda or trt, not {backend}")
