"""Guidance chosen per call: what an artifact lets a request change, and the denoise plan it gives.

PiSA-SR (``model.kind`` "pisa-sr") combines two LoRA sets with the scales
lambda_pix and lambda_sem. How an artifact was built decides what a call may
ask for (the manifest's ``guidance`` section, written by the recipe):

- ``merged``: one UNet graph with W0 + dW_pix + (lambda_sem / lambda_pix) dW_sem
  baked in; only its own scales.
- ``exact``: two UNet graphs (W_pix, W_sem) whose weights do not depend on
  the scales; any scales, exact guidance (an affine combination of the two).
- ``adjustable``: one UNet graph keeping both LoRA sets as low-rank branches,
  ``y = W0 x + a B_pix A_pix x + b B_sem A_sem x`` with per-sample (a, b) in the
  graph input ``lora_scales``; any scales, in either mode:
  merged is one sample per image, (a, b) = (1, lambda_sem / lambda_pix), eps
  scaled by lambda_pix; exact is two samples per image in one call, (1, 0) and
  (1, 1), combined as upstream: eps = lp eps_pix + ls (eps_sem - eps_pix).

A plan is ``z0 = latent_weight * latent + sum(weight_i * z0_i)``, z0_i the
output of term i's component, fed term i's ``lora_scales`` where it has one;
terms of one component run as one batch (copy-major: every tile of the first
term's copy, then the second's). A term of weight 0 is left out: 0 * z0 adds
nothing, and exact guidance at lambda_pix = lambda_sem needs one UNet pass.

S3Diff: the CFG scale is a per-image graph input (``cfg_scale``) where the
artifact kept the negative pass, and a dynamic-degradation artifact takes
given scores in place of its estimator's.

Torch-free: the CLI, the runtime, the references and the Triton writer read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError

PISA_MODES = ("merged", "exact")  # what a call runs
PISA_BUILDS = ("merged", "exact", "adjustable")  # what --guidance builds
LORA_SCALES = "lora_scales"  # the adjustable UNet's per-sample (a, b) input
CFG_SCALE = "cfg_scale"  # S3Diff's per-image CFG scale input
def pisa_unets(built: str) -> list[str]:
    """The UNet graphs a PiSA-SR artifact built as ``built`` holds (the one place their names live)."""
    return ["unet_pix", "unet_sem"] if built == "exact" else ["unet"]


# (a, b) of exact guidance's two samples: W_pix = W0 + dW_pix, W_sem = W0 + dW_pix + dW_sem
EXACT_COEFFICIENTS = ((1.0, 0.0), (1.0, 1.0))
_PER_CALL_FIX = "rebuild with --guidance adjustable (or exact) to choose the scales per call"


@dataclass(frozen=True)
class Controls:
    """What one call asks for; None keeps the artifact's default."""

    lambda_pix: float | None = None
    lambda_sem: float | None = None
    guidance: str | None = None  # "merged" | "exact" (PiSA-SR)
    cfg_scale: float | None = None  # S3Diff
    degradation: tuple[float, float] | None = None  # S3Diff: (blur, noise) scores instead of the estimator's

    def given(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class Resolved:
    """A call's controls checked against an artifact: what the pipeline runs."""

    plan: dict  # the denoise plan (module docstring)
    cfg_scale: float | None = None  # fed as the cfg_scale input (None: the artifact has none)
    scores: tuple[float, float] | None = None  # given degradation scores (None: the estimator's)
    lambda_pix: float | None = None  # PiSA-SR: the scales and mode the plan is for
    lambda_sem: float | None = None
    mode: str | None = None


# --- PiSA-SR ---------------------------------------------------------------------------------------


def default_mode(built: str, lambda_pix: float) -> str:
    """The mode a call runs unless it asks: merged where the artifact has it (and lambda_pix is not 0)."""
    return "merged" if built != "exact" and lambda_pix != 0 else "exact"


def pisa_plan(built: str, mode: str, lambda_pix: float, lambda_sem: float, unets=None) -> dict:
    """The denoise plan of a PiSA-SR artifact built as ``built`` run in ``mode`` at these scales.
    ``unets``: the component names (default: the recipe's)."""
    lp, ls = float(lambda_pix), float(lambda_sem)
    unets = unets or pisa_unets(built)
    if built == "merged":
        return {"latent_weight": 0.0, "terms": [{"component": unets[0], "weight": 1.0}]}
    if built == "exact":
        pix, sem = unets
        terms = [{"component": pix, "weight": lp - ls}, {"component": sem, "weight": ls}]
    elif mode == "merged":
        return {"latent_weight": 1.0 - lp,
                "terms": [{"component": unets[0], "weight": lp, LORA_SCALES: [1.0, ls / lp]}]}
    else:
        unet = unets[0]
        terms = [{"component": unet, "weight": w, LORA_SCALES: list(c)}
                 for w, c in zip((lp - ls, ls), EXACT_COEFFICIENTS)]
    kept = [t for t in terms if t["weight"] != 0] or terms[-1:]
    return {"latent_weight": 1.0 - lp, "terms": kept}


def pisa_guidance_section(built: str, lambda_pix: float, lambda_sem: float, unets: list[str]) -> dict:
    """The manifest's ``guidance`` section of a PiSA-SR artifact."""
    modes = list(PISA_MODES) if built == "adjustable" else [built]
    default = default_mode(built, lambda_pix)
    return {
        "built": built, "modes": modes, "mode": default,
        "lambda_pix": float(lambda_pix), "lambda_sem": float(lambda_sem),
        "per_call_scales": built != "merged", "unets": list(unets),
        "description": {
            "merged": "scales baked into the UNet weights at build; a call can only use them",
            "exact": "two UNet graphs (W_pix, W_sem); any scales per call: z0 = (1 - lp) z + (lp - ls) z0_pix "
                     "+ ls z0_sem",
            "adjustable": "one UNet graph with both LoRA sets as branches mixed by the per-sample input "
                          "lora_scales (a, b); merged: (1, ls/lp), z0 = (1 - lp) z + lp z0; exact: (1, 0) and "
                          "(1, 1) as one batch, z0 = (1 - lp) z + (lp - ls) z0_pix + ls z0_sem",
        }[built],
    }


def _finite(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"--{name} {value!r} is not a number; pass a finite number") from None
    if not math.isfinite(number):
        raise UserError(f"--{name} {value!r} is not finite; pass a finite number")
    return number


def _resolve_pisa(section: dict, controls: Controls) -> Resolved:
    built = section["built"]
    lp = section["lambda_pix"] if controls.lambda_pix is None else _finite("lambda-pix", controls.lambda_pix)
    ls = section["lambda_sem"] if controls.lambda_sem is None else _finite("lambda-sem", controls.lambda_sem)
    mode = controls.guidance if controls.guidance is not None else section["mode"]
    if mode not in PISA_MODES:
        raise UserError(f"--guidance {mode!r} is not one of {', '.join(PISA_MODES)}")
    if mode not in section["modes"]:
        fix = ("rebuild with --guidance adjustable to run both" if built != "adjustable" else "")
        raise UserError(f"this artifact was built with {built} guidance and runs {', '.join(section['modes'])} "
                        f"only, not {mode}; {fix or 'pass --guidance ' + section['modes'][0]}")
    if built == "merged" and (lp, ls) != (section["lambda_pix"], section["lambda_sem"]):
        raise UserError(f"this merged artifact has lambda_pix={section['lambda_pix']:g}, lambda_sem="
                        f"{section['lambda_sem']:g} baked into its weights and cannot run {lp:g}, {ls:g}; "
                        f"{_PER_CALL_FIX}")
    if mode == "merged" and lp == 0:
        raise UserError("--lambda-pix 0 has no merged form (the semantic branch is scaled by lambda_sem / "
                        "lambda_pix); pass --guidance exact")
    return Resolved(pisa_plan(built, mode, lp, ls, section["unets"]), lambda_pix=lp, lambda_sem=ls, mode=mode)


# --- S3Diff -----------------------------------------------------------------------------------------


def s3diff_guidance_section(cfg_scale: float, positive_prompt: str | None = None,
                            negative_prompt: str | None = None) -> dict:
    """The manifest's ``guidance`` section of an S3Diff artifact: the negative pass is kept, and
    the scale is the per-image input ``cfg_scale``, unless built at cfg 1.0."""
    batched = float(cfg_scale) != 1.0
    return {"cfg_scale": float(cfg_scale), "batched": batched, "cfg_input": CFG_SCALE if batched else None,
            "positive_prompt": positive_prompt, "negative_prompt": negative_prompt if batched else None}


def _resolve_s3diff(manifest: dict, controls: Controls) -> Resolved:
    guidance, model = manifest["guidance"], manifest["model"]
    cfg = None
    if guidance.get("cfg_input"):
        cfg = guidance["cfg_scale"]
    if controls.cfg_scale is not None:
        value = _finite("cfg-scale", controls.cfg_scale)
        if not guidance["batched"]:
            if value != 1.0:
                raise UserError(f"this artifact was built with --cfg-scale 1.0, without the negative pass, so "
                                f"--cfg-scale {value:g} cannot run; rebuild with --cfg-scale {value:g}")
        elif not guidance.get("cfg_input"):
            if value != guidance["cfg_scale"]:
                raise UserError(f"this artifact has cfg {guidance['cfg_scale']:g} as a constant in its UNet graph; "
                                "rebuild it with this srexport to choose --cfg-scale per call")
        else:
            cfg = value
    scores = None
    if controls.degradation is not None:
        scores = parse_scores(controls.degradation)
        if model["degradation"]["mode"] != "dynamic":
            raise UserError(f"this artifact has the degradation {model['degradation']['fixed_scores']} merged into "
                            "its weights, so --degradation cannot change it; rebuild without --degradation "
                            "(dynamic) to give scores per call")
    return Resolved(manifest["denoise"], cfg_scale=cfg, scores=scores)


def parse_scores(value) -> tuple[float, float]:
    """(blur, noise) from ``"B,N"`` or two numbers, each in [0, 1]; one line otherwise."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        blur, noise = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise UserError(f"--degradation {value!r}: pass two numbers BLUR,NOISE in [0, 1] (e.g. 0.3,0.1)") from None
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (blur, noise)):
        raise UserError(f"--degradation {value!r}: both scores must be in [0, 1] (e.g. 0.3,0.1)")
    return blur, noise


# --- any artifact -----------------------------------------------------------------------------------


_PISA_CONTROLS = ("lambda_pix", "lambda_sem", "guidance")
_S3DIFF_CONTROLS = ("cfg_scale", "degradation")
_FLAG = {"lambda_pix": "--lambda-pix", "lambda_sem": "--lambda-sem", "guidance": "--guidance",
         "cfg_scale": "--cfg-scale", "degradation": "--degradation"}


def resolve(manifest: dict, controls: Controls | None = None) -> Resolved:
    """A call's controls against an artifact's manifest: the plan and inputs to run, or a one-line
    UserError naming the fix."""
    controls = controls or Controls()
    kind = (manifest.get("model") or {}).get("kind")
    if kind is None or "guidance" not in manifest:  # a bare plan (tests, hand-made pipelines): as it is
        if controls.given():
            raise UserError("this manifest has no model and guidance sections, so its guidance is fixed; rebuild "
                            "the artifact with this srexport")
        return Resolved(manifest["denoise"])
    own = _PISA_CONTROLS if kind == "pisa-sr" else _S3DIFF_CONTROLS
    foreign = [_FLAG[k] for k in controls.given() if k not in own]
    if foreign:
        raise UserError(f"{', '.join(foreign)} {'does' if len(foreign) == 1 else 'do'} not apply to a {kind} "
                        f"artifact; its options are {', '.join(_FLAG[k] for k in own)}")
    if kind == "pisa-sr":
        return _resolve_pisa(manifest["guidance"], controls)
    return _resolve_s3diff(manifest, controls)


def samples_per_image(manifest: dict) -> int:
    """The most samples per image one call of a UNet graph takes (2: adjustable exact guidance)."""
    guidance = manifest.get("guidance") or {}
    return len(EXACT_COEFFICIENTS) if guidance.get("built") == "adjustable" and "exact" in guidance.get(
        "modes", ()) else 1


def grouped_terms(plan: dict) -> list[tuple[str, list[dict]]]:
    """The plan's terms by component, in first-appearance order: each group runs as one batch."""
    groups: dict[str, list[dict]] = {}
    for term in plan["terms"]:
        groups.setdefault(term["component"], []).append(term)
    return list(groups.items())
