"""The super-resolution pipeline over any set of runners.

Stages: pre-processing, degradation (S3Diff), encode, denoise, decode,
post-processing. Everything model-specific comes from the manifest (the
processing constants, the denoise plan, which components exist); which
backend computes the graphs is the runners' business.

Tiling (runtime/tiling.py): an artifact with a ``tiling`` section runs tiled
by default: encode, denoise and decode on tiles of the manifest's shapes, in
batches, blended with Gaussian weights, at a memory set by the tile size.
``tiled=False`` (``--no-tile``) runs whole images up to the manifest's
``untiled_max_megapixels``. An image within one tile runs whole either way.

Thread safety: one pipeline serialises its calls with a lock (runners may
hold per-call buffers). A service that wants parallelism keeps one pipeline
per worker.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from ..processing import Processing, postprocess, preprocess
from . import tiling as tiling_
from .regions import UpscaledSource, finish_in_place, upscaled_size
from .runners import Runner
from .timing import HostTimer, Timer

STAGES = ("preprocess", "degradation", "encode", "denoise", "decode", "postprocess")


@dataclass
class StageOutputs:
    """Intermediate tensors of one run, for parity checks and timing."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage
    total_seconds: float = 0.0  # first stage start to last stage end


class SRPipeline:
    def __init__(self, manifest: dict, runners: dict[str, Runner], tiled: bool | None = None):
        self.manifest = manifest
        self.runners = runners
        self.processing = Processing.from_dict(manifest["processing"])
        self.denoise_plan = manifest["denoise"]
        # --- tiling (runtime/tiling.py) ---
        self.tiling = tiling_.manifest_tiling(manifest)  # None: an artifact without a tiling section
        self.tiled = self.tiling is not None if tiled is None else bool(tiled)  # the default for calls
        if self.tiled and self.tiling is None:
            raise ValueError("tiled=True needs an artifact with a tiling section")
        # Whole-image runs are refused above this many output megapixels (None: no limit).
        self.untiled_max_megapixels = self.tiling.untiled_max_megapixels if self.tiling else None
        if self.tiling is not None:
            self.use_vae_norm(self.tiling.vae_norm)
        self.progress: tiling_.Progress | None = None  # (stage, tiles done, tiles in stage), e.g. a tqdm
        self._lock = threading.Lock()

    def use_vae_norm(self, method: str) -> None:
        """Tiled VAE GroupNorm statistics for later calls: "per-tile" (any artifact) or "two-pass"
        (an artifact built with it; a one-line UserError otherwise)."""
        import dataclasses

        from .tile_settings import check_vae_norm

        check_vae_norm(self.manifest, method)
        missing = [g for g in self._two_pass_graphs() if g not in self.runners] if method == "two-pass" else []
        if missing:
            raise ValueError(f"two-pass VAE needs runners for {', '.join(missing)}")
        self.tiling = dataclasses.replace(self.tiling, vae_norm=method)

    @staticmethod
    def _two_pass_graphs() -> list[str]:
        from .tile_settings import TWO_PASS_GRAPHS

        return [g for graphs in TWO_PASS_GRAPHS.values() for g in graphs]

    def _two_pass(self, grid: tiling_.TileGrid) -> bool:
        """Whether a VAE stage over ``grid`` runs two passes (one tile: the tile's own statistics
        are the image's, and the plain graph computes exactly that)."""
        return self.tiling.vae_norm == "two-pass" and grid.count > 1

    @property
    def backend(self) -> str:
        return next(iter(self.runners.values())).backend

    # --- device placement (GPU backends) -------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The runners' device (cpu for ort/torch, cuda for trt/ort-cuda). The LR image is
        moved there once; every later tensor, processing included, stays there."""
        return getattr(next(iter(self.runners.values())), "device", torch.device("cpu"))
    # ---------------------------------------------------------------------------------------

    def _run(self, component: str, env: dict[str, torch.Tensor], tiled_input: str | None = None
             ) -> dict[str, torch.Tensor]:
        runner = self.runners[component]
        if tiled_input is not None:  # a batch of tiles: per-image inputs repeated over it
            return runner(tiling_.tile_feeds(runner.spec, tiled_input, env[tiled_input], env))
        return runner({name: env[name] for name in runner.spec.input_names})

    def _denoise(self, env: dict[str, torch.Tensor], tiled: bool = False) -> torch.Tensor:
        """The manifest's denoise plan: z0 = latent_weight * latent + sum(weight_i * z0_i)."""
        plan = self.denoise_plan
        denoised = plan["latent_weight"] * env["latent"] if plan["latent_weight"] else 0
        for term in plan["terms"]:
            z0 = self._run(term["component"], env, "latent" if tiled else None)["denoised"]
            denoised = denoised + term["weight"] * z0
        return denoised

    def will_tile(self, lr_height: int, lr_width: int, tiled: bool | None = None) -> bool:
        """Whether an LR image of this size runs tiled (else whole); refuses a whole-image
        run above ``untiled_max_megapixels`` with a one-line UserError."""
        tiled = self.tiled if tiled is None else tiled
        height, width = upscaled_size(lr_height, lr_width, self.processing)
        if tiled:
            if self.tiling is None:
                raise ValueError("tiled=True needs an artifact with a tiling section")
            return not self.tiling.fits_one_tile(height, width)
        if self.untiled_max_megapixels is not None:
            tiling_.check_untiled(height, width, self.untiled_max_megapixels)
        return False

    def tile_counts(self, lr_height: int, lr_width: int) -> dict[str, int]:
        """Tiles per stage for an LR image of this size (for progress bars)."""
        height, width = upscaled_size(lr_height, lr_width, self.processing)
        counts = {}
        for stage, grid in tiling_.plan_tiles(self.tiling, height, width).items():
            if stage != "denoise" and self._two_pass(grid):
                counts[tiling_.stats_label(stage)] = grid.count
            counts[stage] = grid.count
        return counts

    def run_stages(self, lr: torch.Tensor, timer: Timer | None = None, tiled: bool | None = None) -> StageOutputs:
        """LR (1,3,h,w) float in [0,1] -> every named tensor, timed per stage.

        ``timer`` (runtime.timing) measures the stages: by default host
        perf_counter; ``srexport bench`` passes CUDA events on the runners' stream.
        ``tiled`` overrides the pipeline's default (``self.tiled``). A tiled run keeps
        ``lr_image``, ``scores`` (S3Diff), ``latent``, ``denoised`` and ``output`` (the
        full-size ``image`` and ``decoded`` never exist: tiles are made and finished in place).
        """
        if self.will_tile(*lr.shape[-2:], tiled=tiled):
            return self._run_tiled(lr, timer if timer is not None else HostTimer())
        out = StageOutputs()
        timer = timer if timer is not None else HostTimer()

        timer.start("preprocess")
        lr = lr.to(self.device)  # the one upload (a no-op on CPU backends)
        prepared = preprocess(lr, self.processing)
        env = out.tensors
        env.update(lr_image=lr, image=prepared.model_input)
        timer.stop("preprocess")

        if "degradation" in self.runners:
            timer.start("degradation")
            env.update(self._run("degradation", env))
            timer.stop("degradation")

        timer.start("encode")
        env.update(self._run("vae_encoder", env))
        timer.stop("encode")

        timer.start("denoise")
        env["denoised"] = self._denoise(env)
        timer.stop("denoise")

        timer.start("decode")
        env.update(self._run("vae_decoder", env))
        timer.stop("decode")

        timer.start("postprocess")
        env["output"] = postprocess(env["decoded"], prepared, self.processing)
        timer.stop("postprocess")
        out.seconds, out.total_seconds = timer.seconds(), timer.total()
        return out

    def _run_tiled(self, lr: torch.Tensor, timer: Timer) -> StageOutputs:
        """The tiled stages (see runtime/tiling.py); preprocessing happens per encoder tile."""
        out = StageOutputs()
        env = out.tensors
        timer.start("preprocess")
        lr = lr.to(self.device)
        source = UpscaledSource(lr, self.processing)
        env["lr_image"] = lr
        timer.stop("preprocess")
        stages = self.tiling.stages()
        grids = tiling_.plan_tiles(self.tiling, *source.size)

        if "degradation" in self.runners:  # per-image scores from the whole LR image, once
            timer.start("degradation")
            env.update(self._run("degradation", env))
            timer.stop("degradation")

        grid = grids["encode"]
        env["latent"] = self._vae_stage(
            "vae_encoder", stages["encode"], grid, "image", 4, env, timer, "preprocess",
            lambda origins: torch.cat([source.model_tile(y, x, grid.tile_h, grid.tile_w) for y, x in origins]))

        stage, grid = stages["denoise"], grids["denoise"]
        env["denoised"] = tiling_.run_stage(
            stage, grid, tiling_.latent_reader(env["latent"], grid),
            lambda tiles: self._denoise(dict(env, latent=tiles), tiled=True),
            tiling_.BlendCanvas(grid, stage, 4, lr.device), self.progress, timer)

        grid = grids["decode"]
        decoded = self._vae_stage("vae_decoder", stages["decode"], grid, "denoised", 3, env, timer, None,
                                  tiling_.latent_reader(env["denoised"], grid))

        timer.start("postprocess")
        env["output"] = finish_in_place(decoded, source)  # the output is the decoder's canvas
        timer.stop("postprocess")
        out.seconds, out.total_seconds = timer.seconds(), timer.total()
        return out

    def _vae_stage(self, plain: str, stage, grid, tiled_input: str, channels: int, env: dict, timer,
                   read_stage, read) -> torch.Tensor:
        """A tiled VAE stage: ``plain`` over the tiles, blended; with two-pass GroupNorm, first
        its stats graph over the tiles into a pool (env gets the pooled statistics), then its
        pooled graph. Both passes are timed as the stage."""
        from ..models.group_norm_stats import TWO_PASS_OF, StatsPool, norm_stats_name, tile_stats_name

        def compute(component: str, output: str):
            return lambda tiles: self._run(component, dict(env, **{tiled_input: tiles}), tiled_input)[output]

        output = self.runners[plain].spec.output_names[0]
        component = plain
        if self._two_pass(grid):
            stats_graph, component, _ = TWO_PASS_OF[plain]
            env[norm_stats_name(plain)] = tiling_.run_stage(
                stage, grid, read, compute(stats_graph, tile_stats_name(plain)), StatsPool(), self.progress, timer,
                read_stage, label=tiling_.stats_label(stage.name)).to(env["lr_image"].device)
        canvas = tiling_.BlendCanvas(grid, stage, channels, env["lr_image"].device)
        return tiling_.run_stage(stage, grid, read, compute(component, output), canvas, self.progress, timer,
                                 read_stage)

    def __call__(self, lr) -> torch.Tensor:
        """Upscale one image: (1,3,h,w) tensor or HxWx3 uint8 array -> (1,3,H,W) in [0,1]."""
        if isinstance(lr, np.ndarray):
            lr = torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255.0
        with self._lock:
            # The one download: the result comes back on the caller's device.
            return self.run_stages(lr).tensors["output"].to(lr.device)

    def upscale(self, image):
        """PIL image in, PIL image out (RGB, 8-bit)."""
        from .images import pil_to_tensor, tensor_to_pil

        return tensor_to_pil(self(pil_to_tensor(image)))
