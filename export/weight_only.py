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
        return read_external(init, base_dir)        # never into the proto (see nbits_matmul: arenas)
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


def read_external(tensor: onnx.TensorProto, base_dir: str | Path) -> np.ndarray:
    """An external tensor's array, read from its file at its offset; the proto is left as it is."""
    info = {e.key: e.value for e in tensor.external_data}
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    count = int(np.prod(tensor.dims, dtype=np.int64))
    with open(Path(base_dir) / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        data = np.fromfile(f, dtype=dtype, count=count)
    if data.size != count:
        raise ValueError(f"{Path(base_dir) / info['location']} ends inside tensor {tensor.name!r}: the model "
                         "folder is damaged; export it again")
    return data.reshape(tuple(tensor.dims))


def load_remaining(model: onnx.ModelProto, base_dir: str | Path) -> int:
    """Read every tensor still external (norms, biases, weights left float) into memory; returns how many.

    A model saved elsewhere must carry its own bytes: a reference into the source's model.onnx_data would
    point at the wrong offsets of the new file."""
    from onnx.external_data_helper import _get_all_tensors
    n = 0
    for t in _get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(t, str(base_dir))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
            n += 1
    return n


def nbits_matmul(model: onnx.ModelProto, bits: int, block_size: int, accuracy_level: int,
                 nodes: list[str] | None = None, base_dir: str | Path | None = None) -> onnx.ModelProto:
    """MatMul weights -> `bits`-bit MatMulNBits (onnxruntime's quantizer, symmetric blocks); returns the new model.

    nodes: only the MatMuls of these names (None: every MatMul with a constant weight).

    accuracy_level 1 = fp32 compute on dequantized blocks. Level 4 (int8 compute, which onnxruntime also picks
    when it fuses DequantizeLinear -> MatMul at session creation) quantizes activations on the fly: on the tiny
    model the ZO finite-difference correlation fell from 0.998 to 0.03. Weight-only must stay weight-only.

    base_dir: the folder of a model loaded with load_external_data=False. Each MatMul with an external weight is
    then quantized on its own: a one-node model holding that weight goes through the same quantizer, and its
    nodes and quantized tensors replace the MatMul. The fp32 weight never enters `model`: protobuf keeps a
    message's bytes in its model's arena until the whole model is freed, so weights loaded into the model and
    removed again stay resident (measured: the SDXL-half UNet held 3.2 GiB for a 0.65 GB result). The result is
    the whole-model path's, node for node and tensor for tensor (tests/test_sdxl.py).
    """
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # one line per node

    wanted = set(nodes) if nodes else None

    def quantize(m: onnx.ModelProto) -> onnx.ModelProto:
        # The quantizer's nodes_to_include adds to its op types rather than narrowing them: exclude the others.
        others = [n.name for n in m.graph.node if n.op_type == "MatMul" and n.name not in wanted] if wanted else None
        quantizer = MatMulNBitsQuantizer(m, bits=bits, block_size=block_size, is_symmetric=True,
                                         accuracy_level=accuracy_level, quant_format=QuantFormat.QOperator,
                                         op_types_to_quantize=("MatMul",), nodes_to_exclude=others)
        quantizer.process()
        return quantizer.model.model

    if base_dir is None or not _streamable(model):
        if base_dir is not None:
            load_remaining(model, base_dir)      # a shared external weight: the plain path, data loaded
        return quantize(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    kept = []
    for node in graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if w is None or not uses_external_data(w) or (wanted and node.name not in wanted):
            kept.append(node)
            continue
        one = helper.make_model(helper.make_graph([node], "one", [], [], [numpy_helper.from_array(
            read_external(w, base_dir), w.name)]), opset_imports=model.opset_import, ir_version=model.ir_version)
        one = quantize(one)
        # Copies, not references: a reference into `one` would keep its arena, fp32 weight included, alive.
        kept.extend(_copy(n, onnx.NodeProto) for n in one.graph.node)
        used = {i for n in one.graph.node for i in n.input}
        for t in one.graph.initializer:
            if t.name in used:
                graph.initializer.add().CopyFrom(t)
        _merge_opsets(model, one)
        del one
    del graph.node[:]
    graph.node.extend(kept)
    return quantize(model)       # what is left (MatMuls with inline weights, if any); unused fp32 entries dropped


def _copy(message, cls):
    out = cls()
    out.CopyFrom(message)
    return out


def _streamable(model: onnx.ModelProto) -> bool:
    """Every external MatMul weight feeds one node only (shared weights take the whole-model path)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users = _consumers(graph)
    return all(len(users[n.input[1]]) == 1 for n in graph.node if n.op_type == "MatMul" and len(n.input) > 1
               and n.input[1] in inits and uses_external_data(inits[n.input[1]]))


def _merge_opsets(model: onnx.ModelProto, other: onnx.ModelProto) -> None:
    have = {o.domain for o in model.opset_import}
    for o in other.opset_import:
        if o.domain not in have:
            model.opset_import.add(domain=o.domain, version=o.version)
