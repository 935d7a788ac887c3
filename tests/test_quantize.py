"""zoodip quantize on the tiny export: node structure per scheme, gates, static shapes, idempotence, calibration parity."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from export import gates as gt
from export.calibration import calibration_feeds, real_inputs, stream_minmax
from export.quantize import QuantizeConfig, quantize_model
from zo_runtime.assets import DREAMBOOTH_PROMPTS
from zo_runtime.model_dir import ModelDir
from zo_runtime.session import OnnxModel
from zo_runtime.text import TextEncoder

# Small but real: few samples and directions keep the file fast; the README numbers use the defaults.
FAST = dict(calib_samples=4, text_samples=4, gate_samples=2, zo_directions=8)


@pytest.fixture(scope="module")
def quantized(tiny_exported, photos, tmp_path_factory):
    """scheme -> quantized folder (gates measured, kept with gate=False so every scheme is inspectable)."""
    root = tmp_path_factory.mktemp("quantized")
    cache = {}

    def get(scheme: str, target: str = "cpu") -> Path:
        if (scheme, target) not in cache:
            cfg = QuantizeConfig(scheme=scheme, target=target, calib_images=str(photos), gate=False, **FAST)
            cache[scheme, target] = quantize_model(tiny_exported, root / f"{scheme}-{target}", cfg)
        return cache[scheme, target]
    return get


def _ops(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        out[node.op_type] = out.get(node.op_type, 0) + 1
    return out


def _init_types(path: Path) -> set[int]:
    return {t.data_type for t in onnx.load(str(path)).graph.initializer}


def test_w8a8_is_static_qdq_with_int8_weights(quantized):
    model = quantized("w8a8")
    for sub in ("text_encoder", "unet"):
        ops = _ops(model / sub / "model.onnx")
        assert ops.get("QuantizeLinear", 0) > 10 and ops.get("DequantizeLinear", 0) > ops["QuantizeLinear"]
        assert onnx.TensorProto.INT8 in _init_types(model / sub / "model.onnx")      # per-channel weights
    zero_points = [t for t in onnx.load(str(model / "unet" / "model.onnx")).graph.initializer
                   if t.name.endswith("_zero_point") and t.data_type == onnx.TensorProto.UINT8]
    assert zero_points, "activations must be UINT8"


def test_weight_only_schemes_quantize_weights_not_activations(quantized):
    w8, w4 = quantized("w8") / "unet" / "model.onnx", quantized("w4") / "unet" / "model.onnx"
    for path, bits in ((w8, 8), (w4, 4)):
        ops = _ops(path)
        assert ops.get("QuantizeLinear", 0) == 0                       # no activation quantization
        assert ops["MatMulNBits"] > 0 and ops["DequantizeLinear"] > 0  # MatMul n-bit, Conv/Gemm INT8
        nbits = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]
        assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {bits}
        assert {a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"} == {1}   # fp32 compute
    assert w4.stat().st_size < w8.stat().st_size
    te_bits = {a.i for n in onnx.load(str(quantized("w4") / "text_encoder" / "model.onnx")).graph.node
               if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert te_bits == {8}                                          # w4 keeps the text encoder at 8 bits


def test_fp16_keeps_float32_io(quantized):
    path = quantized("fp16") / "unet" / "model.onnx"
    model = onnx.load(str(path))
    assert onnx.TensorProto.FLOAT16 in _init_types(path)
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)


@pytest.mark.parametrize("scheme", ["w8a8", "w8", "w4", "fp16"])
def test_quantized_folder_opens_runs_and_records(quantized, tiny_exported, scheme):
    from export.manifest import verify_files
    q = ModelDir.open(quantized(scheme))
    m = q.manifest
    assert (m["scheme"], m["target"], m["static_shapes"]) == (scheme, "cpu", None)
    assert verify_files(q.root, m) == []
    assert (q.root / "tokenizer" / "vocab.json").is_file() and q.token_table().shape[0] == m["vocab_size"]
    cond = TextEncoder(q)(["a photo of a dog"])                                           # (1, 77, d)
    ref = TextEncoder(ModelDir.open(tiny_exported))(["a photo of a dog"])
    assert gt.cosine(cond, ref) > 0.95
    unet = OnnxModel(q.onnx("unet"))
    eps = unet.run({"sample": np.ones((1, 4, 16, 16), np.float32), "timestep": np.array(500.0),
                    "encoder_hidden_states": cond})[0]
    assert eps.shape == (1, 4, 16, 16) and np.isfinite(eps).all()
    g = m["gates"]
    for sub in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert -1 <= g[sub]["cosine"] <= 1 and 0 < g[sub]["psnr_db"] <= gt.PSNR_CAP_DB
    assert set(g["zo"]) == {"0.001", "0.01"} and all(-1 <= z["corr"] <= 1 for z in g["zo"].values())


def test_weight_only_int8_keeps_every_signal(quantized):
    """The published scheme passes all three gates on the tiny model, with margin."""
    g = ModelDir.open(quantized("w8")).manifest["gates"]
    assert g["passed"] and g["failed"] == []
    assert g["unet"]["cosine"] > 0.999 and g["unet"]["cond_cosine"] > 0.99
    assert min(z["corr"] for z in g["zo"].values()) > 0.95


def test_missed_gate_fails_with_no_gate_hint(tiny_exported, photos, tmp_path, monkeypatch):
    monkeypatch.setattr(gt, "ZO_CORR_MIN", 1.01)             # unreachable: every scheme misses gate 3
    out = tmp_path / "q"
    with pytest.raises(ValueError, match="--no-gate"):
        quantize_model(tiny_exported, out, QuantizeConfig(scheme="w8", calib_images=str(photos), **FAST))
    assert not out.exists() and not list(tmp_path.glob(".q.*"))   # nothing half-written


def test_static_target_fixes_and_records_shapes(tiny_exported, photos, tmp_path):
    cfg = QuantizeConfig(scheme="w8", target="npu-static", calib_images=str(photos), gate=False, **FAST)
    q = ModelDir.open(quantize_model(tiny_exported, tmp_path / "static", cfg))
    assert q.static_shapes == {"batch": 1, "height": 32, "width": 32}
    unet = OnnxModel(q.onnx("unet"))
    assert unet.static_shape("sample") == (1, 4, 16, 16)
    assert unet.static_shape("encoder_hidden_states") == (1, 77, 32)
    assert OnnxModel(q.onnx("vae_decoder")).static_shape("latent_sample") == (1, 4, 16, 16)
    assert _ops(q.onnx("unet")).get("MatMulNBits", 0) == 0    # static targets: plain QDQ for NPU providers
    with pytest.raises(ValueError, match="static-shape"):
        unet.run({"sample": np.zeros((2, 4, 16, 16), np.float32), "timestep": np.array(1.0),
                  "encoder_hidden_states": np.zeros((2, 77, 32), np.float32)})


def test_reuse_is_idempotent_and_other_settings_need_force(quantized, tiny_exported, photos, capsys):
    out = quantized("w8")
    before = (out / "manifest.json").stat().st_mtime_ns
    cfg = QuantizeConfig(scheme="w8", calib_images=str(photos), gate=False, **FAST)
    assert quantize_model(tiny_exported, out, cfg) == out
    assert "reusing" in capsys.readouterr().out and (out / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="--force"):
        quantize_model(tiny_exported, out, QuantizeConfig(scheme="w4", calib_images=str(photos), **FAST))


def test_reusing_a_model_kept_with_no_gate_still_gates(quantized, tiny_exported, photos):
    out = quantized("w8a8")                    # kept with gate=False; misses gates on the tiny model
    assert ModelDir.open(out).manifest["gates"]["failed"]
    with pytest.raises(ValueError, match="--no-gate"):
        quantize_model(tiny_exported, out, QuantizeConfig(scheme="w8a8", calib_images=str(photos), **FAST))


def test_streaming_ranges_equal_onnxruntime_minmax(tiny_exported, photos, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    src = ModelDir.open(tiny_exported)
    inputs = real_inputs(src, sorted(photos.glob("*.png")), 32, 4, held_out=False)
    import onnxruntime as ort
    feeds = calibration_feeds("unet", inputs, src.alphas_cumprod(), 3, 0,
                              ort.InferenceSession(str(src.onnx("unet"))).get_inputs())

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    ref = create_calibrator(src.onnx("unet"), augmented_model_path=str(tmp_path / "aug.onnx"),
                            calibrate_method=CalibrationMethod.MinMax)
    ref.collect_data(Reader())
    want = ref.compute_data()
    got = stream_minmax(src.onnx("unet"), feeds)
    chunked = stream_minmax(src.onnx("unet"), feeds, chunk=100)
    assert set(got.keys()) == set(want.keys()) == set(chunked.keys()) and len(got.keys()) > 100
    for name in want.keys():
        w = np.ravel(want[name].range_value)
        np.testing.assert_allclose(np.ravel(got[name].range_value), w, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(np.ravel(chunked[name].range_value), w, rtol=1e-4, atol=1e-5, err_msg=name)


def test_dreambooth_prompt_file_parses():
    from export.calibration import read_dreambooth_prompts
    prompts = read_dreambooth_prompts(DREAMBOOTH_PROMPTS)
    assert "a {0} {1} in the jungle" in prompts and len(prompts) >= 25


def test_cli_missing_images_is_one_line_error(tiny_exported, tmp_path):
    from click.testing import CliRunner
    from zoodip.cli import main
    result = CliRunner().invoke(main, ["quantize", str(tiny_exported), str(tmp_path / "q"),
                                       "--calib-images", str(tmp_path / "nope")])
    assert result.exit_code != 0 and "--calib-images" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_qnn_target_uses_uint16_activations(quantized):
    """QNN HTP profile (cannot run here: no QNN EP): 16-bit activations, 8-bit weights, fixed shapes."""
    q = ModelDir.open(quantized("w8a8", "qnn"))
    model = onnx.load(str(q.onnx("unet")))
    types = {t.data_type for t in model.graph.initializer if t.name.endswith("zero_point")}
    assert onnx.TensorProto.UINT16 in types and onnx.TensorProto.UINT8 in types
    assert q.static_shapes["batch"] == 1


def test_config_names_the_fix():
    with pytest.raises(ValueError, match="w8a8 or fp16"):
        QuantizeConfig(scheme="w4", target="qnn")
    with pytest.raises(ValueError, match="--gate-resolution"):
        QuantizeConfig(target="openvino", resolution=512, gate_resolution=256)
    with pytest.raises(ValueError, match="unknown scheme"):
        QuantizeConfig(scheme="int8")
