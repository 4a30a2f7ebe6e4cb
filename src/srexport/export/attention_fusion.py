"""Attention fused into onnxruntime's ``com.microsoft.MultiHeadAttention``, for onnxruntime only.

The portable graphs keep attention as the exporter wrote it, MatMul -> Softmax -> MatMul over
``[batch, heads, tokens, head_dim]`` tensors: TensorRT fuses that pattern itself. onnxruntime
runs it as written and materialises the score matrix: at a 1024 px VAE tile the mid-block attends
over 16,384 positions, a 1 GiB fp32 matrix and as much again for its softmax, which the CPU arena
then keeps. Its ``MultiHeadAttention`` contrib op runs flash attention on CPU (fp32, blocked by
the L2 size; measured: 16,384 tokens x 64 channels 105 MB peak and 2.3x faster than the plain
pattern at 1.18 GB) and flash/memory-efficient kernels on CUDA.

``onnxruntime.transformers.optimizer`` (model types ``unet``/``vae``) does not recognise our
exported attention (DESIGN.md: measured, no attention fused) and adds CUDA-only GroupNorm
fusions, so the fusion is done here, on the one pattern every exported attention reduces to:

    scores = MatMul(q, k_t)      q [B, H, S, D], k_t [B, H, D, T]   (scale already applied by Muls)
    probs  = Softmax(scores, axis=-1)   (optionally between Casts: fp16 graphs keep softmax fp32)
    out    = MatMul(probs, v)    v [B, H, T, Dv]

becomes ``MultiHeadAttention(q, k, v, num_heads=H, scale=1)`` on ``[B, tokens, H * D]`` views,
with the exporter's scaling Muls left in front of it (so no scale has to be recovered), and the
output put back in ``[B, H, S, Dv]`` for the nodes after it. onnxruntime's transpose optimizer
cancels the added Transposes against the exporter's. Shapes come from ONNX shape inference; a
pattern whose head count is not static is left as it is.

Weights are not touched: a graph loaded without its external data keeps its tensors' references,
so the fused graph written beside the plain one shares the plain one's ``.onnx.data`` file.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper, numpy_helper
import numpy as np

MS_DOMAIN = "com.microsoft"
# ``[B, H, S, D]`` <-> ``[B, S, H, D]``; and ``[B, H, D, T]`` (a transposed key) -> ``[B, T, H, D]``.
TO_TOKENS_MAJOR = [0, 2, 1, 3]
KEY_T_TO_TOKENS_MAJOR = [0, 3, 1, 2]


@dataclass(frozen=True)
class FusedAttention:
    """One attention replaced: where it was and its static shape facts."""

    softmax: str
    heads: int
    head_dim: int | str
    kv_tokens: int | str  # 77 for cross-attention over the text embedding; symbolic for self-attention


def _dims(value_info) -> list:
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
            for d in value_info.type.tensor_type.shape.dim]


class _Graph:
    """Producer/consumer lookups over one graph (no subgraphs: attention is never in one here)."""

    def __init__(self, model: onnx.ModelProto):
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        g = inferred.graph
        self.shapes = {v.name: _dims(v) for v in [*g.value_info, *g.input, *g.output]}
        self.outputs = {o.name for o in model.graph.output}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def only_consumer(self, tensor: str):
        """The single node reading ``tensor`` (None if it is read elsewhere or is a graph output)."""
        readers = self.consumers.get(tensor, [])
        return readers[0] if len(readers) == 1 and tensor not in self.outputs else None


def _softmax_axis_is_last(node, rank: int) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    return axis in (-1, rank - 1)


def _match(graph: _Graph, softmax):
    """(removed nodes, q, k_t, v, output, fact) for one Softmax, or None where it is not attention."""
    removed = [softmax]
    source = graph.producer.get(softmax.input[0])
    if source is not None and source.op_type == "Cast":  # fp16 graphs: Cast(fp32) -> Softmax
        if graph.only_consumer(source.output[0]) is not softmax:
            return None
        removed.append(source)
        source = graph.producer.get(source.input[0])
    if source is None or source.op_type != "MatMul" or graph.only_consumer(source.output[0]) is not removed[-1]:
        return None
    removed.append(source)
    probs = softmax.output[0]
    after = graph.only_consumer(probs)
    if after is not None and after.op_type == "Cast":  # ... Softmax -> Cast(fp16)
        removed.append(after)
        probs = after.output[0]
        after = graph.only_consumer(probs)
    if after is None or after.op_type != "MatMul" or after.input[0] != probs:
        return None
    removed.append(after)
    q, k_t = source.input
    v = after.input[1]
    qs, ks, vs = (graph.shapes.get(t) for t in (q, k_t, v))
    if not (qs and ks and vs and len(qs) == len(ks) == len(vs) == 4):
        return None
    heads = qs[1]
    if not isinstance(heads, int) or heads < 1 or ks[1] != heads or vs[1] != heads:
        return None
    if not _softmax_axis_is_last(softmax, 4):
        return None
    return removed, q, k_t, v, after.output[0], FusedAttention(softmax.name, heads, qs[3], ks[3])


def _int64(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _replacement(prefix: str, q: str, k_t: str, v: str, out: str, heads: int):
    """Nodes computing ``out`` ([B, H, S, Dv]) with one MultiHeadAttention, and their constants."""
    flat, split = f"{prefix}/mha_flat_shape", f"{prefix}/mha_split_shape"
    constants = [_int64(flat, [0, 0, -1]), _int64(split, [0, 0, heads, -1])]
    nodes = []
    tokens_major = {}
    for role, tensor, perm in (("q", q, TO_TOKENS_MAJOR), ("k", k_t, KEY_T_TO_TOKENS_MAJOR), ("v", v, TO_TOKENS_MAJOR)):
        t, r = f"{prefix}/mha_{role}_bshd", f"{prefix}/mha_{role}"
        nodes += [helper.make_node("Transpose", [tensor], [t], name=t, perm=perm),
                  helper.make_node("Reshape", [t, flat], [r], name=r)]
        tokens_major[role] = r
    o, o4 = f"{prefix}/mha_out", f"{prefix}/mha_out_bshd"
    nodes += [helper.make_node("MultiHeadAttention", [tokens_major["q"], tokens_major["k"], tokens_major["v"]], [o],
                               name=f"{prefix}/MultiHeadAttention", domain=MS_DOMAIN, num_heads=heads, scale=1.0),
              helper.make_node("Reshape", [o, split], [o4], name=o4),
              helper.make_node("Transpose", [o4], [out], name=f"{prefix}/mha_out_bhsd", perm=TO_TOKENS_MAJOR)]
    return nodes, constants


def fuse_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[FusedAttention]]:
    """A copy of ``model`` with every attention pattern fused, and what was fused (empty: unchanged)."""
    graph = _Graph(model)
    plans = [m for node in model.graph.node if node.op_type == "Softmax" and (m := _match(graph, node))]
    if not plans:
        return model, []
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    dropped = {id(n) for removed, *_ in plans for n in removed}
    by_output = {plan[4]: plan for plan in plans}
    nodes, constants = [], []
    # Each replacement goes where its last MatMul was, so the node list stays topologically sorted.
    for node in model.graph.node:
        plan = by_output.get(node.output[0]) if node.op_type == "MatMul" else None
        if plan is not None:
            _removed, q, k_t, v, out, fact = plan
            new, consts = _replacement(fact.softmax, q, k_t, v, out, fact.heads)
            nodes += new
            constants += consts
        elif id(node) not in dropped:
            nodes.append(node)
    del fused.graph.node[:]
    fused.graph.node.extend(nodes)
    fused.graph.initializer.extend(constants)
    del fused.graph.value_info[:]  # stale for the replaced tensors; onnxruntime infers its own
    if not any(o.domain == MS_DOMAIN for o in fused.opset_import):
        fused.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return fused, [plan[5] for plan in plans]


# Fused vs plain graph on onnxruntime, relative L2 over each output (the checks' measure). fp32:
# the same arithmetic reordered (measured on the demo <= 4e-7). fp16/int8: the plain graphs'
# softmax runs in fp32 between Casts, the fused kernel accumulates its own way in fp16 inputs.
FUSED_MAX_REL_L2 = {"fp32": 1e-5, "fp16": 5e-3, "int8": 5e-3}


def fused_graph_name(component: str) -> str:
    return f"{component}.ort.onnx"


def write_fused_graphs(folder, manifest: dict, geometries, progress) -> dict:
    """Beside each graph that has attention, its fused twin for onnxruntime, checked against it.

    Fills each component's ``files.onnx_ort`` and the manifest's file list; returns the
    ``checks.attention_fusion`` record. A twin off by more than its bound fails the build
    (the caller's atomic folder then leaves nothing behind)."""
    from pathlib import Path

    from ..artifact.manifest import ORT_GRAPH
    from ..errors import UserError
    from ..artifact.specs import ComponentSpec
    from ..checking import compare_outputs
    from ..parity import worst
    from ..runtime.runners import OnnxRuntimeRunner

    folder = Path(folder)
    precision = manifest["export"]["precision"]
    bound = FUSED_MAX_REL_L2[precision]
    record = {}
    for name, component in manifest["components"].items():
        plain_path = folder / component["files"]["onnx"]
        fused, facts = fuse_attention(onnx.load(str(plain_path), load_external_data=False))
        if not facts:
            continue
        target = folder / fused_graph_name(name)
        onnx.save_model(fused, str(target))  # external tensors keep pointing at the plain graph's data file
        spec = ComponentSpec.from_dict(component["spec"])
        plain, twin = OnnxRuntimeRunner(plain_path, spec), OnnxRuntimeRunner(target, spec)
        feeds = [spec.sample_inputs(geometry, seed=200 + i) for i, geometry in enumerate(geometries)]
        parity = worst(compare_outputs(twin(f), plain(f)) for f in feeds)
        del plain, twin
        if not parity.rel_l2 <= bound:
            raise UserError(f"{target.name}: fused attention differs from {plain_path.name} by relative L2 "
                            f"{parity.rel_l2:.2e} (bound {bound} at {precision}); build with --ort-attention plain")
        component["files"][ORT_GRAPH] = target.name
        manifest["files"][target.name] = {"path": target.name}
        record[name] = dict(parity.to_dict(), fused=len(facts), bound_rel_l2=bound,
                            heads=sorted({f.heads for f in facts}))
        progress.note(f"{name}: {len(facts)} attention(s) fused, vs the plain graph {parity.describe()}")
    return record
