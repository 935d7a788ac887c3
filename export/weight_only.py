"""Weight-only quantization: INT8 QDQ on weights (activations stay float) and 4-bit MatMulNBits.

Neither Optimum nor onnxruntime offers INT8 weight-only QDQ for Conv + MatMul + Gemm (Optimum's static
configs always quantize activations; onnxruntime's MatMulNBits covers MatMul only), so the INT8 part is
a small numpy rewrite: W -> DequantizeLinear(W_int8, scale, 0, axis=out_channel) -> the same consumer.
This is the published method's scheme (weight-only INT8 on Linear and Conv2d; norms stay float).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Which input holds the weight, and its output-channel axis (per-channel scales along it).
#   Conv W (O, I, kh, kw): axis 0; MatMul B (K, N): axis 1; Gemm B: (N, K) if transB else (K, N).
WEIGHT_INPUT = {"Conv": 1, "MatMul": 1, "Gemm": 1}
# Tensors smaller than this stay float: scales would cost as much as they save (biases, tiny projections).
MIN_WEIGHT_ELEMENTS = 256
# A Conv weight above this many elements is dequantized in input-channel slices (one Conv + DequantizeLinear
# each, then summed): onnxruntime materializes each DequantizeLinear output as a float32 tensor, and SD's
# up-block convs (1280, 2560, 3, 3) made 112 MiB of them at once. 4 Mi elements = 16 MiB of float32.
MAX_DEQUANT_ELEMENTS = 4 * 1024 * 1024


def _axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1


def quantize_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 per output channel: (int8 weights, float32 scales (w.shape[axis],))."""
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    scale = np.abs(moved).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)       # all-zero channel: any scale works
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def int8_weight_only(model: onnx.ModelProto, op_types: tuple[str, ...] = ("Conv", "MatMul", "Gemm"),
                     max_dequant_elements: int | None = MAX_DEQUANT_ELEMENTS) -> int:
    """Rewrite `model` in place: each eligible float weight -> INT8 + DequantizeLinear. Returns the count.

    A Conv whose weight has more than `max_dequant_elements` becomes several Convs over slices of its input
    channels, summed (see MAX_DEQUANT_ELEMENTS); None keeps every Conv whole.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users = _consumers(graph)
    dq_nodes, nodes, count = [], [], 0
    for node in graph.node:
        w = _eligible_weight(node, op_types, inits, users)
        if w is None:
            nodes.append(node)
            continue
        name = node.input[WEIGHT_INPUT[node.op_type]]
        graph.initializer.remove(inits[name])
        chunks = _conv_chunks(node, w, max_dequant_elements)
        if chunks == 1:
            dq_nodes.append(_dequantize(graph, w, _axis(node), name, name))
            nodes.append(node)
        else:
            nodes.extend(_split_conv(graph, node, w, chunks, dq_nodes))
        count += 1
    # DequantizeLinear nodes first keeps the graph topologically sorted (they read only initializers). It is also
    # the order with the lower peak: onnxruntime still runs each one right before its consumer, and placing them
    # there in graph.node instead raised the SD 1.5 UNet's peak RSS at 512 px from 1.23 to 1.51 GiB.
    del graph.node[:]
    graph.node.extend(dq_nodes + nodes)
    _ensure_opset(model, 13)  # per-axis DequantizeLinear needs opset >= 13
    return count


def _eligible_weight(node, op_types, inits, users) -> np.ndarray | None:
    """The float weight of `node` to quantize, or None (not a weight op, activation input, shared, tiny)."""
    if node.op_type not in op_types or len(node.input) <= WEIGHT_INPUT[node.op_type]:
        return None
    name = node.input[WEIGHT_INPUT[node.op_type]]
    init = inits.get(name)
    if init is None or init.data_type != onnx.TensorProto.FLOAT or len(users[name]) != 1:
        return None  # activation x activation (attention scores) or shared weights: leave float
    w = numpy_helper.to_array(init)
    return w if w.size >= MIN_WEIGHT_ELEMENTS and w.ndim >= 2 else None


def _dequantize(graph: onnx.GraphProto, w: np.ndarray, axis: int, name: str, out: str) -> onnx.NodeProto:
    """Add W's INT8 initializers (named after `name`) and return DequantizeLinear(...) -> `out` (float W)."""
    q, scale = quantize_per_channel(w, axis)
    graph.initializer.extend([numpy_helper.from_array(q, f"{name}_int8"),
                              numpy_helper.from_array(scale, f"{name}_scale"),
                              numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_zero")])
    return helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"], [out],
                            axis=axis, name=f"{name}_DequantizeLinear")


def _conv_chunks(node, w: np.ndarray, max_elements: int | None) -> int:
    """How many input-channel slices `node` is split into: 1 unless a plain Conv's W exceeds max_elements."""
    if node.op_type != "Conv" or max_elements is None or w.size <= max_elements:
        return 1
    if next((a.i for a in node.attribute if a.name == "group"), 1) != 1:
        return 1  # grouped/depthwise convs tie input to output channels
    cols = max(1, max_elements // (w.size // w.shape[1]))   # input channels per slice within the cap
    return -(-w.shape[1] // cols)


def _split_conv(graph, node, w: np.ndarray, chunks: int, dq_nodes: list) -> list[onnx.NodeProto]:
    """Conv(X, W (O, I, kh, kw), B) -> Conv(X[:, s0], W[:, s0], B) + Conv(X[:, s1], W[:, s1]) + ... over slices of I.

    Input channels rather than output channels: each slice expands (im2col) only its own part of X once, where
    output-channel slices would each expand all of X again. The INT8 values and per-output-channel scales are
    those of the whole weight, shared by every slice.
    """
    name, out = node.input[1], node.output[0]
    label = node.name or out
    q, scale = quantize_per_channel(w, 0)
    cols = np.array_split(np.arange(w.shape[1]), chunks)
    graph.initializer.extend([numpy_helper.from_array(scale, f"{name}_scale"),
                              numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_zero"),
                              numpy_helper.from_array(np.array([len(c) for c in cols], np.int64), f"{name}_split")])
    xs = [f"{label}_x{j}" for j in range(chunks)]
    nodes = [helper.make_node("Split", [node.input[0], f"{name}_split"], xs, axis=1, name=f"{label}_split")]
    total = None
    for j, c in enumerate(cols):
        graph.initializer.append(numpy_helper.from_array(q[:, c[0]:c[-1] + 1], f"{name}_{j}_int8"))
        dq_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_{j}_int8", f"{name}_scale", f"{name}_zero"],
                                         [f"{name}_{j}"], axis=0, name=f"{name}_{j}_DequantizeLinear"))
        bias = list(node.input[2:3]) if j == 0 else []       # the bias once, on the first slice
        y = f"{label}_y{j}"
        conv = helper.make_node("Conv", [xs[j], f"{name}_{j}"] + bias, [y], name=f"{label}_{j}")
        conv.attribute.extend(node.attribute)
        nodes.append(conv)
        if total is not None:   # running sum right after each slice: one partial result alive at a time
            summed = out if j == chunks - 1 else f"{label}_sum{j}"
            nodes.append(helper.make_node("Add", [total, y], [summed], name=f"{label}_add{j}"))
            y = summed
        total = y
    return nodes


def _ensure_opset(model: onnx.ModelProto, minimum: int) -> None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < minimum:
            raise ValueError(f"model opset {o.version} < {minimum}: re-export with `zoodip export --opset 17`")


def nbits_matmul(model: onnx.ModelProto, bits: int, block_size: int, accuracy_level: int,
                 nodes: list[str] | None = None) -> onnx.ModelProto:
    """MatMul weights -> `bits`-bit MatMulNBits (onnxruntime's quantizer, symmetric blocks); returns the new model.

    nodes: only the MatMuls of these names (None: every MatMul with a constant weight).

    accuracy_level 1 = fp32 compute on dequantized blocks. Level 4 (int8 compute, which onnxruntime also picks
    when it fuses DequantizeLinear -> MatMul at session creation) quantizes activations on the fly: on the tiny
    model the ZO finite-difference correlation fell from 0.998 to 0.03. Weight-only must stay weight-only.
    """
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # The quantizer's nodes_to_include adds to its op types rather than narrowing them: exclude the others.
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in set(nodes)] if nodes else None
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, quant_format=QuantFormat.QOperator,
                                     op_types_to_quantize=("MatMul",), nodes_to_exclude=others)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # one line per node
    quantizer.process()
    return quantizer.model.model
