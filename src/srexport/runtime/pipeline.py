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

Inputs (``as_lr_tensor``): a (1,3,h,w) float tensor in [0,1] or an HxWx3 uint8
numpy array; float16, bfloat16 and float64 tensors are converted to float32.
Anything else (another type or dtype, a missing or extra dimension, channels
last, a batch of several images, a side below the model's minimum, NaN or Inf,
values outside [0,1]) is refused with one ``UserError`` line that is also a
``TypeError`` (type, dtype) or ``ValueError`` (shape, size, values) and names
the fix.

Greyscale (``grey_output``): by default an input whose three channels are
identical (runtime/images.py loads a greyscale file as L replicated to RGB)
gives an output whose three channels are the luma of the result, BT.601
``0.299 R + 0.587 G + 0.114 B`` (Pillow's ``convert("L")``): the networks add
colour casts to grey photos. ``grey_output = "color"`` keeps the colour output.
The rule belongs to ``__call__``/``upscale``; ``run_stages`` returns what the
networks make, which is what parity against the reference measures.

Guidance per call (artifact/guidance.py): ``pipeline(lr, lambda_pix=0.8,
lambda_sem=0.5, guidance="exact")`` on a PiSA-SR artifact that takes scales
(adjustable, exact), ``cfg_scale=`` and ``degradation=(blur, noise)`` on S3Diff;
``use_controls`` sets the defaults of later calls. A plan's terms on one graph
run as one batch (adjustable exact: two samples per tile, copy-major).

Thread safety: one pipeline serialises its calls with a lock (runners may
hold per-call buffers). A service that wants parallelism keeps one pipeline
per worker.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from ..artifact.guidance import CFG_SCALE, LORA_SCALES, Controls, Resolved, grouped_terms, resolve
from ..artifact.tile_settings import TWO_PASS_NORMS
from ..errors import InputTypeError, InputValueError
from ..processing import Processing, postprocess, preprocess
from . import tiling as tiling_
from .regions import UpscaledSource, band_rows, finish_in_place, upscaled_size
from .runners import Runner
from .timing import HostTimer, Timer

STAGES = ("preprocess", "degradation", "encode", "denoise", "decode", "postprocess")

EXPECTED_INPUT = "a (1,3,h,w) float tensor in [0,1] or an HxWx3 uint8 numpy array"
# Converted to float32 rather than refused: exact (or, for float64, a rounding the
# float32 graphs would make anyway), and the layout is already unambiguous.
CONVERTED_DTYPES = (torch.float16, torch.bfloat16, torch.float64)
GREY_OUTPUTS = ("auto", "color")  # see the module docstring
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, as Pillow's convert("L")
_NO_TILING = ("tiled=True needs an artifact with a tiling section and this one has none; pass tiled=False, or "
              "rebuild the artifact with this srexport")


def _array_hint(array: np.ndarray) -> str:
    if array.dtype.kind == "f":
        return "; for a float HxWx3 array in [0,1] pass torch.from_numpy(a).permute(2, 0, 1)[None]"
    if array.dtype.kind in "ui":
        return "; rescale it to 0..255 and convert with a.astype(np.uint8)"
    return ""


def _array_shape_hint(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "; a greyscale HxW array becomes one with np.repeat(a[..., None], 3, axis=2)"
    if len(shape) == 3 and shape[-1] == 4:
        return "; drop the alpha channel: a[..., :3]"
    if len(shape) == 3 and shape[0] == 3:
        return "; a 3xHxW array becomes one with a.transpose(1, 2, 0)"
    return ""


def _tensor_shape_hint(shape: tuple[int, ...]) -> str:
    if len(shape) == 3 and shape[0] == 3:
        return "; add the batch dimension: lr[None]"
    if len(shape) == 3 and shape[-1] == 3:
        return "; an HxWx3 tensor becomes one with lr.permute(2, 0, 1)[None]"
    if len(shape) == 2:
        return "; a greyscale HxW tensor becomes one with lr.expand(1, 3, -1, -1)"
    if len(shape) == 4 and shape[0] != 1 and shape[1] == 3:
        return "; one image per call: run lr[i:i + 1] for each i"
    if len(shape) == 4 and shape[-1] == 3:
        return "; a channels-last tensor becomes one with lr.permute(0, 3, 1, 2)"
    if len(shape) == 4 and shape[1] == 1:
        return "; a greyscale (1,1,h,w) tensor becomes one with lr.expand(-1, 3, -1, -1)"
    if len(shape) == 4 and shape[1] == 4:
        return "; drop the alpha channel: lr[:, :3]"
    return ""


def as_lr_tensor(lr, processing: Processing) -> torch.Tensor:
    """Check one LR image against the pipeline's input contract (module docstring) and return
    it as a (1,3,h,w) float32 tensor on its device. Raises a one-line ``InputTypeError`` /
    ``InputValueError`` naming the expected type, shape, dtype and range, and the fix."""
    if isinstance(lr, np.ndarray):
        if lr.dtype != np.uint8:
            raise InputTypeError(f"the image is a {lr.dtype} numpy array; pass {EXPECTED_INPUT}{_array_hint(lr)}")
        if lr.ndim != 3 or lr.shape[-1] != 3:
            raise InputValueError(f"the image array has shape {lr.shape}; pass {EXPECTED_INPUT}"
                                  f"{_array_shape_hint(lr.shape)}")
        # ascontiguousarray: torch.from_numpy refuses negative strides (a flipped view)
        lr = torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1)[None].float() / 255.0
    elif not isinstance(lr, torch.Tensor):
        raise InputTypeError(
            f"the image is a {type(lr).__module__}.{type(lr).__qualname__}; pass {EXPECTED_INPUT} (for a PIL "
            "image or an image file, use pipeline.upscale(...) or srexport.runtime.images.load_image(path))")
    if lr.dtype in CONVERTED_DTYPES:
        lr = lr.float()
    elif lr.dtype != torch.float32:
        hint = "; an 8-bit tensor becomes one with lr.float() / 255" if lr.dtype == torch.uint8 else ""
        raise InputTypeError(f"the image is a {lr.dtype} tensor; pass {EXPECTED_INPUT}{hint}")
    shape = tuple(lr.shape)
    if len(shape) != 4 or shape[:2] != (1, 3):
        raise InputValueError(f"the image tensor has shape {shape}; pass {EXPECTED_INPUT}{_tensor_shape_hint(shape)}")
    height, width = shape[-2:]
    if min(height, width) < processing.min_input_side():
        raise InputValueError(
            f"the image is {width}x{height} pixels; pass {EXPECTED_INPUT} with h and w at least "
            f"{processing.min_input_side()} pixels, this model's smallest side at x{processing.scale}")
    low, high = (float(v) for v in torch.aminmax(lr))  # NaN propagates into both
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InputValueError(f"the image holds NaN or Inf values; pass {EXPECTED_INPUT} with finite values "
                              "(torch.nan_to_num(lr).clamp(0, 1) if they are expected)")
    if low < 0 or high > 1:
        # Guess the cause from the span: a slight overshoot (a resampled image) is not a 0..255 image.
        if low >= 0 and 1.5 < high <= 255:
            fix = "it looks like 0..255: divide by 255"
        elif -1 <= low < -0.5 and high <= 1:
            fix = "it looks like [-1,1]: use lr * 0.5 + 0.5"
        else:
            fix = "rescale it to [0,1], or clamp a resampling overshoot with lr.clamp(0, 1)"
        raise InputValueError(f"the image's values span [{low:.4g}, {high:.4g}]; pass {EXPECTED_INPUT}: {fix}")
    return lr


def is_grey(lr: torch.Tensor) -> bool:
    """Whether a (1,3,h,w) image's three channels are identical (exactly: a greyscale photo
    replicated to RGB; a colour photo of a grey scene is colour)."""
    return torch.equal(lr[:, 0], lr[:, 1]) and torch.equal(lr[:, 0], lr[:, 2])


def luma_in_place(image: torch.Tensor) -> torch.Tensor:
    """Every channel of a (1,3,H,W) image in [0,1] set to its BT.601 luma, band by band so a
    large output needs no full-size temporary."""
    height, width = image.shape[-2:]
    step = band_rows(width)
    r, g, b = LUMA_WEIGHTS
    for y0 in range(0, height, step):
        band = image[0, :, y0:y0 + step]
        luma = (band[0] * r).add_(band[1], alpha=g).add_(band[2], alpha=b).clamp_(0, 1)
        band.copy_(luma.expand_as(band))
    return image


def check_grey_output(value: str) -> str:
    if not isinstance(value, str) or value not in GREY_OUTPUTS:
        raise InputValueError(f"grey_output {value!r} is not one of {', '.join(GREY_OUTPUTS)}")
    return value


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
        self.resolved = resolve(manifest)  # the guidance of calls that do not choose (use_controls)
        # --- tiling (runtime/tiling.py) ---
        self.tiling = tiling_.manifest_tiling(manifest)  # None: an artifact without a tiling section
        self.tiled = self.tiling is not None if tiled is None else bool(tiled)  # the default for calls
        if self.tiled and self.tiling is None:
            raise InputValueError(_NO_TILING)
        # Whole-image runs are refused above this many output megapixels (None: no limit).
        self.untiled_max_megapixels = self.tiling.untiled_max_megapixels if self.tiling else None
        if self.tiling is not None:
            self.use_vae_norm(self.tiling.vae_norm)
            self.use_unet_norm(self.tiling.unet_norm)
        self.progress: tiling_.Progress | None = None  # (stage, tiles done, tiles in stage), e.g. a tqdm
        self.grey_output = "auto"  # GREY_OUTPUTS; a call's keyword overrides it
        self._defaults = Controls()
        self._lock = threading.Lock()

    @property
    def grey_output(self) -> str:
        """What a greyscale input gives: "auto" (the luma of the result in all three channels,
        BT.601 0.299 R + 0.587 G + 0.114 B) or "color" (the networks' colour output)."""
        return self._grey_output

    @grey_output.setter
    def grey_output(self, value: str) -> None:
        self._grey_output = check_grey_output(value)

    def check_input(self, lr) -> torch.Tensor:
        """``lr`` checked against the input contract (``as_lr_tensor``), as a float32 tensor: a
        service can refuse a bad request before queueing it."""
        return as_lr_tensor(lr, self.processing)

    @property
    def denoise_plan(self) -> dict:
        """The denoise plan of calls that do not choose their guidance."""
        return self.resolved.plan

    def controls(self, controls: Controls | None = None, **given) -> Resolved:
        """A call's guidance (``Controls`` or its fields as keywords) checked against the artifact,
        over the defaults of ``use_controls``; a one-line UserError names the fix."""
        controls = controls if controls is not None else Controls(**given)
        if not controls.given():
            return self.resolved
        return resolve(self.manifest, Controls(**{**self._defaults.given(), **controls.given()}))

    def use_controls(self, controls: Controls | None = None, **given) -> None:
        """The guidance of later calls that do not choose (``controls``): e.g. a service's default
        slider position, or ``srexport check --lambda-pix 0.8``."""
        controls = controls if controls is not None else Controls(**given)
        self.resolved = resolve(self.manifest, controls)
        self._defaults = controls

    def use_vae_norm(self, method: str) -> None:
        """Tiled VAE GroupNorm statistics for later calls: "per-tile" (any artifact) or "two-pass"
        (an artifact built with it; a one-line UserError otherwise)."""
        import dataclasses

        from ..artifact.tile_settings import check_vae_norm

        check_vae_norm(self.manifest, method)
        # a pipeline without runners only plans (bench, tile counts); one with runners must have these
        missing = [g for g in self._two_pass_graphs() if g not in self.runners] if (
            method in TWO_PASS_NORMS and self.runners) else []
        if missing:
            raise ValueError(f"two-pass VAE needs runners for {', '.join(missing)}")
        self.tiling = dataclasses.replace(self.tiling, vae_norm=method)

    @staticmethod
    def _two_pass_graphs() -> list[str]:
        from ..artifact.tile_settings import TWO_PASS_GRAPHS

        return [g for graphs in TWO_PASS_GRAPHS.values() for g in graphs]

    def _plain_graph(self, stage: str) -> str:
        """The one-pass graph serving a VAE stage, by its spec (the two-pass graphs serve it too)."""
        two_pass = self._two_pass_graphs()
        graphs = [n for n, r in self.runners.items() if r.spec.stage == stage and n not in two_pass]
        if len(graphs) != 1:
            raise ValueError(f"the artifact has {len(graphs)} graphs for the {stage} stage ({', '.join(graphs)}); "
                             "one is needed")
        return graphs[0]

    def _statistics_grid(self, stage: tiling_.StageTiling, grid: tiling_.TileGrid) -> tiling_.TileGrid | None:
        """The grid a stage's statistics pass runs over (``StageTiling.statistics_grid``: its own
        tiles for two-pass, its input at 1/k for coarse), or None (one pass: per-tile statistics,
        or one tile, whose own statistics are the image's)."""
        norm = self.tiling.unet_norm if stage.name == "denoise" else self.tiling.vae_norm
        if norm == "per-tile" or grid.count == 1:
            return None
        return stage.statistics_grid(grid.height, grid.width, norm)

    def use_unet_norm(self, method: str) -> None:
        """The UNet's tiled GroupNorm statistics for later calls: "per-tile" (any artifact) or
        "coarse" (an artifact with its UNet graphs' statistics graphs; a one-line UserError
        otherwise)."""
        import dataclasses

        from ..artifact.tile_settings import UNET_TWO_PASS_GRAPHS, check_unet_norm

        check_unet_norm(self.manifest, method)
        # every UNet graph a call's plan may name, not only the default plan's
        terms = (self.manifest.get("guidance") or {}).get("unets") or list(
            dict.fromkeys(t["component"] for t in self.denoise_plan["terms"]))
        missing = [g for c in terms for g in UNET_TWO_PASS_GRAPHS[c] if g not in self.runners] if (
            method == "coarse" and self.runners) else []
        if missing:
            raise ValueError(f"coarse UNet statistics need runners for {', '.join(missing)}")
        self.tiling = dataclasses.replace(self.tiling, unet_norm=method)

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

    def _denoise(self, env: dict[str, torch.Tensor], plan: dict, pooled: bool = False) -> torch.Tensor:
        """The denoise plan: z0 = latent_weight * latent + sum(weight_i * z0_i), the terms of one
        graph as one batch; ``pooled``: each UNet graph's pooled graph, with the statistics in ``env``."""
        denoised = plan["latent_weight"] * env["latent"] if plan["latent_weight"] else 0
        for component, terms in grouped_terms(plan):
            outputs = self._run_terms(component, terms, env, "pooled" if pooled else "plain").chunk(len(terms))
            for term, z0 in zip(terms, outputs):
                denoised = denoised + term["weight"] * z0
        return denoised

    def _run_terms(self, plain: str, terms: list[dict], env: dict, kind: str = "plain") -> torch.Tensor:
        """One call of UNet graph ``plain`` (``kind`` "plain", or its "stats" or "pooled" graph) on
        ``env["latent"]`` for every term on it: the latent once per term (copy-major), each copy
        with its term's lora_scales and pooled statistics. Returns the first output, batch
        terms x latent batch."""
        from ..models.group_norm_stats import TWO_PASS_OF, norm_stats_name

        latent = env["latent"]
        per_copy = {}
        if LORA_SCALES in terms[0]:
            per_copy[LORA_SCALES] = torch.tensor([t[LORA_SCALES] for t in terms], dtype=latent.dtype,
                                                 device=latent.device)
        component = {"plain": plain, "stats": TWO_PASS_OF[plain][0], "pooled": TWO_PASS_OF[plain][1]}[kind]
        if kind == "pooled":
            per_copy[norm_stats_name(plain)] = env[norm_stats_name(plain)]
        runner = self.runners[component]
        return runner(tiling_.tile_feeds(runner.spec, "latent", latent, env, per_copy))[runner.spec.output_names[0]]

    def will_tile(self, lr_height: int, lr_width: int, tiled: bool | None = None) -> bool:
        """Whether an LR image of this size runs tiled (else whole); refuses a whole-image
        run above ``untiled_max_megapixels`` with a one-line UserError."""
        tiled = self.tiled if tiled is None else tiled
        height, width = upscaled_size(lr_height, lr_width, self.processing)
        if tiled:
            if self.tiling is None:
                raise InputValueError(_NO_TILING)
            return not self.tiling.fits_one_tile(height, width)
        if self.untiled_max_megapixels is not None:
            tiling_.check_untiled(height, width, self.untiled_max_megapixels)
        return False

    def tile_counts(self, lr_height: int, lr_width: int, resolved: Resolved | None = None) -> dict[str, int]:
        """Tiles per stage for an LR image of this size (for progress bars); ``resolved``: a call's
        guidance (default: ``self.resolved``)."""
        plan = (resolved or self.resolved).plan
        height, width = upscaled_size(lr_height, lr_width, self.processing)
        counts = {}
        stages = self.tiling.stages()
        for stage, grid in tiling_.plan_tiles(self.tiling, height, width).items():
            statistics = self._statistics_grid(stages[stage], grid)
            if statistics is not None:  # the denoiser's: once per UNet graph of the plan
                graphs = len(grouped_terms(plan)) if stage == "denoise" else 1
                counts[tiling_.stats_label(stage)] = statistics.count * graphs
            counts[stage] = grid.count
        return counts

    def tile_plan(self, lr_height: int, lr_width: int) -> dict:
        """How an LR image of this size is tiled: per stage the tile count, tile shape (its input's
        pixels) and computed area over the image's, and the total work against an untiled pass
        (``artifact.tile_plan.work_ratios``). Empty for an image that runs whole."""
        height, width = upscaled_size(lr_height, lr_width, self.processing)
        if not self.will_tile(lr_height, lr_width):
            return {}
        grids = tiling_.plan_tiles(self.tiling, height, width)
        stages = self.tiling.stages()
        statistics = {s: self._statistics_grid(stages[s], g) for s, g in grids.items()}
        ratios = tiling_.work_ratios(grids, {s: g for s, g in statistics.items() if g is not None})
        return {"stages": {s: {"tiles": g.count, "tile": [g.tile_h, g.tile_w], "area_ratio": round(ratios[s], 4)}
                           for s, g in grids.items()},
                "work_vs_untiled": round(ratios["total"], 4), "plan": self.tiling.plan}

    def use_tile_plan(self, plan: str) -> None:
        """The tile layout for later calls (artifact.tile_plan.TILE_PLANS): any plan runs on the
        onnxruntime and PyTorch backends; engines are profiled for the artifact's own."""
        import dataclasses

        from ..errors import UserError

        if self.tiling is None:
            raise UserError("this artifact has no tiling section, so --tile-plan does not apply; rebuild it with "
                            "this srexport")
        self.tiling = dataclasses.replace(self.tiling, plan=plan).validate()

    def run_stages(self, lr: torch.Tensor, timer: Timer | None = None, tiled: bool | None = None,
                   resolved: Resolved | None = None) -> StageOutputs:
        """LR (1,3,h,w) float in [0,1] -> every named tensor, timed per stage.

        ``lr`` is checked (and converted) as ``__call__``'s; the greyscale rule is not applied:
        ``output`` is what the networks make.

        ``timer`` (runtime.timing) measures the stages: by default host
        perf_counter; ``srexport bench`` passes CUDA events on the runners' stream.
        ``tiled`` overrides the pipeline's default (``self.tiled``). A tiled run keeps
        ``lr_image``, ``scores`` (S3Diff), ``latent``, ``denoised`` and ``output`` (the
        full-size ``image`` and ``decoded`` never exist: tiles are made and finished in place).
        ``resolved``: the call's guidance (``controls``; default ``self.resolved``).
        """
        lr = self.check_input(lr)
        return self._run_stages(lr, timer, tiled, resolved or self.resolved)

    def _call_inputs(self, env: dict, resolved: Resolved, device) -> None:
        """The per-image inputs a call's guidance gives: S3Diff's cfg scale, its given scores."""
        if resolved.cfg_scale is not None:
            env[CFG_SCALE] = torch.full((1, 1), float(resolved.cfg_scale), device=device)
        if resolved.scores is not None:
            env["scores"] = torch.tensor([resolved.scores], dtype=torch.float32, device=device)

    def _run_stages(self, lr: torch.Tensor, timer: Timer | None, tiled: bool | None,
                    resolved: Resolved) -> StageOutputs:
        if self.will_tile(*lr.shape[-2:], tiled=tiled):
            return self._run_tiled(lr, timer if timer is not None else HostTimer(), resolved)
        out = StageOutputs()
        timer = timer if timer is not None else HostTimer()

        timer.start("preprocess")
        lr = lr.to(self.device)  # the one upload (a no-op on CPU backends)
        prepared = preprocess(lr, self.processing)
        env = out.tensors
        env.update(lr_image=lr, image=prepared.model_input)
        self._call_inputs(env, resolved, lr.device)
        timer.stop("preprocess")

        self._run_whole_image(env, timer)

        timer.start("encode")
        env.update(self._run(self._plain_graph("encode"), env))
        timer.stop("encode")

        timer.start("denoise")
        env["denoised"] = self._denoise(env, resolved.plan)
        timer.stop("denoise")

        timer.start("decode")
        env.update(self._run(self._plain_graph("decode"), env))
        timer.stop("decode")

        timer.start("postprocess")
        env["output"] = postprocess(env["decoded"], prepared, self.processing)
        timer.stop("postprocess")
        out.seconds, out.total_seconds = timer.seconds(), timer.total()
        return out

    @property
    def _denoised_channels(self) -> int:
        """What the denoise plan's graphs return per pixel (their spec, not a literal 4)."""
        return self.runners[self.denoise_plan["terms"][0]["component"]].spec.output_channels

    def _run_whole_image(self, env: dict, timer: Timer) -> None:
        """The components whose spec says they run once on the whole LR image, each timed as its
        stage; one whose outputs the call gave (S3Diff's scores) is skipped."""
        for component, runner in self.runners.items():
            if runner.spec.whole_image and not set(runner.spec.output_names) <= env.keys():
                timer.start(runner.spec.stage)
                env.update(self._run(component, env))
                timer.stop(runner.spec.stage)

    def _run_tiled(self, lr: torch.Tensor, timer: Timer, resolved: Resolved) -> StageOutputs:
        """The tiled stages (see runtime/tiling.py); preprocessing happens per encoder tile."""
        out = StageOutputs()
        env = out.tensors
        timer.start("preprocess")
        lr = lr.to(self.device)
        source = UpscaledSource(lr, self.processing)
        env["lr_image"] = lr
        self._call_inputs(env, resolved, lr.device)
        timer.stop("preprocess")
        stages = self.tiling.stages()
        grids = tiling_.plan_tiles(self.tiling, *source.size)

        self._run_whole_image(env, timer)  # per-image inputs (S3Diff's scores) from the whole LR image, once

        grid = grids["encode"]
        env["latent"] = self._vae_stage(
            self._plain_graph("encode"), stages["encode"], grid, "image", env, timer, "preprocess",
            lambda g: lambda origins: torch.cat([source.model_tile(y, x, g.tile_h, g.tile_w) for y, x in origins]),
            lambda k, h, w: source.coarse_model_input(k, h, w))

        stage, grid = stages["denoise"], grids["denoise"]
        pooled = self._denoise_statistics(stage, grid, env, timer, resolved.plan)
        env["denoised"] = tiling_.run_stage(
            stage, grid, tiling_.latent_reader(env["latent"], grid),
            lambda tiles: self._denoise(dict(env, latent=tiles), resolved.plan, pooled=pooled),
            tiling_.BlendCanvas(grid, stage, self._denoised_channels, lr.device), self.progress, timer)

        grid = grids["decode"]
        decoded = self._vae_stage(self._plain_graph("decode"), stages["decode"], grid, "denoised", env, timer, None,
                                  lambda g: tiling_.latent_reader(env["denoised"], g),
                                  lambda k, h, w: tiling_.coarse(env["denoised"], k, h, w))

        timer.start("postprocess")
        env["output"] = finish_in_place(decoded, source)  # the output is the decoder's canvas
        timer.stop("postprocess")
        out.seconds, out.total_seconds = timer.seconds(), timer.total()
        return out

    def _denoise_statistics(self, stage, grid, env: dict, timer, plan: dict) -> bool:
        """Coarse UNet statistics: each UNet graph's stats graph over the latent averaged over k x k
        (its grid: ``_statistics_grid``), pooled into env, apart per term where a graph runs several
        (``_run_terms``); False where the tiles use their own."""
        from ..models.group_norm_stats import StatsPool, norm_stats_name

        statistics = self._statistics_grid(stage, grid)
        if statistics is None:
            return False
        size = stage.coarse_size(grid.height, grid.width)
        source = tiling_.coarse(env["latent"], *size) if size is not None else env["latent"]
        groups = grouped_terms(plan)
        for i, (plain, terms) in enumerate(groups):
            def compute(tiles, plain=plain, terms=terms):
                return self._run_terms(plain, terms, dict(env, latent=tiles), "stats")

            def progress(label, done, total, before=i * statistics.count):  # one count over every graph
                if self.progress is not None:
                    self.progress(label, before + done, total * len(groups))

            env[norm_stats_name(plain)] = tiling_.run_stage(
                stage, statistics, tiling_.latent_reader(source, statistics), compute, StatsPool(len(terms)),
                progress, timer, None, label=tiling_.stats_label(stage.name)).to(env["lr_image"].device)
        return True

    def _vae_stage(self, plain: str, stage, grid, tiled_input: str, env: dict, timer,
                   read_stage, reader, coarse_input) -> torch.Tensor:
        """A tiled VAE stage: ``plain`` over the tiles, blended. With two-pass or coarse GroupNorm,
        first its stats graph over the statistics grid (``_statistics_grid``) into a pool (env
        gets the pooled statistics), then its pooled graph over the tiles; both passes are timed
        as the stage. ``reader(grid)`` reads the input's tiles; ``coarse_input(k, h, w)`` gives the
        input averaged over k x k pixels, cropped to h x w (the coarse norm's)."""
        from ..models.group_norm_stats import TWO_PASS_OF, StatsPool, norm_stats_name, tile_stats_name

        def compute(component: str, output: str):
            return lambda tiles: self._run(component, dict(env, **{tiled_input: tiles}), tiled_input)[output]

        output = self.runners[plain].spec.output_names[0]
        component = plain
        statistics = self._statistics_grid(stage, grid)
        if statistics is not None:
            stats_graph, component, _ = TWO_PASS_OF[plain]
            read = reader(statistics)
            size = stage.coarse_size(grid.height, grid.width) if self.tiling.vae_norm == "coarse" else None
            if size is not None:
                if timer is not None and read_stage:
                    timer.start(read_stage)
                small = coarse_input(*size)
                if timer is not None and read_stage:
                    timer.stop(read_stage)
                read = tiling_.latent_reader(small, statistics)
            env[norm_stats_name(plain)] = tiling_.run_stage(
                stage, statistics, read, compute(stats_graph, tile_stats_name(plain)), StatsPool(),
                self.progress, timer, None, label=tiling_.stats_label(stage.name)).to(env["lr_image"].device)
        canvas = tiling_.BlendCanvas(grid, stage, self.runners[plain].spec.output_channels, env["lr_image"].device)
        return tiling_.run_stage(stage, grid, reader(grid), compute(component, output), canvas, self.progress, timer,
                                 read_stage)

    def __call__(self, lr, grey_output: str | None = None, **controls) -> torch.Tensor:
        """Upscale one image: a (1,3,h,w) float tensor in [0,1] (float16, bfloat16 and float64
        are converted to float32) or an HxWx3 uint8 numpy array -> (1,3,H,W) float32 in [0,1],
        on the tensor's device (CPU for an array). Other inputs are refused with one line naming
        the fix (module docstring). ``grey_output`` ("auto" | "color") overrides
        ``self.grey_output`` for this call: with "auto" a greyscale input (identical channels)
        gives its result's BT.601 luma (0.299 R + 0.587 G + 0.114 B) in all three channels.
        ``controls``: this call's guidance (``artifact.guidance.Controls``' fields: lambda_pix,
        lambda_sem, guidance; cfg_scale, degradation), checked before any work."""
        grey_output = self.grey_output if grey_output is None else check_grey_output(grey_output)
        resolved = self.controls(**controls)
        lr = self.check_input(lr)
        with self._lock:
            output = self._run_stages(lr, None, None, resolved).tensors["output"]
            if grey_output == "auto" and is_grey(lr):
                luma_in_place(output)  # on the runners' device, before the download
            # The one download: the result comes back on the caller's device.
            return output.to(lr.device)

    def upscale(self, image, grey_output: str | None = None, **controls):
        """A PIL image, or the path of an image file (read by ``runtime.images.load_image``), in;
        a PIL RGB 8-bit image out. ``grey_output`` and ``controls`` as for ``__call__``."""
        from pathlib import Path

        from PIL import Image

        from .images import load_image, pil_to_tensor, tensor_to_pil

        self.controls(**controls)  # a bad option is refused before the file is read
        if isinstance(image, (str, Path)):
            lr = load_image(image)
        elif isinstance(image, Image.Image):
            lr = pil_to_tensor(image)
        else:
            raise InputTypeError(
                f"upscale takes a PIL image or an image file's path, not a {type(image).__module__}."
                f"{type(image).__qualname__}; for {EXPECTED_INPUT} call the pipeline itself: pipeline(lr)")
        return tensor_to_pil(self(lr, grey_output=grey_output, **controls))
