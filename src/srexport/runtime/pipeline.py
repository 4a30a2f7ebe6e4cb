"""The super-resolution pipeline over any set of runners.

Stages: pre-processing, degradation (S3Diff), encode, denoise, decode,
post-processing. Everything model-specific comes from the manifest (the
processing constants, the denoise plan, which components exist); which
backend computes the graphs is the runners' business.

Thread safety: one pipeline serialises its calls with a lock (runners may
hold per-call buffers). A service that wants parallelism keeps one pipeline
per worker.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..processing import Processing, postprocess, preprocess
from .runners import Runner

STAGES = ("preprocess", "degradation", "encode", "denoise", "decode", "postprocess")


@dataclass
class StageOutputs:
    """Intermediate tensors of one run, for parity checks and timing."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class SRPipeline:
    def __init__(self, manifest: dict, runners: dict[str, Runner]):
        self.manifest = manifest
        self.runners = runners
        self.processing = Processing.from_dict(manifest["processing"])
        self.denoise_plan = manifest["denoise"]
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        return next(iter(self.runners.values())).backend

    def _run(self, component: str, env: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        runner = self.runners[component]
        return runner({name: env[name] for name in runner.spec.input_names})

    def run_stages(self, lr: torch.Tensor) -> StageOutputs:
        """LR (1,3,h,w) float in [0,1] -> every named tensor, timed per stage."""
        out = StageOutputs()
        clock = time.perf_counter

        t = clock()
        prepared = preprocess(lr, self.processing)
        env = out.tensors
        env.update(lr_image=lr, image=prepared.model_input)
        out.seconds["preprocess"] = clock() - t

        if "degradation" in self.runners:
            t = clock()
            env.update(self._run("degradation", env))
            out.seconds["degradation"] = clock() - t

        t = clock()
        env.update(self._run("vae_encoder", env))
        out.seconds["encode"] = clock() - t

        t = clock()
        plan = self.denoise_plan
        denoised = plan["latent_weight"] * env["latent"] if plan["latent_weight"] else 0
        for term in plan["terms"]:
            denoised = denoised + term["weight"] * self._run(term["component"], env)["denoised"]
        env["denoised"] = denoised
        out.seconds["denoise"] = clock() - t

        t = clock()
        env.update(self._run("vae_decoder", env))
        out.seconds["decode"] = clock() - t

        t = clock()
        env["output"] = postprocess(env["decoded"], prepared, self.processing)
        out.seconds["postprocess"] = clock() - t
        return out

    def __call__(self, lr) -> torch.Tensor:
        """Upscale one image: (1,3,h,w) tensor or HxWx3 uint8 array -> (1,3,H,W) in [0,1]."""
        if isinstance(lr, np.ndarray):
            lr = torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255.0
        with self._lock:
            return self.run_stages(lr).tensors["output"]

    def upscale(self, image):
        """PIL image in, PIL image out (RGB, 8-bit)."""
        from .images import pil_to_tensor, tensor_to_pil

        return tensor_to_pil(self(pil_to_tensor(image)))
