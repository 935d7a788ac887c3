"""The `--target openvino` model under OpenVINOExecutionProvider (device CPU) matches the CPU provider.

Runs in .venv-openvino (scripts/setup_openvino.sh), on a model that scripts/openvino_check.sh quantizes in
.venv (export/quantize need torch and Optimum) and names in $ZOODIP_OPENVINO_MODEL. Skips elsewhere.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytestmark = [
    pytest.mark.openvino,
    pytest.mark.skipif("OpenVINOExecutionProvider" not in ort.get_available_providers(),
                       reason="onnxruntime-openvino is not installed (scripts/setup_openvino.sh)"),
    pytest.mark.skipif(not os.environ.get("ZOODIP_OPENVINO_MODEL"),
                       reason="$ZOODIP_OPENVINO_MODEL unset (scripts/openvino_check.sh sets it)"),
]
# OpenVINO's CPU plugin would pick bf16 on CPUs that have it; FP32 makes the comparison about the graph.
OV_OPTIONS = ("--provider-option", "device_type=CPU", "--provider-option", "precision=FP32")
# Tolerances, measured on the tiny w8 openvino-target model (with zoodip's default OpenVINO options, which
# turn off OpenVINO's dynamic activation quantization) and set with >= 20x margin: max relative error
# <= 2.5e-6 per submodel, step-1 loss 2.6e-9, pixels 0.002. Same graph, kernels that sum in another order.
OUTPUT_COSINE_MIN = 0.99999
OUTPUT_MAX_REL_ERR = 1e-4        # max |ov - cpu| / max |cpu| per submodel
LOSS_REL_DIFF_MAX = 1e-5         # diffusion loss at the same (v, x_t, t, eps)
PIXEL_MEAN_ABS_MAX = 0.5         # mean |ov - cpu| in 0..255 of generated images
# The ZO training signal: Adam trajectories of two providers diverge after a few steps (early Adam steps are
# ~lr * sign(g)), so the test compares what each step is built from, the finite differences, as gate 3 does.
MU, DIRECTIONS, ZO_CORR_MIN = 1e-3, 16, 0.9


@pytest.fixture(scope="module")
def model() -> Path:
    return Path(os.environ["ZOODIP_OPENVINO_MODEL"])


def _zoodip(*args: str) -> None:
    subprocess.run([sys.executable, "-c", "from zoodip.cli import main; main()", *args], check=True)


def test_submodels_match_cpu_provider(model):
    from zo_runtime.model_dir import ModelDir
    from zo_runtime.session import OnnxModel
    q = ModelDir.open(model)
    assert q.manifest["target"] == "openvino" and q.static_shapes
    rng = np.random.default_rng(0)
    for sub in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        cpu = OnnxModel(q.onnx(sub), "cpu")
        ov = OnnxModel(q.onnx(sub), "openvino", {"device_type": "CPU", "precision": "FP32"})
        assert ov.provider == "OpenVINOExecutionProvider"
        feeds = {name: (np.array(500.0, np.float32) if not meta.shape else
                        rng.standard_normal(meta.shape).astype(np.float32))
                 for name, meta in cpu.inputs.items()}
        a, b = cpu.run(feeds)[0], ov.run(feeds)[0]
        cos = float(np.ravel(a) @ np.ravel(b) / (np.linalg.norm(a) * np.linalg.norm(b)))
        rel = float(np.abs(a - b).max() / np.abs(a).max())
        print(f"{sub}: cosine {cos:.6f}, max rel err {rel:.2e}")
        assert cos > OUTPUT_COSINE_MIN and rel < OUTPUT_MAX_REL_ERR, sub


def test_zo_signal_matches_cpu_provider(model):
    """What training sees: finite differences (L(v + mu z) - L(v)) / mu under OpenVINO vs CPU, correlated."""
    from zo_runtime.model_dir import ModelDir
    from zo_runtime.session import OnnxModel
    from zo_runtime.text import TextEncoder
    q = ModelDir.open(model)
    text = TextEncoder(q, "cpu")
    sid = text.add_tokens(["sks"], text.token_embeds(text.tokenizer(["dog"]))[:, 1])[0]
    ids = text.tokenizer(["a photo of a sks"])
    base = text.token_embeds(ids)                                              # (1, 77, d)
    slot = int((ids[0] == sid).nonzero()[0][0])
    rng = np.random.default_rng(0)
    unet_in = OnnxModel(q.onnx("unet"), "cpu").inputs["sample"].shape
    x_t, eps = (rng.standard_normal(unet_in).astype(np.float32) for _ in range(2))
    z = rng.standard_normal((DIRECTIONS, base.shape[-1]))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    fds = []
    for provider, opts in (("cpu", None), ("openvino", {"device_type": "CPU", "precision": "FP32"})):
        te, unet = OnnxModel(q.onnx("text_encoder"), provider, opts), OnnxModel(q.onnx("unet"), provider, opts)

        def loss(v):
            e = base.copy()
            e[0, slot] = v
            cond = te.run({"inputs_embeds": e})[0]
            pred = unet.run({"sample": x_t, "timestep": np.array(700.0), "encoder_hidden_states": cond})[0]
            return float(np.mean((pred.astype(np.float64) - eps) ** 2))
        v = base[0, slot]
        l0 = loss(v)
        fds.append(np.array([(loss(v + MU * zk) - l0) / MU for zk in z]))
    corr = float(np.corrcoef(*fds)[0, 1])
    print(f"ZO finite differences, OpenVINO vs CPU: corr {corr:.4f} (mu {MU}, {DIRECTIONS} unit directions)")
    assert corr > ZO_CORR_MIN


def test_train_and_generate_run_and_match_cpu_provider(model, tmp_path):
    import json
    from PIL import Image
    photos = Path(os.environ.get("ZOODIP_OPENVINO_PHOTOS", ""))
    if not photos.is_dir():
        pytest.skip("$ZOODIP_OPENVINO_PHOTOS unset")
    runs = {}
    for name, extra in (("cpu", ("--provider", "cpu")), ("ov", ("--provider", "openvino", *OV_OPTIONS))):
        out = tmp_path / name
        _zoodip("train", str(model), "--images", str(photos), "--token", "sks", "--init", "dog", "--out", str(out),
                "--steps", "6", "--set", "latent=mean", "--set", "save_every=0", "--seed", "0", *extra)
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
        _zoodip("generate", str(model), "--embeds", str(out / "learned_embeds.safetensors"), "--prompt",
                "a photo of sks", "--out", str(out / "img"), "-n", "1", "--steps", "4", "--seed", "0", *extra)
        runs[name] = (rows, np.asarray(Image.open(out / "img" / "000.png"), np.float32))
    (rows_cpu, img_cpu), (rows_ov, img_ov) = runs["cpu"], runs["ov"]
    assert len(rows_ov) == 6 and all(np.isfinite(r["loss"]) for r in rows_ov)
    # Step 1 evaluates the same v, x_t, t and noise under both providers: the losses must agree.
    first = abs(rows_ov[0]["loss"] - rows_cpu[0]["loss"]) / rows_cpu[0]["loss"]
    # Generation with the same seed (embeddings differ slightly: trajectories of Adam diverge by design).
    pix = float(np.abs(img_ov - img_cpu).mean())
    print(f"step-1 loss rel diff {first:.2e}, pixel mean abs diff {pix:.3f} (0..255)")
    assert first < LOSS_REL_DIFF_MAX and pix < PIXEL_MEAN_ABS_MAX
