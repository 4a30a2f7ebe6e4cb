"""``srexport bench``, its timers, and the cost model counted from ONNX graphs."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from srexport.cli import main

# The schema documented in srexport.bench (version 1): every level's keys.
REPORT_KEYS = {"schema", "schema_version", "created", "srexport_version", "artifact", "machine", "config", "peaks",
               "cpu_rates", "reference", "baseline", "variants", "sizes", "results", "failures", "passed"}
VARIANT_KEYS = {"name", "backend", "precision", "device", "timer", "baseline", "status", "reason"}
SIZE_KEYS = {"lr_size", "model_input_size", "output_size", "tiled", "tile_plan", "calls", "cost", "cost_error"}
COST_KEYS = {"flops", "other_flops", "weight_bytes", "io_bytes", "activation_bytes", "min_bytes", "flops_by_op",
             "dtype_bytes"}
RESULT_KEYS = {"variant", "lr_size", "output_size", "iters", "warmup", "first_run_seconds", "stages", "total", "wall",
               "images_per_second", "output_megapixels_per_second", "speedup", "memory", "parity", "roofline"}
STATS_KEYS = {"n", "median", "p90", "mean", "min", "max", "stdev"}
MEMORY_KEYS = {"host_peak_bytes", "host_baseline_bytes", "host_method", "device_used_peak_bytes",
               "device_used_baseline_bytes", "device_torch_peak_bytes"}
PARITY_KEYS = {"psnr_db", "max_abs", "rel_l2", "inputs_compared", "min_psnr", "max_abs_bound", "passed"}


@pytest.fixture(scope="module")
def demo_reference(demo_artifact):
    from srexport.artifact.manifest import load_artifact
    from srexport.runtime.loading import reference_for

    return reference_for(load_artifact(demo_artifact))


@pytest.fixture
def shared_reference(demo_reference, monkeypatch):
    """Rebuilding the reference costs seconds per command; these tests share one (read-only)."""
    import srexport.runtime.loading as loading

    monkeypatch.setattr(loading, "reference_for", lambda *args, **kwargs: demo_reference)
    return demo_reference


@pytest.fixture
def one_torch_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_bench_cli_table_json_plot(demo_artifact, shared_reference, tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    threads = torch.get_num_threads()
    # One torch thread: on a busy 2-core runner, torch's thread pool waiting at every small op's
    # barrier makes the tiny demo 10-50x slower; the report records the setting.
    status = main(["bench", str(demo_artifact), "--backends", "torch,ort,trt", "--sizes", "16,40x32",
                   "--iters", "2", "--warmup", "1", "--inputs", "2", "--torch-threads", "1",
                   "--json", str(out_json), "--plot", str(out_png)])
    text = capsys.readouterr().out
    assert status == 0, text
    # the table: per-stage columns, throughput, speedups, parity; the skipped backend with its reason
    for word in ("preprocess", "encode", "denoise", "decode", "postprocess", "end to end", "img/s", "MP/s",
                 "speedup", "peak memory", "PSNR dB", "torch (baseline)", "trt: skipped", "GFLOP",
                 "LR 40x32 -> 160x128", "all parity bounds hold"):
        assert word in text, word

    report = json.loads(out_json.read_text())
    assert set(report) == REPORT_KEYS
    assert (report["schema"], report["schema_version"]) == ("srexport.bench", 1)
    variants = {v["name"]: v for v in report["variants"]}
    assert all(set(v) == VARIANT_KEYS for v in variants.values())
    assert variants["torch"]["baseline"] and variants["torch"]["precision"] == "fp32"
    assert variants["ort"]["status"] == "ok" and variants["trt"]["status"] == "skipped"
    assert variants["trt"]["reason"]  # TensorRT missing here, or no engines in the artifact: said in one line
    assert report["baseline"] == "torch" and report["passed"] and report["failures"] == []
    assert report["config"]["torch_threads"] == 1
    rates = report["cpu_rates"]  # this CPU's own limit, measured once
    assert set(rates["gflops"]) <= {"fp32", "int8", "bf16"} and rates["gflops"]["fp32"] > 1
    assert all(v > 0 for v in rates["gflops"].values()) and set(rates["method"]) == {"fp32", "int8", "bf16"}
    assert "% CPU" in text
    assert torch.get_num_threads() == threads  # restored after the run

    assert [s["lr_size"] for s in report["sizes"]] == [[16, 16], [40, 32]]
    for size in report["sizes"]:
        assert set(size) == SIZE_KEYS and size["cost_error"] is None
        assert set(size["cost"]) == {"encode", "denoise", "decode"}
        assert all(set(c) == COST_KEYS and c["flops"] > 0 for c in size["cost"].values())
    # LR 16 is below the demo's minimum side (process size 128 / 4): pre-resized to 32, output back at 64
    assert report["sizes"][0]["model_input_size"] == [128, 128]

    results = {(r["variant"], tuple(r["lr_size"])): r for r in report["results"]}
    assert set(results) == {(v, s) for v in ("torch", "ort") for s in ((16, 16), (40, 32))}
    for (variant, lr), r in results.items():
        assert set(r) == RESULT_KEYS
        assert r["output_size"] == [4 * lr[0], 4 * lr[1]]
        assert set(r["stages"]) == {"preprocess", "encode", "denoise", "decode", "postprocess"}
        for stats in (*r["stages"].values(), r["total"], r["wall"]):
            assert set(stats) == STATS_KEYS and stats["n"] == 2 and 0 < stats["median"] <= stats["p90"]
        assert r["wall"]["median"] >= r["total"]["median"] * 0.99
        assert r["total"]["median"] >= sum(s["median"] for s in r["stages"].values()) * 0.5
        assert r["images_per_second"] == pytest.approx(1 / r["wall"]["median"], rel=1e-3)
        assert set(r["memory"]) == MEMORY_KEYS and r["memory"]["host_peak_bytes"] >= r["memory"]["host_baseline_bytes"] > 0
        assert r["memory"]["device_used_peak_bytes"] is None  # CPU run
        assert set(r["parity"]) == PARITY_KEYS and r["parity"]["passed"] and r["parity"]["inputs_compared"] == 2
        assert set(r["roofline"]) == {"encode", "denoise", "decode"}
        # CPU variants: each stage's achieved rate over this CPU's measured GEMM rate
        assert all(0 < rl["cpu_fraction"] < 2 for rl in r["roofline"].values())
        assert r["speedup"]["end_to_end"] > 0
    # the torch fp32 baseline runs the reference's own modules: identical output, speedup 1
    assert results[("torch", (16, 16))]["parity"]["psnr_db"] is None
    assert results[("torch", (16, 16))]["speedup"]["end_to_end"] == 1.0
    assert results[("ort", (16, 16))]["parity"]["psnr_db"] > 60

    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out_png) as image:
        assert image.width > 800 and image.height > 300


def test_bench_fails_when_parity_bound_missed(demo_artifact, shared_reference, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    status = main(["bench", str(demo_artifact), "--backends", "ort", "--sizes", "16", "--iters", "1", "--warmup", "0",
                   "--inputs", "1", "--torch-threads", "1", "--min-psnr", "fp32=500", "--json", str(out_json)])
    captured = capsys.readouterr()
    assert status == 1
    assert "FAIL" in captured.out and "bound 500 dB" in captured.out
    report = json.loads(out_json.read_text())
    assert not report["passed"] and len(report["failures"]) == 1
    assert report["results"][0]["parity"]["passed"] is False
    assert report["baseline"] is None and report["results"][0]["speedup"] is None


def test_bench_tiled_artifact_compares_with_the_tiled_reference(demo_artifact, retiled_demo, shared_reference):
    """Where the pipelines tile, the oracle is the reference run the tiled way, and the cost sums every tile call."""

    from srexport.bench import BenchConfig, run_bench

    tiled = retiled_demo(tile=128, overlap=32, batch=2, vae_tile=128, vae_overlap=32, vae_norm="per-tile",
                         unet_norm="per-tile")
    report = run_bench(tiled, BenchConfig(backends=["ort"], sizes=[(48, 48)], iters=1, warmup=0, inputs=1,
                                          torch_threads=1), log=lambda message: None)
    size = report["sizes"][0]
    assert size["tiled"] and size["calls"] == {"vae_encoder": 2, "unet": 2, "vae_decoder": 2}  # 4 tiles, batch 2
    assert report["results"][0]["parity"]["psnr_db"] > 60 and report["passed"]
    # 2x2 tiles of 128 px on 192 px (the even plan: 112 px tiles) compute 1.36x the image's area;
    # the counted decoder work follows the plan's area (attention costs a little less per tile)
    plan = size["tile_plan"]["stages"]["decode"]
    assert plan["tiles"] == 4 and plan["area_ratio"] > 1.3
    assert size["cost"]["decode"]["flops"] > (plan["area_ratio"] - 0.1) * _untiled_decoder_flops(demo_artifact, 192, 192)


def _untiled_decoder_flops(artifact, height, width):
    from srexport.artifact.manifest import load_artifact
    from srexport.export.cost import count_graph

    return count_graph(load_artifact(artifact).component_file("vae_decoder"),
                       {"denoised": (1, 4, height // 8, width // 8)}).flops


def test_plan_variants_baselines_per_device():
    from srexport.bench import plan_variants

    cpu = plan_variants(["ort", "torch", "trt", "ort"], "cpu", True, "fp16")
    assert [(v.name, v.precision, v.baseline) for v in cpu] == [
        ("torch", "fp32", True), ("ort", "fp16", False), ("trt", "fp16", False)]
    gpu = plan_variants(["torch", "ort-cuda"], "cuda", True, "fp32")
    assert [(v.name, v.precision, v.baseline) for v in gpu] == [
        ("torch", "fp16", True), ("torch-compile", "fp16", False), ("ort-cuda", "fp32", False)]
    assert [v.name for v in plan_variants(["torch"], "cuda", False, "fp32")] == ["torch"]


def test_bench_refuses_unknown_backends(demo_artifact, capsys):
    """An unknown name is a typo, not a backend to skip: exit 2 before anything loads."""
    from srexport.bench import BenchConfig
    from srexport.errors import UserError

    assert main(["bench", str(demo_artifact), "--backends", "bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err == ("srexport: error: --backends bogus: not a backend srexport bench knows; name one or more of "
                   "torch, torch-compile, ort, ort-cuda, trt, ort-plain, ort-cuda-plain")
    with pytest.raises(UserError, match=r"--backends onnx,tensorrt: not backends .* torch-compile"):
        BenchConfig(backends=["ort", "onnx", "tensorrt", "onnx"]).validate()
    with pytest.raises(UserError, match="torch, torch-compile, ort, ort-cuda, trt"):
        BenchConfig(backends=[]).validate()


def test_bench_fails_when_nothing_besides_the_baseline_ran(demo_artifact, shared_reference, tmp_path, capsys):
    """trt cannot run here (no TensorRT, no engines): torch,trt compares nothing, trt alone measures nothing."""
    out_json = tmp_path / "bench.json"
    args = ["--sizes", "16", "--iters", "1", "--warmup", "0", "--inputs", "1", "--torch-threads", "1"]
    status = main(["bench", str(demo_artifact), "--backends", "torch,trt", *args, "--json", str(out_json)])
    text = capsys.readouterr().out
    assert status == 1, text
    assert "trt: skipped: " in text and "all parity bounds hold" not in text
    verdict = text.strip().splitlines()[-2]  # the report's last line; the JSON path follows it
    assert verdict.startswith("FAILED: only the torch baseline was measured: trt (skipped) could not run here"), text
    report = json.loads(out_json.read_text())
    assert not report["passed"] and len(report["failures"]) == 1
    assert [r["variant"] for r in report["results"]] == ["torch"]  # the baseline's numbers are still reported

    status = main(["bench", str(demo_artifact), "--backends", "trt", *args])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert status == 1 and last.startswith("FAILED: nothing was measured: trt (skipped)"), last


def test_nothing_measured_counts_only_requested_variants():
    from srexport.bench import _nothing_measured, plan_variants

    gpu = plan_variants(["torch"], "cuda", True, "fp16")  # torch-compile added unasked
    gpu[1].status = "failed"
    assert _nothing_measured(gpu, ["torch"]) is None  # the baseline alone was asked for, and measured
    cpu = plan_variants(["torch", "ort", "trt"], "cpu", True, "fp32")
    cpu[2].status = "skipped"
    assert _nothing_measured(cpu, ["torch", "ort", "trt"]) is None  # ort ran
    cpu[1].status = "skipped"
    assert _nothing_measured(cpu, ["torch", "ort", "trt"]).startswith(
        "only the torch baseline was measured: ort (skipped), trt (skipped)")
    cpu[0].status = "skipped"
    assert _nothing_measured(cpu, ["torch", "ort", "trt"]).startswith("nothing was measured: ort (skipped)")


def test_fp16_torch_baseline_casts_a_copy(demo_artifact, demo_reference, one_torch_thread, small_lr):
    """The GPU baseline's runners (fp16 copies, inputs cast in, fp32 out), exercised on CPU;
    the reference's own fp32 modules stay untouched."""
    from srexport.bench import DEFAULT_MIN_PSNR, _torch_pipeline
    from srexport.artifact.manifest import load_artifact
    from srexport.parity import compare

    expected = demo_reference(small_lr)
    pipeline = _torch_pipeline(load_artifact(demo_artifact), demo_reference, "cpu", "fp16", compiled=False)
    out = pipeline.run_stages(small_lr).tensors["output"]
    assert out.dtype == torch.float32
    assert DEFAULT_MIN_PSNR["fp16"] < compare(out, expected, peak_to_peak=1.0).psnr_db < 90
    assert all(p.dtype == torch.float32 for p in demo_reference.parameters())
    assert torch.equal(demo_reference(small_lr), expected)


def test_bench_rejects_bad_flags(demo_artifact, tmp_path, capsys):
    assert main(["bench", str(demo_artifact), "--sizes", "abc"]) == 2
    assert main(["bench", str(demo_artifact), "--iters", "0"]) == 2
    assert main(["bench", str(demo_artifact), "--min-psnr", "-3"]) == 2
    assert main(["bench", str(demo_artifact), "--plot", str(tmp_path / "x.jpg")]) == 2
    assert main(["bench", str(demo_artifact), "--gpu", "a100"]) == 2
    assert "--gpu 'a100' is not one of" in capsys.readouterr().err


def test_check_compare_image(demo_artifact, shared_reference, one_torch_thread, small_lr, tmp_path, capsys):
    from srexport.runtime.images import save_image

    lr_path, out = tmp_path / "lr.png", tmp_path / "cmp.png"
    save_image(small_lr, lr_path)
    assert main(["check", str(demo_artifact), str(lr_path), "--compare-image", str(out)]) == 0
    from PIL import Image

    with Image.open(out) as image:
        # four panels of the 128x96 output side by side, with labels above
        assert image.width == 4 * 128 + 3 * 4 and image.height > 96


def test_amplification_is_a_power_of_ten():
    from srexport.plots import amplification

    assert amplification(3e-5) == 1e4 and amplification(0.5) == 1 and amplification(0.0) == 1
    assert amplification(float("nan")) == 1


# --- timers and statistics ---------------------------------------------------------


def test_host_timer_accumulates_and_totals():
    from srexport.runtime.timing import HostTimer

    timer, synced = None, []
    timer = HostTimer(sync=lambda: synced.append(1))
    with timer.stage("a"):
        time.sleep(0.01)
    timer.start("b")
    time.sleep(0.02)
    timer.stop("b")
    with timer.stage("a"):  # a stage entered twice accumulates (tiles, two UNet passes)
        time.sleep(0.01)
    s = timer.seconds()
    assert set(s) == {"a", "b"} and s["a"] >= 0.02 and s["b"] >= 0.02
    assert timer.total() >= s["a"] + s["b"]
    assert len(synced) == 6  # one synchronisation per boundary
    with pytest.raises(RuntimeError):
        timer.start("c")
        timer.start("c")


def test_summarize_matches_numpy():
    from srexport.runtime.timing import summarize

    values = [0.5, 0.1, 0.3, 0.9, 0.2, 0.4, 0.7]
    s = summarize(values)
    assert s.median == pytest.approx(np.median(values)) and s.p90 == pytest.approx(np.percentile(values, 90))
    assert s.stdev == pytest.approx(np.std(values, ddof=1)) and (s.min, s.max, s.n) == (0.1, 0.9, 7)
    assert summarize([2.0]).p90 == 2.0


def test_host_memory_probe_sees_an_allocation():
    """In a fresh process: a worker of the parallel suite has freed memory still resident that an
    allocation can reuse without growing the RSS, which would hide it from any RSS probe."""
    import subprocess
    import sys

    code = ("import numpy as np\n"
            "from srexport.runtime.timing import HostMemoryProbe\n"
            "with HostMemoryProbe() as probe:\n"
            "    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched\n"
            "    del block\n"
            "print(probe.peak - probe.baseline, probe.method)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    grown, method = done.stdout.split(maxsplit=1)
    assert int(grown) >= 60 * 2**20, method


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events need a CUDA device; none is visible here")
def test_cuda_event_timer_on_a_stream():
    from srexport.runtime.timing import CudaEventTimer

    stream = torch.cuda.Stream()
    a = torch.randn(2048, 2048, device="cuda")
    timer = CudaEventTimer(stream)
    with torch.cuda.stream(stream):
        with timer.stage("matmul"):
            for _ in range(10):
                a = a @ a.T / 2048
    s = timer.seconds()
    assert 0 < s["matmul"] <= timer.total() + 1e-6


def test_pipeline_reports_stage_seconds(demo_artifact, small_lr):
    from srexport.runtime.loading import load_pipeline

    pipeline = load_pipeline(demo_artifact, "ort")
    out = pipeline.run_stages(small_lr)
    assert set(out.seconds) == {"preprocess", "encode", "denoise", "decode", "postprocess"}
    assert out.total_seconds >= sum(out.seconds.values()) * 0.999


# --- the cost model ------------------------------------------------------------------


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = torch.nn.Conv2d(8, 8, 3, padding=1, stride=2, groups=4, bias=False)
        self.up = torch.nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1)
        self.linear = torch.nn.Linear(6, 5)

    def forward(self, x):
        y = self.up(torch.relu(self.grouped(self.conv(x))))  # (1,6,H,W)
        tokens = y.flatten(2).transpose(1, 2)  # (1, H*W, 6)
        q = self.linear(tokens)  # (1, HW, 5)
        return torch.softmax(q @ q.transpose(1, 2), dim=-1) @ q  # (1, HW, 5)


def _tiny_flops(h: int, w: int) -> int:
    hw, half = h * w, (h // 2) * (w // 2)
    conv = 2 * 8 * hw * 3 * 9
    grouped = 2 * 8 * half * (8 // 4) * 9
    up = 2 * (8 * half) * 6 * 16  # every input element scatters into C_out * k * k outputs
    linear = 2 * hw * 6 * 5
    attention = 2 * hw * hw * 5 * 2  # scores and weighted sum
    return conv + grouped + up + linear + attention


def test_cost_counts_hand_computed_flops(tmp_path):
    from srexport.export.cost import count_graph

    path = tmp_path / "tiny.onnx"
    model = _Tiny().eval()
    torch.onnx.export(model, (torch.rand(1, 3, 16, 12),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {2: "h", 3: "w"}, "y": {1: "n"}}, opset_version=17, dynamo=False)
    for h, w in ((16, 12), (32, 24)):
        cost = count_graph(path, {"x": (1, 3, h, w)})
        assert cost.flops == _tiny_flops(h, w)
        params = sum(p.numel() for p in model.parameters())
        assert cost.weight_bytes == 4 * params
        assert cost.io_bytes == 4 * (3 * h * w + h * w * 5)
        assert cost.activation_bytes > cost.io_bytes and cost.other_flops > 0
    assert cost.floor_seconds(1.0, 1.0) == max(cost.flops / 1e12, cost.min_bytes / 1e9)
    assert cost.floor_seconds(1.0, 1e-6, element_bytes=2) == pytest.approx(cost.min_bytes / 2 / 1e3)


def test_cost_counts_graphs_whose_weights_are_all_external(tmp_path, monkeypatch):
    """Graphs over 2 GB keep every tensor above 1 KB in a .data file, small ones included;
    counting must not need that file (nor the working directory to be its folder)."""
    import onnx

    from srexport.export.cost import count_graph

    path = tmp_path / "tiny.onnx"
    torch.onnx.export(_Tiny().eval(), (torch.rand(1, 3, 16, 12),), str(path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {2: "h", 3: "w"}}, opset_version=17, dynamo=False)
    model = onnx.load(str(path))
    external = tmp_path / "external" / "tiny.onnx"
    external.parent.mkdir()
    onnx.save_model(model, str(external), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="tiny.onnx.data", size_threshold=0)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL and len(t.dims) and t.dims[0] < 4096
               for t in onnx.load(str(external), load_external_data=False).graph.initializer)
    monkeypatch.chdir(tmp_path)
    assert count_graph(external, {"x": (1, 3, 16, 12)}).flops == _tiny_flops(16, 12)


def test_cost_matches_torch_flop_counter_on_the_demo_graphs(demo_artifact, demo_reference, one_torch_thread):
    """The ONNX count equals torch's FlopCounterMode on the modules the graphs came from
    (attention on the math path, so its matmuls are counted too)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from srexport.artifact.manifest import load_artifact
    from srexport.export.cost import count_graph
    from srexport.artifact.specs import Geometry

    artifact = load_artifact(demo_artifact)
    from srexport.models.group_norm_stats import graph_modules

    modules = graph_modules(demo_reference)
    geometry = Geometry(batch=1, height=96, width=128)
    for name, spec in artifact.components.items():
        shapes = spec.input_shapes(geometry)
        cost = count_graph(artifact.component_file(name), shapes)
        feeds = spec.sample_inputs(geometry)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            modules[name](*feeds.values())
        assert cost.flops == counter.get_total_flops(), name


def test_resolve_peaks_and_detect_gpu():
    from srexport.errors import UserError
    from srexport.export.cost import detect_gpu, resolve_peaks

    assert resolve_peaks()["tflops"]["fp16"] == pytest.approx(989.4)
    custom = resolve_peaks("h100-pcie", tflops=100, gbps=1000)
    assert set(custom["tflops"].values()) == {100} and custom["gbps"] == 1000
    assert detect_gpu("NVIDIA H100 PCIe") == "h100-pcie" and detect_gpu("NVIDIA H200") == "h200"
    assert detect_gpu("NVIDIA H100 80GB HBM3") == "h100-sxm"
    with pytest.raises(UserError):
        resolve_peaks("h100-sxm", tflops=-1)
    assert math.isfinite(resolve_peaks()["gbps"])
