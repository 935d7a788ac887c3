"""Weight-only INT8 graph rewrite (sliced dequantization of big Convs) and the malloc setting sessions rely on."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from export import weight_only as wo

# A (40, 16, 3, 3) Conv weight: 5760 elements (360 per input channel), so a 2000-element cap allows 5 input
# channels a slice: 4 slices of 4.
OUT_CH, IN_CH, CAP = 40, 16, 2000


def _conv_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((OUT_CH, IN_CH, 3, 3)).astype(np.float32) * 0.1
    b = rng.standard_normal(OUT_CH).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], name="conv")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, IN_CH, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, OUT_CH, 8, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_big_conv_weight_is_dequantized_in_input_channel_slices():
    x = np.random.default_rng(1).standard_normal((1, IN_CH, 8, 8)).astype(np.float32)
    ref = _run(_conv_model(), x)
    whole, sliced = _conv_model(), _conv_model()
    assert wo.int8_weight_only(whole, max_dequant_elements=None) == 1
    assert wo.int8_weight_only(sliced, max_dequant_elements=CAP) == 1
    ops = [n.op_type for n in sliced.graph.node]
    assert ops == ["DequantizeLinear"] * 4 + ["Split"] + ["Conv"] + ["Conv", "Add"] * 3   # DQ first; running sum
    inits = {t.name: numpy_helper.to_array(t) for t in sliced.graph.initializer}
    shapes = [inits[n.input[0]].shape for n in sliced.graph.node if n.op_type == "DequantizeLinear"]
    assert shapes == [(OUT_CH, 4, 3, 3)] * 4 and 4 * OUT_CH * 9 <= CAP   # no float W above the cap
    assert "w" not in inits and [n.input[2:] for n in sliced.graph.node if n.op_type == "Conv"][0] == ["b"]
    y_whole, y_sliced = _run(whole, x), _run(sliced, x)
    np.testing.assert_allclose(y_sliced, y_whole, rtol=0, atol=1e-5)   # same per-channel INT8 values
    assert np.abs(y_sliced - ref).max() < 0.02 * np.abs(ref).max()     # and still the float conv


def test_grouped_conv_stays_whole():
    model = _conv_model()
    conv = model.graph.node[0]
    conv.attribute.append(helper.make_attribute("group", 2))
    w = next(t for t in model.graph.initializer if t.name == "w")
    w.CopyFrom(numpy_helper.from_array(np.ones((OUT_CH, IN_CH // 2, 3, 3), np.float32), "w"))
    wo.int8_weight_only(model, max_dequant_elements=CAP // 4)
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "Conv"]


def test_sessions_return_freed_tensors_to_the_os():
    """Without the pinned mmap threshold, glibc keeps freed 4-8 MiB tensors resident (12 MiB here)."""
    probe = textwrap.dedent("""
        import os, sys
        import numpy as np
        from zo_runtime.session import fix_malloc_mmap_threshold
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        pinned = fix_malloc_mmap_threshold() if sys.argv[1] == "pin" else None
        base = rss()
        for _ in range(3):
            a = np.ones(2 << 20, np.float32); b = np.ones(1 << 20, np.float32); del a, b   # 8 + 4 MiB
        print(pinned, (rss() - base) / 2 ** 20)
    """)
    root = Path(__file__).resolve().parents[1]
    kept, pinned = {}, {}
    for mode in ("pin", "default"):
        out = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True, cwd=root)
        pinned[mode], mib = out.stdout.split()
        kept[mode] = float(mib)
    if pinned["pin"] != "True":
        return                                   # not glibc: nothing was set, nothing to compare
    assert kept["pin"] < 1.0                     # freed at once
    assert kept["default"] > 8.0                 # the behaviour the pin exists for
