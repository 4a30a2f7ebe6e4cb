"""Serving throughput: images/s and latency through a real tritonserver, against ``srexport run``.

The built-in demo (fp32 graphs, onnxruntime CPU) as a repository (``srexport triton``), served by
the serve extra's tritonserver on loopback ports. At 1, 2, 4 and 8 concurrent HTTP clients, with 1
and 2 orchestrator instances, every client sends ``--requests`` images (LR ``--size``, seeded,
distinct) one after another; images/s is all images over the wall time of the point, latency each
request's round trip. The baseline is what ``srexport run`` on a folder does: one loaded pipeline,
the same images one after another, in this process.

    python benchmarks/serve_throughput.py [--size 128] [--requests 4]

Writes benchmarks/results/serve_throughput_cpu<N>.json and .png.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
CLIENTS = (1, 2, 4, 8)
INSTANCES = (1, 2)


def _images(count: int, size: int) -> list[np.ndarray]:
    from srexport.samples import sample_image

    base = torch.nn.functional.interpolate(sample_image(), size=(size, size), mode="bicubic", align_corners=False)
    out = []
    for i in range(count):  # distinct images of one size: the sample, shifted and lightly noised
        g = torch.Generator().manual_seed(i)
        image = (torch.roll(base, shifts=(3 * i, 5 * i), dims=(-2, -1)) + 0.02 * torch.randn(base.shape, generator=g))
        out.append((image.clamp(0, 1)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    return out


def _infer(url: str, image: np.ndarray) -> float:
    import tritonclient.http as http

    t = time.perf_counter()
    with http.InferenceServerClient(url) as client:
        tensor = http.InferInput("IMAGE", list(image.shape), "UINT8")
        tensor.set_data_from_numpy(image)
        client.infer("srexport", [tensor]).as_numpy("IMAGE")
    return time.perf_counter() - t


def _point(url: str, clients: int, images: list[np.ndarray], requests: int) -> dict:
    jobs = [[images[(c * requests + r) % len(images)] for r in range(requests)] for c in range(clients)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = [t for result in pool.map(lambda job: [_infer(url, im) for im in job], jobs) for t in result]
    wall = time.perf_counter() - start
    return {"clients": clients, "images": len(latencies), "wall_s": wall, "images_per_s": len(latencies) / wall,
            "p50_s": float(np.percentile(latencies, 50)), "p99_s": float(np.percentile(latencies, 99)),
            "latencies_s": latencies}


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for run in report["served"]:
        xs = [p["clients"] for p in run["points"]]
        a.plot(xs, [p["images_per_s"] for p in run["points"]], "o-", label=f"{run['instances']} orchestrator(s)")
        b.plot(xs, [p["p50_s"] for p in run["points"]], "o-", label=f"p50, {run['instances']} orchestrator(s)")
        b.plot(xs, [p["p99_s"] for p in run["points"]], "x--", label=f"p99, {run['instances']} orchestrator(s)")
    base = report["baseline"]
    a.axhline(base["images_per_s"], color="grey", ls=":", label="srexport run (one pipeline, in a loop)")
    b.axhline(base["p50_s"], color="grey", ls=":", label="srexport run, per image")
    a.set(xlabel="concurrent clients", ylabel="images / s", xscale="log", xticks=CLIENTS, xticklabels=CLIENTS)
    b.set(xlabel="concurrent clients", ylabel="latency (s)", xscale="log", xticks=CLIENTS, xticklabels=CLIENTS)
    from matplotlib.ticker import NullFormatter

    for ax in (a, b):
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"srexport on tritonserver (demo, LR {report['lr_size']} px, {report['machine']['cores']} CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128, help="LR side in pixels (default: 128 -> 512x512 out)")
    ap.add_argument("--requests", type=int, default=4, help="images per client per point (default: 4)")
    ap.add_argument("--artifact", type=Path, default=None, help="an artifact (default: build the demo, fp32)")
    args = ap.parse_args()
    from srexport.cli import main as cli
    from srexport.runtime.loading import load_pipeline
    from srexport.serving.launcher import TritonServer, free_ports
    from srexport.serving.repository import write_repository

    images = _images(16, args.size)
    with tempfile.TemporaryDirectory(prefix="serve-throughput-") as tmp:
        tmp = Path(tmp)
        artifact = args.artifact
        if artifact is None:
            artifact = tmp / "demo"
            assert cli(["build", "--precision", "fp32", "--out", str(artifact), "--quiet"]) == 0
        pipeline = load_pipeline(artifact)
        pipeline(torch.from_numpy(images[0]).permute(2, 0, 1)[None].float() / 255)  # warm-up
        times = []
        for image in images[:8]:
            t = time.perf_counter()
            pipeline(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
            times.append(time.perf_counter() - t)
        del pipeline
        baseline = {"images_per_s": len(times) / sum(times), "p50_s": statistics.median(times), "images": len(times)}
        print(f"srexport run loop: {baseline['images_per_s']:.2f} images/s", file=sys.stderr, flush=True)
        served = []
        for instances in INSTANCES:
            repo = tmp / f"repo{instances}"
            write_repository(artifact, repo, instances=instances)
            with TritonServer(repo, "127.0.0.1", *free_ports(3), log_file=tmp / f"log{instances}.txt",
                              exit_timeout=5) as server:
                url = f"127.0.0.1:{server.ports['http']}"
                _infer(url, images[0])  # warm-up: every model's first call
                points = []
                for clients in CLIENTS:
                    point = _point(url, clients, images, args.requests)
                    print(f"{instances} orchestrator(s), {clients} client(s): {point['images_per_s']:.2f} images/s, "
                          f"p50 {point['p50_s']:.2f} s, p99 {point['p99_s']:.2f} s", file=sys.stderr, flush=True)
                    points.append(point)
                served.append({"instances": instances, "points": points})
    report = {
        "benchmark": "srexport demo on the serve extra's tritonserver (Python-backend repository, onnxruntime CPU), "
                     "HTTP clients on loopback, against one in-process pipeline in a loop",
        "lr_size": args.size, "requests_per_client": args.requests,
        "machine": {"host": platform.node(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "baseline": baseline, "served": served,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"serve_throughput_cpu{os.cpu_count()}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, stem.with_suffix(".png"))
    print(stem.with_suffix(".json"))
    print(stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
