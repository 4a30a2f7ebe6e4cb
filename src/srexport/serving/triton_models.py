"""The Python-backend models of a Triton repository (``repository``): each model.py there is one
line that names a class here, so the code is srexport's, versioned and tested with it.

- ``ComponentModel``: one graph of the artifact on an srexport backend (ort, ort-cuda, trt).
  Triton's dynamic batcher hands it several requests at once; requests whose non-batch shapes
  agree are concatenated into one call and split back, so tiles of concurrent images share a
  batch.
- ``OrchestratorModel`` (the ``srexport`` model): image in, upscaled image out. It runs the
  runtime's own ``SRPipeline`` (pre/post-processing, the tile plan, blending, guidance) with
  every component call going to the component models through BLS (``BlsRunner``): one pipeline,
  two ways of calling a component.

Errors: a request the pipeline refuses (``UserError``: a bad image, scales the artifact cannot
take, too many pixels) gets an error response carrying the one-line message; anything else
raised while serving a request becomes an error response too, so one request never takes the
server down.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from ..artifact.guidance import Controls
from ..errors import UserError


def _pb():
    import triton_python_backend_utils as pb_utils  # only inside Triton's Python backend

    return pb_utils


def _parameters(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def _error_response(message: str):
    pb = _pb()
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(" ".join(str(message).split())))


# --- components ------------------------------------------------------------------------------


class ComponentModel:
    def initialize(self, args: dict) -> None:
        from ..artifact.manifest import load_artifact
        from ..runtime.loading import component_runner

        params = _parameters(args)
        self.name = params["component"]
        artifact = load_artifact(params["artifact"])  # every file's sha256 verified at load
        threads = int(params["threads"]) if params.get("threads") else None
        self.runner = component_runner(artifact, self.name, params.get("backend", "ort"), threads)
        self.spec = self.runner.spec
        self.fail_on = params.get("fail_on_width")  # tests: a component that raises

    def execute(self, requests):
        pb = _pb()
        feeds = []
        for request in requests:
            feeds.append({n: torch.from_numpy(np.ascontiguousarray(pb.get_input_tensor_by_name(request, n).as_numpy()))
                          for n in self.spec.input_names})
        responses = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, f in enumerate(feeds):  # one call per set of equal non-batch shapes
            groups.setdefault(tuple(tuple(v.shape[1:]) for v in f.values()), []).append(i)
        for members in groups.values():
            try:
                batch = {n: torch.cat([feeds[i][n] for i in members]) for n in self.spec.input_names}
                if self.fail_on is not None and batch[self.spec.input_names[0]].shape[-1] == int(self.fail_on):
                    raise RuntimeError(f"configured to fail on inputs {self.fail_on} wide")
                outputs = self.runner(batch)
                sizes = [feeds[i][self.spec.input_names[0]].shape[0] for i in members]
                split = {n: torch.split(outputs[n].detach().to("cpu"), sizes) for n in self.spec.output_names}
                for k, i in enumerate(members):
                    responses[i] = pb.InferenceResponse(output_tensors=[
                        pb.Tensor(n, split[n][k].contiguous().numpy()) for n in self.spec.output_names])
            except Exception as e:  # noqa: BLE001 - a failing batch answers its requests with the error
                for i in members:
                    responses[i] = _error_response(f"{self.name}: {e}")
        return responses

    def finalize(self) -> None:
        self.runner = None


# --- the orchestrator --------------------------------------------------------------------------


class BlsRunner:
    """A runner (``runtime.runners.Runner``) whose graph is another model of this Triton server."""

    backend = "triton"
    device = torch.device("cpu")

    def __init__(self, spec):
        self.spec = spec

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pb = _pb()
        request = pb.InferenceRequest(
            model_name=self.spec.name, requested_output_names=self.spec.output_names,
            inputs=[pb.Tensor(n, np.ascontiguousarray(feeds[n].detach().cpu().numpy())) for n in self.spec.input_names])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(response.error().message())
        return {n: torch.from_numpy(pb.get_output_tensor_by_name(response, n).as_numpy().copy())
                for n in self.spec.output_names}


def _optional(request, name: str):
    tensor = _pb().get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _text(array) -> str:
    value = array.reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else str(value)


def _number(value) -> float:
    """A request's float32 as the shortest decimal that rounds to it: LAMBDA_PIX 0.8 is the 0.8 of
    ``srexport run --lambda-pix 0.8``, not 0.800000011920929."""
    return float(str(np.float32(value)))


def _scalar(array, name: str) -> float:
    if array.size != 1:
        raise UserError(f"{name} takes one number, got {array.size}")
    return _number(array.reshape(-1)[0])


def request_image(image, image_bytes) -> torch.Tensor:
    """The request's picture as (1,3,h,w) float in [0,1]: IMAGE (UINT8 HxWx3) or IMAGE_BYTES."""
    from ..runtime.images import decode_image

    if (image is None) == (image_bytes is None):
        raise UserError("send exactly one of IMAGE (UINT8 HxWx3) and IMAGE_BYTES (one encoded PNG or JPEG)")
    if image_bytes is not None:
        if image_bytes.size != 1:
            raise UserError(f"IMAGE_BYTES takes one encoded image, got {image_bytes.size}")
        return decode_image(bytes(image_bytes.reshape(-1)[0]), "IMAGE_BYTES")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise UserError(f"IMAGE must be UINT8 HxWx3, got {image.dtype} {tuple(image.shape)}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


def request_controls(request) -> tuple[Controls, str | None]:
    lp, ls, cfg = (_optional(request, n) for n in ("LAMBDA_PIX", "LAMBDA_SEM", "CFG_SCALE"))
    guidance, degradation, color = (_optional(request, n) for n in ("GUIDANCE", "DEGRADATION", "COLOR_FIX"))
    controls = Controls(
        lambda_pix=_scalar(lp, "LAMBDA_PIX") if lp is not None else None,
        lambda_sem=_scalar(ls, "LAMBDA_SEM") if ls is not None else None,
        guidance=_text(guidance) if guidance is not None else None,
        cfg_scale=_scalar(cfg, "CFG_SCALE") if cfg is not None else None,
        degradation=tuple(_number(v) for v in degradation.reshape(-1)) if degradation is not None else None)
    return controls, (_text(color) if color is not None else None)


class OrchestratorModel:
    def initialize(self, args: dict) -> None:
        from ..artifact.manifest import load_artifact
        from ..runtime.pipeline import SRPipeline

        params = _parameters(args)
        artifact = load_artifact(params["artifact"])
        self.manifest = artifact.manifest
        self.pipeline = SRPipeline(artifact.manifest, {n: BlsRunner(s) for n, s in artifact.components.items()})
        self.max_output_megapixels = float(params.get("max_output_megapixels", "64"))

    def _upscale(self, request) -> np.ndarray:
        from ..runtime.regions import to_uint8_hwc, upscaled_size

        lr = request_image(_optional(request, "IMAGE"), _optional(request, "IMAGE_BYTES"))
        controls, color_fix = request_controls(request)
        pipeline = self.pipeline
        if color_fix is not None:
            from ..kernels.color import COLOR_FIXES

            if color_fix not in COLOR_FIXES:
                raise UserError(f"COLOR_FIX {color_fix!r} is not one of {', '.join(COLOR_FIXES)}")
        lr = pipeline.check_input(lr)
        height, width = upscaled_size(*lr.shape[-2:], pipeline.processing)
        if height * width > self.max_output_megapixels * 1e6:
            raise UserError(f"the output would be {width}x{height} = {height * width / 1e6:.1f} MP, over this "
                            f"server's limit of {self.max_output_megapixels:g} MP; send a smaller image")
        if color_fix is not None and color_fix != pipeline.processing.color_fix:
            pipeline = _with_color_fix(pipeline, color_fix)
        return to_uint8_hwc(pipeline(lr, **controls.given()))  # the bytes 'srexport run' writes

    def execute(self, requests):
        pb = _pb()
        responses = []
        for request in requests:
            try:
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("IMAGE", self._upscale(request))]))
            except UserError as e:
                responses.append(_error_response(str(e)))
            except Exception as e:  # noqa: BLE001 - one failing request must not take the server down
                responses.append(_error_response(f"{type(e).__name__}: {e}"))
        return responses


def _with_color_fix(pipeline, color_fix: str):
    import copy
    import dataclasses

    other = copy.copy(pipeline)
    other.processing = dataclasses.replace(pipeline.processing, color_fix=color_fix)
    return other
