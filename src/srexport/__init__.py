"""srexport: one-step diffusion super-resolution (PiSA-SR, S3Diff) to verified ONNX artifacts."""

__version__ = "0.1.0"


def load(artifact, backend: str = "ort", threads: int | None = None, attention: str = "fused"):
    """Load an artifact folder into a pipeline a service keeps and calls per image.

    ``pipeline(lr)`` takes a (1,3,h,w) float tensor in [0,1] (or an HxWx3 uint8
    array) and returns (1,3,H,W) in [0,1]; ``pipeline.upscale(pil_image)`` maps
    PIL to PIL. Both take the call's guidance as keywords where the artifact allows
    it: ``lambda_pix``, ``lambda_sem``, ``guidance`` ("merged" | "exact") for PiSA-SR,
    ``cfg_scale`` and ``degradation`` ((blur, noise) scores) for S3Diff. Calls on one
    pipeline are serialised by a lock, so sharing it between threads is safe; for
    parallel throughput keep one per worker. ``attention`` (onnxruntime backends): "fused" runs the
    artifact's MultiHeadAttention graphs where it has them, "plain" its portable graphs.
    """
    from .runtime.loading import load_pipeline

    return load_pipeline(artifact, backend=backend, threads=threads, attention=attention)
