"""w8-fast and export.int8_compute on the tiny export: groups, kernels, structure, gates and the manifest's mu."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import int8_compute as ic
from export import quantize as qz
from export.quantize import QuantizeConfig, quantize_model
from zo_runtime import schedule
from zo_runtime.model_dir import ModelDir
from zo_runtime.train_config import TrainConfig

from test_quantize import FAST


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _one_op(op: str, w: np.ndarray, bias: np.ndarray | None, x_shape, name: str) -> onnx.ModelProto:
    ins, inits, attrs = ["x", "w"], [numpy_helper.from_array(w, "w")], {}
    if bias is not None:
        ins.append("b")
        inits.append(numpy_helper.from_array(bias, "b"))
    if op == "Conv":
        attrs = dict(kernel_shape=list(w.shape[2:]), pads=[w.shape[2] // 2] * 4)
    if op == "Gemm":
        attrs = dict(transB=1)
    node = helper.make_node(op, ins, ["y"], name=name, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("op,method", [("MatMul", "dynamic"), ("MatMul", "static"), ("Conv", "dynamic"),
                                       ("Conv", "static"), ("Gemm", "dynamic")])
def test_int8_kernels_match_float(op, method):
    """Each int8 form computes the same op: relative error of a few int8 steps, not more."""
    rng = np.random.default_rng(0)
    if op == "Conv":
        x_shape, w = (1, 16, 8, 8), rng.standard_normal((24, 16, 3, 3)).astype(np.float32) / 12
        name = "/down_blocks.0/resnets.0/conv1/Conv"
    elif op == "Gemm":
        x_shape, w = (1, 32), rng.standard_normal((48, 32)).astype(np.float32) / 6   # transB: (N, K)
        name = "/time_embedding/linear_1/Gemm"
    else:
        x_shape, w = (1, 64, 32), rng.standard_normal((32, 48)).astype(np.float32) / 6
        name = "/down_blocks.0/attentions.0/transformer_blocks.0/ff/net.2/MatMul"
    bias = rng.standard_normal(w.shape[0]).astype(np.float32) if op in ("Conv", "Gemm") else None
    x = rng.standard_normal(x_shape).astype(np.float32)
    model = _one_op(op, w, bias, x_shape, name)
    ref = _run(model, x)
    assert ic.group_of(model.graph.node[0]) in ic.GROUPS
    group = ic.group_of(model.graph.node[0])
    counts = ic.int8_compute(model, {group: method}, {"x": (x.min(), x.max()), "y": (ref.min(), ref.max())})
    assert counts == {group: 1} and not any(n.op_type == op for n in model.graph.node)
    got = _run(model, x)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.03


def test_groups_cover_the_unet_weight_ops(tiny_exported):
    model = onnx.load(str(ModelDir.open(tiny_exported).onnx("unet")))
    groups = ic.weight_nodes(model)
    assert all(groups[g] for g in ("text_kv", "attention", "feed_forward", "resnet", "conv", "time_embedding"))
    assert all("encoder_hidden_states" == n.input[0] for n in groups["text_kv"])     # K/V read the text states
    grouped = {n.output[0] for nodes in groups.values() for n in nodes}
    inits = {t.name for t in model.graph.initializer}
    loose = [n.name for n in model.graph.node if n.op_type in ic.WEIGHT_OPS and len(n.input) > 1
             and n.input[1] in inits and n.output[0] not in grouped]
    assert loose == []                     # every weight op is in a group; the rest are attention scores


def test_static_needs_ranges():
    model = _one_op("MatMul", np.ones((32, 32), np.float32), None, (1, 4, 32), "/x/ff/net.2/MatMul")
    with pytest.raises(ValueError, match="calibration ranges"):
        ic.int8_compute(model, {"feed_forward": "static"})
    with pytest.raises(ValueError, match="groups are"):
        ic.int8_compute(model, {"ff": "dynamic"})


def test_plan_parsing_names_the_fix():
    assert qz.parse_plan("feed_forward=block, resnet=dynamic") == {"feed_forward": "block", "resnet": "dynamic"}
    assert qz.parse_plan("") == {}
    with pytest.raises(ValueError, match="GROUP=METHOD"):
        qz.parse_plan("ff=block")
    with pytest.raises(ValueError, match="w8-fast"):
        QuantizeConfig(scheme="w8", int8_plan="resnet=dynamic")
    with pytest.raises(ValueError, match="--target cpu"):
        QuantizeConfig(scheme="w8-fast", target="openvino")
    fast, w8 = QuantizeConfig(scheme="w8-fast"), QuantizeConfig(scheme="w8")
    assert fast.gate_mus == tuple(sorted({1e-3, 1e-2, *qz.FAST_MUS})) and w8.gate_mus == (1e-3, 1e-2)
    assert (fast.perturbation, w8.perturbation) == ("train", "unit")
    assert (fast.zo_corr_min, w8.zo_corr_min) == (qz.FAST_ZO_CORR_MIN, 0.7)
    assert QuantizeConfig(scheme="w8-fast", train_mu=0.02).gate_mus == (1e-3, 1e-2, 0.02)


def test_quantize_key_of_existing_schemes_is_unchanged(tiny_exported):
    """Settings added for w8-fast stay out of the key while unset: earlier w8 folders are still reused."""
    src = ModelDir.open(tiny_exported)
    cfg = QuantizeConfig(scheme="w8")
    settings = {k: v for k, v in __import__("dataclasses").asdict(cfg).items()
                if k not in ("force", "gate") + qz.LATE_SETTINGS}
    blob = json.dumps({"files": src.manifest["files"], "settings": settings}, sort_keys=True, default=str)
    assert qz._key(src, cfg) == __import__("hashlib").sha256(blob.encode()).hexdigest()


@pytest.fixture(scope="module")
def fast(tiny_exported, photos, tmp_path_factory):  # noqa: F811
    cfg = QuantizeConfig(scheme="w8-fast", calib_images=str(photos), gate=False, **FAST)
    return ModelDir.open(quantize_model(tiny_exported, tmp_path_factory.mktemp("fast") / "w8-fast", cfg))


def _levels(model: onnx.ModelProto, pattern: str) -> set[int]:
    import re
    return {a.i for n in model.graph.node if n.op_type == "MatMulNBits" and re.search(pattern, n.name)
            for a in n.attribute if a.name == "accuracy_level"}


def test_w8_fast_structure(fast):
    """Attention and feed-forward MatMuls compute in int8; text K/V, convs and the fused attention stay float."""
    model = onnx.load(str(fast.onnx("unet")))
    plan = qz.parse_plan(qz.FAST_PLAN)
    assert plan == {"attention": "block", "feed_forward": "block"}
    assert _levels(model, r"/attn[12]/(to_q|to_out)|/attn1/to_[kv]/|/ff/") == {4}       # int8 compute
    assert _levels(model, r"/attn2/to_[kv]/") == {1}                # the text-state projections: fp32 compute
    ops = {n.op_type for n in model.graph.node}
    assert "MultiHeadAttention" in ops and not {"MatMul", "Softmax", "ConvInteger", "QLinearConv"} & ops
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert convs and all(n.input[1] in dq_out for n in convs)       # INT8 weights, fp32 compute (as w8)
    m = fast.manifest["int8_compute"]
    assert m["plan"] == plan and m["nodes"] == ic.count_int8_compute(model)
    assert m["fused_attention"] == sum(n.op_type == "MultiHeadAttention" for n in model.graph.node) > 0
    te = onnx.load(str(fast.onnx("text_encoder")))    # the text encoder is w8 as is: fp32 compute
    assert {a.i for n in te.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "accuracy_level"} == {1}


def test_w8_fast_records_its_training_mu(fast):
    """Gate 3 runs at every candidate mu with the trainer's perturbations; the largest that holds is recorded."""
    m = fast.manifest
    g = m["gates"]
    assert set(g["zo"]) == {f"{mu:g}" for mu in qz.FAST_MUS} and all(z["perturbation"] == "train"
                                                                       for z in g["zo"].values())
    held = sorted(float(mu) for mu, z in g["zo"].items() if z["corr"] >= qz.FAST_ZO_CORR_MIN)
    assert m["zo_validated_mus"] == held
    largest = max(held, default=None)
    assert m["train_defaults"] == ({} if largest is None else {"mu": largest})
    decided = [f for f in g["failed"] if f.startswith("ZO")]      # only the training mu's correlation decides
    assert len(decided) == (largest is None)
    corr = {f"{mu:g}": {"corr": 0.95 if mu >= 3e-3 else 0.5} for mu in qz.FAST_MUS}
    assert qz.training_mu(corr, QuantizeConfig(scheme="w8-fast")) == 1e-2
    assert qz.training_mu({**corr, "0.01": {"corr": 0.5}}, QuantizeConfig(scheme="w8-fast")) == 3e-3


def test_w8_records_validated_mus_without_defaults(tiny_exported, photos, tmp_path):  # noqa: F811
    cfg = QuantizeConfig(scheme="w8", calib_images=str(photos), gate=False, **FAST)
    m = ModelDir.open(quantize_model(tiny_exported, tmp_path / "w8", cfg)).manifest
    assert m["train_defaults"] == {} and m["zo_validated_mus"] == [0.001, 0.01]


def test_fused_attention_is_exact(tiny_exported):
    """MultiHeadAttention replaces every head-sliced attention with the same numbers (fp32)."""
    from export.fused_attention import fuse_attention
    path = ModelDir.open(tiny_exported).onnx("unet")
    model = onnx.load(str(path))
    attentions = len({n.name.rsplit("/", 2)[0] for n in model.graph.node if "/to_out.0/" in n.name})
    assert fuse_attention(model) == attentions > 0
    assert not any(n.op_type == "Softmax" for n in model.graph.node)
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32), "timestep": np.array(500.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_manifest_tells_the_trainer_its_mu(fast, tiny_exported):
    """What `zoodip train` reads from a w8-fast manifest: its mu, and a warning below what the gate validated."""
    m = fast.manifest
    cfg = TrainConfig(token="sks", init="dog")
    assert schedule.resolve(cfg, m).mu == m["train_defaults"].get("mu", 1e-3)
    assert schedule.mu_warning(ModelDir.open(tiny_exported).manifest, 1e-4) is None          # fp32: never gated
    if m["zo_validated_mus"]:
        bar = m["train_defaults"]["mu"]
        assert schedule.mu_warning(m, bar) is None and schedule.mu_warning(m, 1.0) is None
        assert f"--set mu={bar:g}" in schedule.mu_warning(m, bar / 2)
    else:
        assert "--scheme w8" in schedule.mu_warning(m, 1e-3)


def test_other_plans_write_their_kernels(tiny_exported, photos, tmp_path):  # noqa: F811
    """Static and dynamic plans (calibrated on the unfused graph) write QLinear*/dynamic kernels that run."""
    cfg = QuantizeConfig(scheme="w8-fast", int8_plan="attention=static,resnet=dynamic,time_embedding=dynamic",
                         calib_images=str(photos), gate=False, **FAST)
    q = ModelDir.open(quantize_model(tiny_exported, tmp_path / "plan", cfg))
    nodes = q.manifest["int8_compute"]["nodes"]
    assert nodes["QLinearMatMul"] > 0 and nodes["ConvInteger"] > 0 and nodes["DynamicQuantizeMatMul"] > 0
    assert q.manifest["int8_compute"]["fused_attention"] > 0
    assert np.isfinite(q.manifest["gates"]["zo"]["0.003"]["corr"])
