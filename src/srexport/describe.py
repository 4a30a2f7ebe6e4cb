"""A readable rendering of a manifest for ``srexport inspect``."""

from __future__ import annotations


def _dims(tensor: dict) -> str:
    return f"{tensor['name']}[{', '.join(str(d) for d in tensor['dims'])}] {tensor['dtype']}"


def describe_manifest(artifact) -> str:
    m = artifact.manifest
    model = m["model"]
    lines = [f"artifact   {artifact.folder}", f"model      {model['kind']}" + ("  (DEMO: untrained weights)" if model.get("demo") else "")]
    lines.append("settings   " + ", ".join(f"{k}={v}" for k, v in model["settings"].items()))
    if "lora" in model:
        lines.append("lora       " + ", ".join(f"{k}={v}" for k, v in model["lora"].items()))
    lines.append("processing " + ", ".join(f"{k}={v}" for k, v in m["processing"].items()))
    lines.append("latent     " + ", ".join(f"{k}={v!r}" for k, v in m["latent"].items()))
    plan = m["denoise"]
    terms = " + ".join(f"{t['weight']:g}*{t['component']}" for t in plan["terms"])
    lines.append(f"denoise    z0 = {plan['latent_weight']:g}*latent + {terms}" if plan["latent_weight"] else f"denoise    z0 = {terms}")
    e = m["export"]
    lines.append(f"export     opset {e['opset']}, precision {e['precision']}, io {e['io_dtype']}, {e['exporter']}, cleanup {e['cleanup']}")
    lines.append("components")
    for name, comp in m["components"].items():
        spec = comp["spec"]
        ins = ", ".join(_dims(t) for t in spec["inputs"])
        outs = ", ".join(_dims(t) for t in spec["outputs"])
        lines.append(f"  {name:<12} {ins} -> {outs}")
        if spec.get("description"):
            lines.append(f"  {'':<12} {spec['description']}")
    lines.append("files")
    for key, f in m["files"].items():
        lines.append(f"  {f['path']:<24} {f['bytes'] / 2**20:9.2f} MiB  sha256 {f['sha256'][:16]}...")
    checks = m.get("checks", {})
    if checks:
        lines.append("checks (at build)")
        for name, c in checks.get("components", {}).items():
            lines.append(f"  {name:<14} max_abs {c['max_abs']:.2e}  PSNR {c['psnr_db']} dB")
        for key in ("end_to_end", "merged_vs_exact"):
            if key in checks:
                c = checks[key]
                lines.append(f"  {key:<14} max_abs {c['max_abs']:.2e}  PSNR {c['psnr_db']} dB  ({c.get('input', '')})")
    lines.append("versions   " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    return "\n".join(lines)
