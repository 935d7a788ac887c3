"""One weight op at SD 1.5's 512 px shapes, per int8-compute kernel: time and error against fp32.

    python -m bench.sd.int8_kernels --out bench/results/int8_kernels.json

Each op is a one-node (or one-pattern) ONNX model built from export.int8_compute, run through onnxruntime's
CPU provider with zoodip's session settings. Shows which kernels are fast on this CPU before any graph is
rewritten: w8 today (MatMulNBits fp32 compute, DequantizeLinear -> Conv), MatMulNBits int8 compute
(block 32/64/128), dynamic (DynamicQuantizeMatMul, ConvInteger) and static (QLinearMatMul, QLinearConv); and
one 64x64 self-attention head-sliced (as exported) vs onnxruntime's fused MultiHeadAttention.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import common

# (name, op, activation shape, weight shape): the big ops of SD 1.5's UNet at 512 px (64x64 latents).
SHAPES = (
    ("attn proj 64x64 (4096x320 @ 320x320)", "MatMul", (1, 4096, 320), (320, 320)),
    ("ff in 64x64 (4096x320 @ 320x2560)", "MatMul", (1, 4096, 320), (320, 2560)),
    ("ff out 64x64 (4096x1280 @ 1280x320)", "MatMul", (1, 4096, 1280), (1280, 320)),
    ("ff in 32x32 (1024x640 @ 640x5120)", "MatMul", (1, 1024, 640), (640, 5120)),
    ("resnet conv 64x64 320->320 3x3", "Conv", (1, 320, 64, 64), (320, 320, 3, 3)),
    ("resnet conv 32x32 640->640 3x3", "Conv", (1, 640, 32, 32), (640, 640, 3, 3)),
    ("resnet conv 16x16 1280->1280 3x3", "Conv", (1, 1280, 16, 16), (1280, 1280, 3, 3)),
    ("up conv 64x64 640->320 3x3", "Conv", (1, 640, 64, 64), (320, 640, 3, 3)),
    ("proj_in 64x64 320->320 1x1", "Conv", (1, 320, 64, 64), (320, 320, 1, 1)),
)
KERNELS = {"MatMul": ("fp32", "w8", "block32", "block64", "block128", "dynamic", "static"),
           "Conv": ("fp32", "w8", "dynamic", "static")}


def one_op_model(op: str, x_shape, w: np.ndarray, bias: np.ndarray | None, kernel: str, ranges: dict) -> onnx.ModelProto:
    """A model computing y = op(x, w[, bias]) with `kernel`'s quantization of w (and x)."""
    from export import int8_compute as ic
    from export import weight_only as wo

    y_dim = [x_shape[0], w.shape[0], x_shape[2] - w.shape[2] + 1 + 2 * (w.shape[2] // 2),
             x_shape[3] - w.shape[3] + 1 + 2 * (w.shape[3] // 2)] if op == "Conv" else [*x_shape[:-1], w.shape[1]]
    inits = [numpy_helper.from_array(w, "w")]
    ins = ["x", "w"]
    attrs = {}
    if op == "Conv":
        k = w.shape[2]
        attrs = dict(kernel_shape=[k, k], pads=[k // 2] * 4, strides=[1, 1])
        if bias is not None:
            inits.append(numpy_helper.from_array(bias, "b"))
            ins.append("b")
    node = helper.make_node(op, ins, ["y"], name=f"/down_blocks.0/resnets.0/conv1/{op}" if op == "Conv"
                            else f"/down_blocks.0/attentions.0/transformer_blocks.0/ff/net.2/{op}", **attrs)
    graph = helper.make_graph([node], "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_dim)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    group = ic.group_of(node)
    if kernel == "w8":
        if op == "MatMul":
            return wo.nbits_matmul(model, 8, 64, 1)
        wo.int8_weight_only(model, ("Conv",))
    elif kernel.startswith("block"):
        return wo.nbits_matmul(model, 8, int(kernel[5:]), 4)
    elif kernel in ("dynamic", "static"):
        ic.int8_compute(model, {group: kernel}, ranges)
    return model


def time_model(model: onnx.ModelProto, x: np.ndarray, repeats: int) -> tuple[dict, np.ndarray]:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_cpu_mem_arena = False
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    secs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        secs.append(time.perf_counter() - t0)
    return {"median_ms": round(float(np.median(secs)) * 1e3, 3), "min_ms": round(min(secs) * 1e3, 3)}, y


def attention_model(tokens: int, heads: int, head_dim: int, fused: bool) -> onnx.ModelProto:
    """Self-attention of q, k, v (1, T, H*d): head-sliced as zoodip exports it, or one MultiHeadAttention."""
    from export.fused_attention import MS_DOMAIN
    c = heads * head_dim
    io = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, tokens, c]) for x in "qkv"]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, c])]
    if fused:
        nodes = [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain=MS_DOMAIN, num_heads=heads)]
        graph = helper.make_graph(nodes, "attn", io, out)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
        model.ir_version = 8
        return model
    inits = [numpy_helper.from_array(np.array([1, tokens, heads, head_dim], np.int64), "shape"),
             numpy_helper.from_array(np.array(head_dim ** -0.5, np.float32), "scale"),
             numpy_helper.from_array(np.array([1, tokens, c], np.int64), "merged"),
             numpy_helper.from_array(np.array([1], np.int64), "axis")]
    nodes = []
    for x, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("Reshape", [x, "shape"], [f"{x}_4d"]), helper.make_node("Transpose", [f"{x}_4d"], [f"{x}h"], perm=perm)]
    outs = []
    for h in range(heads):        # one (T, T) score matrix at a time, as export/attention.py writes it
        inits += [numpy_helper.from_array(np.array([h], np.int64), f"s{h}"),
                  numpy_helper.from_array(np.array([h + 1], np.int64), f"e{h}")]
        nodes += [helper.make_node("Slice", [f"{x}h", f"s{h}", f"e{h}", "axis"], [f"{x}{h}"]) for x in "qkv"]
        nodes += [helper.make_node("MatMul", [f"q{h}", f"k{h}"], [f"m{h}"]),
                  helper.make_node("Mul", [f"m{h}", "scale"], [f"ms{h}"]),
                  helper.make_node("Softmax", [f"ms{h}"], [f"p{h}"], axis=-1),
                  helper.make_node("MatMul", [f"p{h}", f"v{h}"], [f"o{h}"])]
        outs.append(f"o{h}")
    nodes += [helper.make_node("Concat", outs, ["cat"], axis=1), helper.make_node("Transpose", ["cat"], ["t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["t", "merged"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "attn", io, out, inits), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def measure_attention(repeats: int) -> list[dict]:
    """SD 1.5's 64x64 self-attention (4096 tokens, 8 heads of 40): head-sliced vs fused, fp32 both."""
    import onnxruntime as ort
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal((1, 4096, 320), dtype=np.float32) for x in "qkv"}
    rows, ref = [], None
    for kernel, fused in (("sliced", False), ("fused", True)):
        so = ort.SessionOptions()
        so.enable_cpu_mem_arena = False
        sess = ort.InferenceSession(attention_model(4096, 8, 40, fused).SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        y = sess.run(None, feeds)[0]
        ref = y if ref is None else ref
        secs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            secs.append(time.perf_counter() - t0)
        err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        rows.append({"op": "self-attention 64x64 (4096 tokens, 8 x 40)", "kernel": kernel,
                     "median_ms": round(float(np.median(secs)) * 1e3, 3), "min_ms": round(min(secs) * 1e3, 3),
                     "rel_error": round(err, 8)})
        print(f"{rows[-1]['op']:42s} {kernel:9s} {rows[-1]['median_ms']:9.2f} ms  rel.err {err:.2e}", flush=True)
    return rows


def measure(repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = measure_attention(repeats)
    for name, op, x_shape, w_shape in SHAPES:
        # SiLU/LayerNorm-like activations with a few outlier channels, as SD's residual stream has.
        x = rng.standard_normal(x_shape).astype(np.float32)
        x[..., :4] *= 8 if op == "MatMul" else 1
        w = (rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]) if op == "Conv" else w_shape[0])).astype(np.float32)
        bias = rng.standard_normal(w_shape[0]).astype(np.float32) * 0.1 if op == "Conv" else None
        ranges = {"x": (float(x.min()), float(x.max()))}
        for kernel in KERNELS[op]:     # fp32 first: its output gives the static kernel's output range
            stats, y = time_model(one_op_model(op, x_shape, w, bias, kernel, ranges), x, repeats)
            if kernel == "fp32":
                ref, ranges["y"] = y, (float(y.min()), float(y.max()))
            err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
            rows.append({"op": name, "kernel": kernel, **stats, "rel_error": round(err, 5)})
            print(f"{name:42s} {kernel:9s} {stats['median_ms']:9.2f} ms  rel.err {err:.2e}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args(argv)
    machine = common.machine_facts()
    rows = measure(a.repeats)
    common.write_json(a.out, {"rows": rows, "repeats": a.repeats, "machine": machine,
                              "command": f"python -m bench.sd.int8_kernels --out {a.out} --repeats {a.repeats}",
                              "note": common.load_note(machine)})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
