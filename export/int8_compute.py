"""Int8 compute for chosen node groups of a UNet: which nodes belong to which group, and the kernels.

The ZO signal enters the UNet only through the text states (the cross-attention K/V projections) and then
rides on the image activations as a small difference. Int8 compute rounds those activations, so whether the
difference survives depends on where the rounding happens and how fine it is. This module names the groups
(`GROUPS`) and rewrites the weight ops of chosen groups into one of three int8-compute forms (`METHODS`):

- "block": MatMulNBits, 8-bit weights, accuracy_level 4. onnxruntime's MLAS quantizes the activations per
  row and block of K (symmetric int8, one scale per `block` values) and runs an int8 dot-product kernel.
- "dynamic": activations quantized per tensor at run time (UINT8, asymmetric), per-channel INT8 weights:
  com.microsoft DynamicQuantizeMatMul for MatMul/Gemm, DynamicQuantizeLinear + ConvInteger for Conv.
- "static": activations quantized per tensor with calibrated ranges (UINT8), per-channel INT8 weights:
  QLinearMatMul / QLinearConv between QuantizeLinear and DequantizeLinear (the w8a8 scheme's kind, which
  erased the signal when applied everywhere).

Nodes outside the chosen groups are left as they are (the caller then makes them weight-only w8).
"""
from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .weight_only import MIN_WEIGHT_ELEMENTS, quantize_per_channel

# Group -> pattern on the node name of a weight op (diffusers names, as Optimum's exporter keeps them).
# Order matters: the first match wins (text_kv before attention, time embedding before resnet).
GROUPS = {
    "text_kv": r"/attn2/to_[kv]/",                        # cross-attention K/V: read the text states (77 rows)
    "attention": r"/attn[12]/(to_q|to_k|to_v|to_out)",    # the rest of attention's projections
    "proj": r"/attentions\.\d+/proj_(in|out)/",           # transformer in/out projections (1x1 Conv or Linear)
    "feed_forward": r"/ff/",                              # GEGLU in, linear out
    "time_embedding": r"(^|/)time_embedding/|/time_emb_proj/",   # timestep MLP and each resnet's projection
    "resnet": r"/resnets\.\d+/(conv1|conv2|conv_shortcut)/",     # ResNet blocks' convolutions
    "conv": r"(^|/)(conv_in|conv_out|downsamplers\.\d+/conv|upsamplers\.\d+/conv)/",   # the other convolutions
}
METHODS = ("block", "dynamic", "static")
WEIGHT_OPS = ("MatMul", "Conv", "Gemm")
MS_DOMAIN = "com.microsoft"


def group_of(node: onnx.NodeProto) -> str | None:
    """The group of a weight op by its name, or None (attention scores, other ops)."""
    if node.op_type not in WEIGHT_OPS:
        return None
    name = node.name or node.output[0]
    return next((g for g, pattern in GROUPS.items() if re.search(pattern, name)), None)


def weight_nodes(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """group -> its weight ops (float constant weight of >= MIN_WEIGHT_ELEMENTS, used once)."""
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    out: dict[str, list] = {g: [] for g in GROUPS}
    for n in model.graph.node:
        g = group_of(n)
        w = inits.get(n.input[1]) if g and len(n.input) > 1 else None
        if w is not None and w.data_type == onnx.TensorProto.FLOAT and uses[w.name] == 1 \
                and int(np.prod(w.dims)) >= MIN_WEIGHT_ELEMENTS:
            out[g].append(n)
    return out


def int8_compute(model: onnx.ModelProto, plan: dict[str, str], ranges: dict | None = None) -> dict[str, int]:
    """Rewrite `model` in place: the weight ops of each planned group get that group's int8 method.

    plan: {group: "dynamic" | "static"} ("block" is MatMulNBits with accuracy level 4: weight_only.nbits_matmul).
    ranges: {tensor: (min, max)} of every static node's input and output (calibration.stream_minmax).
    Returns {group: nodes rewritten}.
    """
    bad = {g: m for g, m in plan.items() if g not in GROUPS or m not in ("dynamic", "static")}
    if bad:
        raise ValueError(f"int8_compute plan {bad}: groups are {', '.join(GROUPS)}; methods dynamic|static")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    rewrite = {n.output[0]: g for g, nodes in weight_nodes(model).items() if g in plan for n in nodes}
    nodes, counts = [], {g: 0 for g in plan}
    for node in graph.node:
        g = rewrite.get(node.output[0]) if node.op_type in WEIGHT_OPS else None
        if g is None:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        bias = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits else None
        if len(node.input) > 2 and node.input[2] and bias is None:
            nodes.append(node)          # bias computed at run time: not a plain weight op, leave it
            continue
        graph.initializer.remove(inits[node.input[1]])
        if bias is not None and sum(n.input[2] == node.input[2] for n in graph.node if len(n.input) > 2) == 1:
            graph.initializer.remove(inits[node.input[2]])
        w, bias = _as_matmul(node, w, bias)
        if plan[g] == "dynamic":
            nodes += _dynamic(graph, node, w, bias)
        else:
            if ranges is None:
                raise ValueError("static int8 compute needs calibration ranges of its inputs and outputs")
            nodes += _static(graph, node, w, bias, ranges)
        counts[g] += 1
    del graph.node[:]
    graph.node.extend(nodes)
    if any(m == "dynamic" for m in plan.values()) and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return counts


def static_tensors(model: onnx.ModelProto, groups) -> list[str]:
    """Inputs and outputs of the weight ops of `groups`: what static int8 compute needs ranges of."""
    names = []
    for g, nodes in weight_nodes(model).items():
        if g in groups:
            names += [t for n in nodes for t in (n.input[0], n.output[0])]
    return sorted(set(names))


def count_int8_compute(model: onnx.ModelProto) -> dict[str, int]:
    """Int8-compute nodes by kind: what the structure tests and the manifest check."""
    out: dict[str, int] = {}
    for n in model.graph.node:
        kind = n.op_type
        if kind == "MatMulNBits":
            level = next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
            kind = "MatMulNBits(int8 compute)" if level == 4 else "MatMulNBits(fp32 compute)"
        if kind in ("MatMulNBits(int8 compute)", "MatMulNBits(fp32 compute)", "DynamicQuantizeMatMul",
                    "ConvInteger", "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat"):
            out[kind] = out.get(kind, 0) + 1
    return out


def _as_matmul(node, w: np.ndarray, bias):
    """Gemm -> MatMul orientation: W as (K, N) (transB undone); Conv and MatMul weights unchanged."""
    if node.op_type == "Gemm":
        attrs = {a.name: a for a in node.attribute}
        if attrs.get("transA") and attrs["transA"].i:
            raise ValueError(f"{node.name}: Gemm with transA is not a weight op int8_compute handles")
        alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
        beta = attrs["beta"].f if "beta" in attrs else 1.0
        w = (w.T if attrs.get("transB") and attrs["transB"].i else w) * alpha
        bias = None if bias is None else bias * beta
    return np.ascontiguousarray(w, np.float32), bias


def _weight_axis(node) -> int:
    return 0 if node.op_type == "Conv" else 1      # Conv (O, I, kh, kw); MatMul/Gemm (K, N)


def _add(graph, array: np.ndarray, name: str) -> str:
    graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def _dynamic(graph, node, w: np.ndarray, bias) -> list[onnx.NodeProto]:
    """Run-time per-tensor UINT8 activations x per-channel INT8 weights."""
    label, out = node.name or node.output[0], node.output[0]
    q, scale = quantize_per_channel(w, _weight_axis(node))
    wq = _add(graph, q, f"{label}_w_int8")
    if node.op_type != "Conv":
        ins = [node.input[0], wq, _add(graph, scale, f"{label}_w_scale"), ""]
        if bias is not None:
            ins.append(_add(graph, bias.astype(np.float32), f"{label}_bias"))
        return [helper.make_node("DynamicQuantizeMatMul", ins, [out], name=f"{label}_int8", domain=MS_DOMAIN)]
    xq, xs, xz = f"{label}_xq", f"{label}_xs", f"{label}_xz"
    nodes = [helper.make_node("DynamicQuantizeLinear", [node.input[0]], [xq, xs, xz], name=f"{label}_quant"),
             helper.make_node("ConvInteger", [xq, wq, xz], [f"{label}_i32"], name=f"{label}_int8")]
    nodes[1].attribute.extend(node.attribute)
    chan = _add(graph, scale.reshape(1, -1, 1, 1), f"{label}_w_scale4")
    nodes += [helper.make_node("Cast", [f"{label}_i32"], [f"{label}_f32"], to=onnx.TensorProto.FLOAT),
              helper.make_node("Mul", [xs, chan], [f"{label}_scale"], name=f"{label}_scale"),
              helper.make_node("Mul", [f"{label}_f32", f"{label}_scale"],
                               [f"{label}_mul" if bias is not None else out], name=f"{label}_rescale")]
    if bias is not None:
        b = _add(graph, bias.reshape(1, -1, 1, 1).astype(np.float32), f"{label}_bias4")
        nodes.append(helper.make_node("Add", [f"{label}_mul", b], [out], name=f"{label}_bias"))
    return nodes


def activation_qparams(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """UINT8 asymmetric scale and zero point for a range (0 included), as onnxruntime computes them."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero = int(np.clip(round(-lo / scale), 0, 255))
    return np.array(scale, np.float32), np.array(zero, np.uint8)


def _static(graph, node, w: np.ndarray, bias, ranges: dict) -> list[onnx.NodeProto]:
    """Calibrated per-tensor UINT8 activations (input and output) x per-channel INT8 weights."""
    label, x, out = node.name or node.output[0], node.input[0], node.output[0]
    missing = [t for t in (x, out) if t not in ranges]
    if missing:
        raise ValueError(f"no calibration range for {missing} (node {label})")
    xs, xz = activation_qparams(*ranges[x])
    ys, yz = activation_qparams(*ranges[out])
    axis = _weight_axis(node)
    q, scale = quantize_per_channel(w, axis)
    names = {k: _add(graph, v, f"{label}_{k}") for k, v in
             (("xs", xs), ("xz", xz), ("ys", ys), ("yz", yz), ("w_int8", q), ("w_scale", scale),
              ("w_zero", np.zeros_like(scale, np.int8)))}
    nodes = [helper.make_node("QuantizeLinear", [x, names["xs"], names["xz"]], [f"{label}_xq"], name=f"{label}_q")]
    qin = [f"{label}_xq", names["xs"], names["xz"], names["w_int8"], names["w_scale"], names["w_zero"],
           names["ys"], names["yz"]]
    if node.op_type == "Conv":
        if bias is not None:    # int32 bias at scale x_scale * w_scale, as QLinearConv defines it
            qin.append(_add(graph, np.rint(bias / (xs * scale)).astype(np.int32), f"{label}_bias_int32"))
        conv = helper.make_node("QLinearConv", qin, [f"{label}_yq"], name=f"{label}_int8")
        conv.attribute.extend(node.attribute)
        nodes.append(conv)
        y = f"{label}_yq"
    else:
        mm_out = f"{label}_yq"
        nodes.append(helper.make_node("QLinearMatMul", qin, [mm_out], name=f"{label}_int8"))
        y = mm_out
    deq_out = out if bias is None or node.op_type == "Conv" else f"{label}_nobias"
    nodes.append(helper.make_node("DequantizeLinear", [y, names["ys"], names["yz"]], [deq_out], name=f"{label}_dq"))
    if bias is not None and node.op_type != "Conv":
        nodes.append(helper.make_node("Add", [deq_out, _add(graph, bias.astype(np.float32), f"{label}_bias")], [out],
                                      name=f"{label}_bias"))
    return nodes
