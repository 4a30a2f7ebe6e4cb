"""Summarise benchmarks/results/bench_*.json (schema srexport.bench v1) into benchmarks/README.md.

    python benchmarks/summarise.py          # rewrites the table between the markers in README.md
    python benchmarks/summarise.py --print  # prints it instead
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).parent
BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"
STAGES = ("preprocess", "degradation", "encode", "denoise", "decode", "postprocess")


def _ms(seconds):
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"


def table(results_dir: Path = HERE / "results") -> str:
    header = ["result", "model", "machine", "LR -> out", "variant", *STAGES, "end to end", "speedup", "PSNR dB"]
    rows = []
    for path in sorted(results_dir.glob("bench_*.json")):
        report = json.loads(path.read_text())
        if report.get("schema") != "srexport.bench":
            continue
        m = report["machine"]
        machine = m["cuda_device"] if report["config"]["device"].startswith("cuda") else f"{m['cores']}-core CPU"
        precisions = {v["name"]: v["precision"] for v in report["variants"]}
        model = report["artifact"]["model"] + (" (demo)" if report["artifact"]["demo"] else "")
        for r in report["results"]:
            lr, out = r["lr_size"], r["output_size"]
            psnr = r["parity"]["psnr_db"]
            rows.append([f"[{path.stem}](results/{path.name})", model, machine, f"{lr[0]}² -> {out[0]}²"
                         if lr[0] == lr[1] and out[0] == out[1] else f"{lr[0]}x{lr[1]} -> {out[0]}x{out[1]}",
                         f"{r['variant']} {precisions.get(r['variant'], '')}",
                         *(_ms(r["stages"][s]["median"]) if s in r["stages"] else "-" for s in STAGES),
                         _ms(r["wall"]["median"]), f"{r['speedup']['end_to_end']:.2f}x" if r["speedup"] else "-",
                         "identical" if psnr is None else f"{psnr:.1f}"])
        for v in report["variants"]:
            if v["status"] != "ok":
                rows.append([f"[{path.stem}](results/{path.name})", model, machine, "", f"{v['name']}: {v['status']}",
                             *[""] * len(STAGES), "", "", (v["reason"] or "")[:60]])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n\nTimes are medians in ms; speedup is the PyTorch eager baseline's end-to-end median over the variant's."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true")
    args = ap.parse_args()
    text = table()
    if args.print:
        print(text)
        return
    readme = HERE / "README.md"
    content = readme.read_text()
    start, end = content.index(BEGIN) + len(BEGIN), content.index(END)
    readme.write_text(content[:start] + "\n" + text + "\n" + content[end:])
    print(readme)


if __name__ == "__main__":
    main()
