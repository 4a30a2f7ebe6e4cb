"""Pictures for reports: the bench chart and the check side-by-side.

- ``plot_bench(report, path)``: one row per LR size; on the left, stacked
  horizontal bars of each variant's median stage latencies (end-to-end
  median, speedup and the GPU floor written beside each bar), on the right a
  parity column (PSNR against the fp32 reference, the bound as a line, red
  when missed). Skipped variants are named in the title block with why.
- ``side_by_side(...)``: bicubic | reference | backend | amplified |difference|,
  labelled, for ``srexport check --compare-image``.

matplotlib is imported lazily with the Agg backend (no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path

STAGE_COLOURS = {"preprocess": "#9e9e9e", "degradation": "#8d6e63", "encode": "#42a5f5", "denoise": "#ab47bc",
                 "decode": "#ef5350", "postprocess": "#66bb6a"}
PSNR_CAP = 120.0  # identical outputs (infinite PSNR) are drawn at this height


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"


def plot_bench(report: dict, path: str | Path) -> Path:
    from .runtime.pipeline import STAGES

    plt = _pyplot()
    cfg = report["config"]
    sizes = [tuple(s) for s in cfg["sizes"] if any(tuple(r["lr_size"]) == tuple(s) for r in report["results"])]
    variants = {v["name"]: v for v in report["variants"]}
    n_rows = max(1, len(sizes))
    n_bars = max([sum(1 for r in report["results"] if tuple(r["lr_size"]) == s) for s in sizes] or [1])
    n_skipped = sum(1 for v in report["variants"] if v["status"] != "ok")
    fig, axes = plt.subplots(n_rows, 2, figsize=(13, 1.2 + 0.2 * n_skipped + n_rows * (0.9 + 0.45 * n_bars)),
                             squeeze=False,
                             gridspec_kw={"width_ratios": [4, 1.2]})
    m = report["machine"]
    where = m["cuda_device"] if cfg["device"].startswith("cuda") else f"{m['cpu']}, {m['cores']} cores"
    title = (f"srexport bench: {report['artifact']['model']}{' (demo weights)' if report['artifact']['demo'] else ''}"
             f" on {where}\nmedian of {cfg['iters']} runs after {cfg['warmup']} warm-up; parity vs PyTorch fp32")
    skipped = [f"{v['name']}: {v['reason']}" for v in report["variants"] if v["status"] != "ok"]
    for line in skipped:
        title += f"\nnot measured: {line[:150]}"
    fig.suptitle(title, fontsize=9, x=0.01, ha="left")
    sizes_info = {tuple(s["lr_size"]): s for s in report["sizes"]}
    gpu = report["peaks"]["gpu"].upper()
    for row, lr in enumerate(sizes):
        ax, pax = axes[row]
        results = [r for r in report["results"] if tuple(r["lr_size"]) == lr]
        labels = [f"{r['variant']} {variants[r['variant']]['precision']}" for r in results]
        ys = list(range(len(results)))[::-1]
        for stage in STAGES:
            lefts = [sum(r["stages"][s]["median"] for s in STAGES[:STAGES.index(stage)] if s in r["stages"]) * 1e3
                     for r in results]
            widths = [r["stages"][stage]["median"] * 1e3 if stage in r["stages"] else 0 for r in results]
            if any(widths):
                ax.barh(ys, widths, left=lefts, color=STAGE_COLOURS[stage], label=stage if row == 0 else None,
                        height=0.6)
        longest = max((r["wall"]["median"] for r in results), default=0) * 1e3
        for y, r in zip(ys, results):
            note = f" {_ms(r['wall']['median'])} ms"
            if r["speedup"]:
                note += f"  {r['speedup']['end_to_end']:.2f}x"
            floor = sum(v["floor_seconds"] or 0 for v in r["roofline"].values())
            if floor:
                note += f"  ({gpu} floor {_ms(floor)} ms)"
            ax.text(sum(s["median"] for s in r["stages"].values()) * 1e3, y, note, va="center", fontsize=7)
        ax.set_yticks(ys, labels, fontsize=8)
        ax.set_xlim(0, longest * 1.45 or 1)
        out = results[0]["output_size"]
        info = sizes_info.get(lr, {})
        ax.set_title(f"LR {lr[0]}x{lr[1]} -> {out[0]}x{out[1]}"
                     + (f", {sum(c['flops'] for c in info['cost'].values()) / 1e9:.3g} GFLOP" if info.get("cost") else ""),
                     fontsize=9, loc="left")
        ax.set_xlabel("median latency per stage (ms)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        psnrs = [PSNR_CAP if r["parity"]["psnr_db"] is None else max(0.0, r["parity"]["psnr_db"]) for r in results]
        colours = ["#43a047" if r["parity"]["passed"] else "#e53935" for r in results]
        pax.barh(ys, psnrs, color=colours, height=0.6)
        for y, r, v in zip(ys, results, psnrs):
            text = "identical" if r["parity"]["psnr_db"] is None else f"{r['parity']['psnr_db']:.1f}"
            pax.text(v, y, f" {text}", va="center", fontsize=7)
        for bound in sorted({r["parity"]["min_psnr"] for r in results}):
            pax.axvline(bound, color="black", linestyle="--", linewidth=0.8)
        pax.set_yticks(ys, [""] * len(ys))
        pax.set_xlim(0, PSNR_CAP * 1.35)
        pax.set_title("parity: PSNR dB (-- bound)", fontsize=9, loc="left")
        pax.tick_params(axis="x", labelsize=7)
    if sizes:
        axes[0][0].legend(fontsize=7, ncol=6, loc="lower right", bbox_to_anchor=(1.0, 1.12), frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- check --compare-image ------------------------------------------------------------


def amplification(max_abs: float) -> float:
    """The power of ten that brings the largest difference near full scale (1 when already visible)."""
    if not max_abs > 0 or not math.isfinite(max_abs):
        return 1.0
    return float(10 ** max(0, math.floor(-math.log10(max_abs))))


def side_by_side(rows: list[dict], label_height: int = 14):
    """``rows``: dicts with lr (1,3,h,w), reference and actual (1,3,H,W), all in [0,1], name,
    scale, filter. One row per image: bicubic | reference | backend | |backend - reference| x N."""
    from PIL import Image, ImageDraw

    from .kernels import resize
    from .runtime.images import tensor_to_pil

    panels = []
    for row in rows:
        ref, act = row["reference"].float().cpu(), row["actual"].float().cpu()
        size = tuple(ref.shape[-2:])
        bicubic = resize(row["lr"].float().cpu(), size, row.get("filter", "bicubic")).clamp(0, 1)
        diff = (act - ref).abs()
        amp = amplification(float(diff.max()))
        cells = [("bicubic", bicubic), ("reference (PyTorch fp32)", ref), (f"{row['backend']}", act),
                 (f"|difference| x {amp:g}", (diff * amp).clamp(0, 1))]
        panels.append((row.get("name", ""), [(label, tensor_to_pil(t)) for label, t in cells]))
    gap = 4
    width = max(sum(img.width for _, img in cells) + gap * (len(cells) - 1) for _, cells in panels)
    height = sum(label_height * 2 + max(img.height for _, img in cells) + gap for _, cells in panels)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for name, cells in panels:
        draw.text((2, y), name, fill="black")
        y += label_height
        x = 0
        for label, img in cells:
            draw.text((x + 2, y), label, fill="black")
            canvas.paste(img, (x, y + label_height))
            x += img.width + gap
        y += label_height + max(img.height for _, img in cells) + gap
    return canvas


def crop_differences(reference, outputs: dict, y0: int, x0: int, size: int, title: str, path: str | Path,
                     reference_label: str = "untiled reference", amplify: int = 8) -> Path:
    """One row of ``size`` px crops at (y0, x0): the reference, each output, then each output's
    absolute difference to the reference times ``amplify`` (tensors (1, 3, H, W) in [0, 1])."""
    import numpy as np

    plt = _pyplot()
    crop = lambda t: t[0, :, y0 : y0 + size, x0 : x0 + size].permute(1, 2, 0).clamp(0, 1).numpy()
    panels = [(reference_label, crop(reference))] + [(label, crop(t)) for label, t in outputs.items()]
    panels += [(f"|{label} - reference| x{amplify}", np.clip(np.abs(crop(t) - crop(reference)) * amplify, 0, 1))
               for label, t in outputs.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (label, image) in zip(axes, panels):
        ax.imshow(image)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
