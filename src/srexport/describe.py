"""A readable rendering of a manifest for ``srexport inspect``."""

from __future__ import annotations


def _dims(tensor: dict) -> str:
    return f"{tensor['name']}[{', '.join(str(d) for d in tensor['dims'])}] {tensor['dtype']}"


def describe_manifest(artifact) -> str:
    m = artifact.manifest
    model = m["model"]
    lines = [f"artifact   {artifact.folder}", f"model      {model['kind']}" + (f"  (DEMO: {model.get('source', {}).get('demo_weights', 'random')} weights)"
                                                                         if model.get("demo") else "")]
    settings = dict(model["settings"])
    if model["kind"] == "s3diff" and settings.get("degradation") is None:
        settings["degradation"] = "dynamic"  # scores estimated per image (None in the settings)
    lines.append("settings   " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    if "lora" in model:
        lines.append("lora       " + ", ".join(f"{k}={v}" for k, v in model["lora"].items()))
    lines.append("processing " + ", ".join(f"{k}={v}" for k, v in m["processing"].items()))
    lines.append("latent     " + ", ".join(f"{k}={v!r}" for k, v in m["latent"].items()))
    plan = m["denoise"]
    terms = " + ".join(f"{t['weight']:g}*{t['component']}" + (f"(a, b = {t['lora_scales'][0]:g}, "
                                                              f"{t['lora_scales'][1]:g})" if "lora_scales" in t else "")
                       for t in plan["terms"])
    lines.append(f"denoise    z0 = {plan['latent_weight']:g}*latent + {terms}" if plan["latent_weight"] else f"denoise    z0 = {terms}")
    guidance = m.get("guidance") or {}
    if "built" in guidance:  # PiSA-SR (artifact/guidance.py)
        lines.append(f"guidance   built {guidance['built']}: runs {', '.join(guidance['modes'])}; default "
                     f"{guidance['mode']} at lambda_pix={guidance['lambda_pix']:g}, lambda_sem={guidance['lambda_sem']:g}"
                     + ("; any scales per call" if guidance["per_call_scales"] else "; these scales only"))
    elif guidance:
        lines.append(f"guidance   cfg {guidance['cfg_scale']:g}" + (
            " (per-image input cfg_scale)" if guidance.get("cfg_input") else
            " (a constant in the UNet graph)" if guidance.get("batched") else " (no negative pass)"))
    e = m["export"]
    lines.append(f"export     opset {e['opset']}, precision {e['precision']}, io {e['io_dtype']}, {e['exporter']}, cleanup {e['cleanup']}")
    if "tiling" in m:  # artifact/tile_settings.py
        t = m["tiling"]
        vae = t["vae"]["decoder"]
        lines.append(f"tiling     denoiser {t['tile']} px tiles, overlap {t['overlap']} (latent {t['latent_tile']}/"
                     f"{t['latent_overlap']}), batch {t['batch']}; VAE {vae['tile']} px tiles, overlap "
                     f"{vae['overlap']}, batch {vae['batch']}, GroupNorm statistics "
                     f"{t['vae'].get('norm', 'per-tile')}; Gaussian blend (variance {t['blend']['variance']}); "
                     f"short sides {'padded to the tile' if t.get('pad') else 'at their own length'}; whole-image "
                     f"runs up to {t['untiled_max_megapixels']:g} MP")
    lines.append("components")
    width = max(12, *(len(n) for n in m["components"]))
    for name, comp in m["components"].items():
        spec = comp["spec"]
        ins = ", ".join(_dims(t) for t in spec["inputs"])
        outs = ", ".join(_dims(t) for t in spec["outputs"])
        lines.append(f"  {name:<{width}} {ins} -> {outs}")
        if spec.get("description"):
            lines.append(f"  {'':<{width}} {spec['description']}")
        if "engine" in comp:  # export/engines.py
            en = comp["engine"]
            cc = ".".join(str(v) for v in en["compute_capability"])
            shapes = "; ".join(f"{k} {v['min']}..{v['max']}" for k, v in en["profiles"].items())
            lines.append(f"  {'':<{width}} TensorRT {en['tensorrt_version']} engine for {en['device_name']} (sm {cc}, "
                         f"hardware compat {en['hardware_compatibility_level']}"
                         f"{', version-compatible' if en.get('version_compatible') else ''}), {shapes}")
    lines.append("files")
    for key, f in m["files"].items():
        lines.append(f"  {f['path']:<24} {f['bytes'] / 2**20:9.2f} MiB  sha256 {f['sha256'][:16]}...")
    checks = m.get("checks", {})
    if checks:
        lines.append("checks (at build)")
        for name, c in checks.get("components", {}).items():
            lines.append(f"  {name:<{max(14, width)}} max_abs {c['max_abs']:.2e}  PSNR {c['psnr_db']} dB")
        parser = checks.get("tensorrt_parser")  # export/engines.py parser_check
        if parser:
            bad = {f"{c} (TensorRT {v})": len(p) for c, by in parser.items() for v, p in by.items() if p}
            lines.append("  TensorRT parser " + (", ".join(f"{k}: {n} problem(s)" for k, n in bad.items())
                                                 if bad else f"all graphs pass (TensorRT {', '.join(next(iter(parser.values())))})"))
        for key in ("end_to_end", "merged_vs_exact"):
            if key in checks:
                c = checks[key]
                lines.append(f"  {key:<14} max_abs {c['max_abs']:.2e}  PSNR {c['psnr_db']} dB  ({c.get('input', '')})")
        precision = checks.get("precision")  # calibration/precision.py: the fp32 checks above, then this
        if precision:
            lines.append(f"  {precision['precision']} vs the fp32 reference, on {len(precision['inputs'])} images "
                         f"(calibration: {(precision.get('calibration') or {}).get('size', '-')} tiles)")
            for way in ("onnxruntime_cpu", "fp16_rounding"):
                r = precision[way]
                e = r["end_to_end"]
                lines.append(f"    {way:<16} rel_l2 " + "  ".join(f"{c} {v['rel_l2']:.2e}" for c, v in r["components"].items())
                             + f"  | PSNR min {e['min_psnr_db']:.2f} dB, SSIM min {e['min_ssim']:.4f}")
    lines.append("versions   " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    return "\n".join(lines)
