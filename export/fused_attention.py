"""Replace the head-sliced attention of an exported UNet by onnxruntime's fused MultiHeadAttention (fp32).

The export writes attention head by head (export/attention.py): per head a Slice, a (T, d) x (d, S) MatMul, a
Softmax and a (T, S) x (S, d) MatMul, so onnxruntime materializes one (T, S) score matrix at a time. The
com.microsoft MultiHeadAttention CPU kernel computes the same attention in fp32 with a tiled (flash) kernel:
no (T, S) matrix at all. On SD 1.5 at 512 px one 4096-token self-attention took 361 ms instead of 612 ms,
with the same numbers (relative difference 4e-7). Exact in fp32, so it keeps every signal; CPU provider only.
"""
from __future__ import annotations

import re

import onnx
from onnx import helper

MS_DOMAIN = "com.microsoft"


def _attention_prefixes(graph: onnx.GraphProto) -> dict[str, dict]:
    """'.../attnN/' -> {'q','k','v': tensor, 'out': node reading the merged heads, 'heads': int}."""
    found: dict[str, dict] = {}
    for node in graph.node:
        m = re.match(r"(.*/attn\d/)(to_q|to_k|to_v|to_out\.0)/MatMul$", node.name or "")
        if m and node.op_type == "MatMul":
            slot = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out"}[m.group(2)]
            found.setdefault(m.group(1), {})[slot] = node.output[0] if slot != "out" else node
        m = re.match(r"(.*/attn\d/)MatMul(_\d+)?$", node.name or "")
        if m and node.op_type == "MatMul":     # the per-head score and value products: 2 per head
            entry = found.setdefault(m.group(1), {})
            entry["products"] = entry.get("products", 0) + 1
    return {p: e for p, e in found.items() if {"q", "k", "v", "out"} <= set(e)}


def fuse_attention(model: onnx.ModelProto, renamed: dict[str, str] | None = None) -> int:
    """Rewrite `model` in place: each head-sliced attention -> one MultiHeadAttention. Returns the count.

    Only head-sliced attention is recognised (2 products per head, at least 2 heads); anything else is left.
    renamed: filled with {new tensor: the tensor of the unfused graph with the same values} (each to_out input).
    """
    graph = model.graph
    fused = 0
    for prefix, e in _attention_prefixes(graph).items():
        products = e.get("products", 0)
        if products < 4 or products % 2:
            continue
        out_node = e["out"]
        merged = f"{prefix}fused_attention_output"
        mha = helper.make_node("MultiHeadAttention", [e["q"], e["k"], e["v"]], [merged], domain=MS_DOMAIN,
                               name=f"{prefix}MultiHeadAttention", num_heads=products // 2)
        idx = list(graph.node).index(out_node)
        graph.node.insert(idx, mha)
        if renamed is not None:
            renamed[merged] = out_node.input[0]
        out_node.input[0] = merged
        fused += 1
    if fused:
        _drop_dead_nodes(graph)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return fused


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is read (repeatedly), and initializers no node reads."""
    keep_outputs = {o.name for o in graph.output}
    while True:
        used = keep_outputs | {i for n in graph.node for i in n.input}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
