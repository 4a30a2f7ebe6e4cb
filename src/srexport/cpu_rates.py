"""This CPU's own limit: the sustained GEMM rate per precision, measured once per bench run.

A GPU's floor comes from its datasheet (``export.cost.GPU_PEAKS``); a CPU's differs with every
model, core count and thread setting, so ``srexport bench`` on CPU measures it and reports each
stage's achieved FLOP rate as a fraction of it ("close to the limit" as a number on any machine):

- fp32: a 1024^3 float32 matmul, the better of onnxruntime's MLAS and PyTorch's BLAS;
- int8: onnxruntime's ``MatMulInteger`` (uint8 x int8 -> int32, the kernel its int8 graphs reach
  on CPU), counted as 2 operations per multiply-add like the float rates;
- bf16: a bfloat16 PyTorch matmul, reported where the CPU has native bf16 (AVX-512 BF16 or
  AMX; otherwise PyTorch emulates it and the figure says so).

Each rate is the median of several timed repetitions after a warm-up, at the thread count the
bench's onnxruntime sessions use (``threads``; None: onnxruntime's default, one per core).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

SIDE = 1024  # the GEMM's M = N = K: large enough to be compute-bound, small enough to take ms
REPEATS = 5


def _rate(run, flops: float, repeats: int = REPEATS, min_seconds: float = 0.05) -> float:
    """FLOP/s of ``run``: calls per sample sized to last ``min_seconds``, median over ``repeats``."""
    run()
    t = time.perf_counter()
    run()
    calls = max(1, int(min_seconds / max(time.perf_counter() - t, 1e-6)))
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            run()
        samples.append(calls * flops / (time.perf_counter() - t))
    return statistics.median(samples)


def _ort_session(model, threads: int | None):
    import onnxruntime as ort

    from .runtime.runners import session_options

    options = session_options(ort, threads=threads)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ort_matmul(op: str, a_type: int, b: np.ndarray, threads: int | None):
    from onnx import TensorProto, helper, numpy_helper

    out_type = TensorProto.INT32 if op == "MatMulInteger" else TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])], "gemm",
        [helper.make_tensor_value_info("a", a_type, [SIDE, SIDE])],
        [helper.make_tensor_value_info("y", out_type, [SIDE, SIDE])], [numpy_helper.from_array(b, "b")])
    opset = 13 if op == "MatMul" else 10
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return _ort_session(model, threads)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), from /proc/cpuinfo's flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def measure_cpu_rates(threads: int | None = None) -> dict:
    """{"gflops": {precision: sustained GFLOP/s (GOP/s for int8)}, "method": {precision: how},
    "threads", "side", "bf16_native"}; a precision this machine cannot run is absent, with why."""
    g = torch.Generator().manual_seed(0)
    flops = 2.0 * SIDE**3
    rates, method = {}, {}
    a = torch.randn(SIDE, SIDE, generator=g)
    b = torch.randn(SIDE, SIDE, generator=g)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch_fp32 = _rate(lambda: torch.mm(a, b), flops)
        session = _ort_matmul("MatMul", 1, b.numpy(), threads)
        feeds = {"a": a.numpy()}
        ort_fp32 = _rate(lambda: session.run(None, feeds), flops)
        rates["fp32"], method["fp32"] = max(torch_fp32, ort_fp32), (
            "onnxruntime MatMul" if ort_fp32 >= torch_fp32 else "PyTorch mm") + f" {SIDE}^3"
        try:
            from onnx import TensorProto

            weights = torch.randint(-127, 128, (SIDE, SIDE), generator=g, dtype=torch.int8).numpy()
            session = _ort_matmul("MatMulInteger", TensorProto.UINT8, weights, threads)
            feeds = {"a": torch.randint(0, 256, (SIDE, SIDE), generator=g, dtype=torch.uint8).numpy()}
            rates["int8"] = _rate(lambda: session.run(None, feeds), flops)
            method["int8"] = f"onnxruntime MatMulInteger u8s8 {SIDE}^3"
        except Exception as e:  # noqa: BLE001 - a build without the kernel: said, not fatal
            method["int8"] = f"not measured: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        a16, b16 = a.bfloat16(), b.bfloat16()
        rates["bf16"] = _rate(lambda: torch.mm(a16, b16), flops)
        method["bf16"] = f"PyTorch mm {SIDE}^3" + ("" if native_bf16() else " (no native bf16 here: emulated)")
    finally:
        torch.set_num_threads(previous)
    return {"gflops": {k: round(v / 1e9, 2) for k, v in rates.items()}, "method": method, "threads": threads,
            "side": SIDE, "bf16_native": native_bf16()}


# The CPU rate a variant's graphs run at: onnxruntime's CPU provider computes fp16 regions in fp32,
# and int8 graphs are int8 only in their quantized layers (the rest fp16, so fp32 here).
RATE_OF_PRECISION = {"fp32": "fp32", "fp16": "fp32", "int8": "int8", "bf16": "bf16"}
