"""Weight-only quantization: INT8 QDQ on weights (activations stay float) and 4-bit MatMulNBits.

Neither Optimum nor onnxruntime offers INT8 weight-only QDQ for Conv + MatMul + Gemm (Optimum's static
configs always quantize activations; onnxruntime's MatMulNBits covers MatMul only), so the INT8 part is
a small numpy rewrite: W -> DequantizeLinear(W_int8, scale, 0, axis=out_channel) -> the same consumer.
This is the published method's scheme (weight-only INT8 on Linear and Conv2d; norms stay float).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

# Which input holds the weight, and its output-channel axis (per-channel scales along it).
#   Conv W (O, I, kh, kw): axis 0; MatMul B (K, N): axis 1; Gemm B: (N, K) if transB else (K, N).
WEIGHT_INPUT = {"Conv": 1, "MatMul": 1, "Gemm": 1}
# Tensors smaller than this stay float: scales would cost as much as they save (biases, tiny projections).
MIN_WEIGHT_ELEMENTS = 256
# A Conv weight above this many elements is dequantized in input-channel slices (one Conv + DequantizeLinear
# each, then summed): onnxruntime materializes each DequantizeLinear output as a float32 tensor, and SD's
# up-block convs (1280, 2560, 3, 3) made 112 MiB of them at once. 4 Mi elements = 16 MiB of float32.
MAX_DEQUANT_ELEMENTS = 4 * 1024 * 1024
# Streaming (models loaded with load_external_data=False, weights in model.onnx_data): MatMul weights are read
# and quantized this many fp32 bytes at a time, so the fp32 model is never in memory whole (SDXL's UNet: 10.3 GB).
STREAM_GROUP_BYTES = 512 * 1024 ** 2


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
                     max_dequant_elements: int | None = MAX_DEQUANT_ELEMENTS, base_dir: str | Path | None = None) -> int:
    """Rewrite `model` in place: each eligible float weight -> INT8 + DequantizeLinear. Returns the count.

    A Conv whose weight has more than `max_dequant_elements` becomes several Convs over slices of its input
    channels, summed (see MAX_DEQUANT_ELEMENTS); None keeps every Conv whole. base_dir: the folder of a model
    loaded without its external data; each weight is read from there when it is reached (one at a time).
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users = _consumers(graph)
    dq_nodes, nodes, count = [], [], 0
    for node in graph.node:
        w = _eligible_weight(node, op_types, inits, users, base_dir)
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


def _eligible_weight(node, op_types, inits, users, base_dir=None) -> np.ndarray | None:
    """The float weight of `node` to quantize, or None (not a weight op, activation input, shared, tiny)."""
    if node.op_type not in op_types or len(node.input) <= WEIGHT_INPUT[node.op_type]:
        return None
    name = node.input[WEIGHT_INPUT[node.op_type]]
    init = inits.get(name)
    if init is None or init.data_type != onnx.TensorProto.FLOAT or len(users[name]) != 1:
        return None  # activation x activation (attention scores) or shared weights: leave float
    if len(init.dims) < 2 or int(np.prod(init.dims)) < MIN_WEIGHT_ELEMENTS:
        return None
    if uses_external_data(init):
        if base_dir is None:
            raise ValueError(f"weight {name!r} is external data: pass base_dir (the model's folder)")
        load_into_memory(init, base_dir)
    return numpy_helper.to_array(init)


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


def load_into_memory(tensor: onnx.TensorProto, base_dir: str | Path) -> None:
    """Read one external tensor's bytes into the proto and mark it internal (what onnx.load does for all)."""
    load_external_data_for_tensor(tensor, str(base_dir))
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]


def load_remaining(model: onnx.ModelProto, base_dir: str | Path) -> int:
    """Read every tensor still external (norms, biases, weights left float) into memory; returns how many.

    A model saved elsewhere must carry its own bytes: a reference into the source's model.onnx_data would
    point at the wrong offsets of the new file."""
    from onnx.external_data_helper import _get_all_tensors
    n = 0
    for t in _get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            load_into_memory(t, base_dir)
            n += 1
    return n


def nbits_matmul(model: onnx.ModelProto, bits: int, block_size: int, accuracy_level: int,
                 base_dir: str | Path | None = None, group_bytes: int = STREAM_GROUP_BYTES) -> onnx.ModelProto:
    """MatMul weights -> `bits`-bit MatMulNBits (onnxruntime's quantizer, symmetric blocks); returns the new model.

    accuracy_level 1 = fp32 compute on dequantized blocks. Level 4 (int8 compute, which onnxruntime also picks
    when it fuses DequantizeLinear -> MatMul at session creation) quantizes activations on the fly: on the tiny
    model the ZO finite-difference correlation fell from 0.998 to 0.03. Weight-only must stay weight-only.

    base_dir: the folder of a model loaded with load_external_data=False. Its external MatMul weights are then
    read and quantized about `group_bytes` at a time (the quantizer's own nodes_to_exclude keeps it to one group
    per pass), so memory holds the quantized model and one group, not the fp32 model: the result is the same
    model, node for node and byte for byte (tests/test_weight_only.py).
    """
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # one line per node

    def quantize(m: onnx.ModelProto, exclude: list[str] | None = None) -> onnx.ModelProto:
        quantizer = MatMulNBitsQuantizer(m, bits=bits, block_size=block_size, is_symmetric=True,
                                         accuracy_level=accuracy_level, quant_format=QuantFormat.QOperator,
                                         op_types_to_quantize=("MatMul",), nodes_to_exclude=exclude)
        quantizer.process()
        return quantizer.model.model

    groups = _external_matmul_groups(model, group_bytes) if base_dir is not None else None
    if not groups:
        if base_dir is not None:
            load_remaining(model, base_dir)    # nothing external to stream (or unnamed nodes): the plain path
        return quantize(model)
    inits = {t.name: t for t in model.graph.initializer}
    every = [name for group in groups for name, _ in group]
    for group in groups:
        for _, weight in group:
            load_into_memory(inits[weight], base_dir)
        names = {name for name, _ in group}
        model = quantize(model, [n for n in every if n not in names])   # fp32 weights of the group dropped here
        inits = {t.name: t for t in model.graph.initializer}
    return model


def _external_matmul_groups(model: onnx.ModelProto, group_bytes: int) -> list[list[tuple[str, str]]] | None:
    """(node name, weight name) of every MatMul whose weight is external, in graph order, in groups of about
    group_bytes; None when a node cannot be singled out by name (then the model is loaded whole)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users = _consumers(graph)
    names = [n.name for n in graph.node]
    if len(set(names)) != len(names) or "" in names:
        return None
    groups, size = [[]], 0
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        if not uses_external_data(init):
            continue
        if len(users[node.input[1]]) != 1:
            return None                        # a shared weight: leave it to the whole-model path
        nbytes = int(np.prod(init.dims)) * 4
        if groups[-1] and size + nbytes > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append((node.name, node.input[1]))
        size += nbytes
    return [g for g in groups if g]
