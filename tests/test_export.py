"""Export stage: every submodel matches its PyTorch original; manifest, reuse, errors and the CLI behave."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from zo_runtime.model_dir import MANIFEST_KEYS, ModelDir
from zo_runtime.session import OnnxModel
from zo_runtime.tokenizer import ClipTokenizer

PAIRS = [("tiny_diffusers", "tiny_exported"), ("tiny_v_diffusers", "tiny_v_exported")]
PROMPTS = ["a photo of a dog", "an oil painting of a red fox in the snow, highly detailed"]


@pytest.fixture(params=PAIRS, ids=["sd1", "sd2v"])
def pair(request):
    src, out = request.param
    return request.getfixturevalue(src), ModelDir.open(request.getfixturevalue(out))


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def test_text_encoder_table_lookup_matches_clip(pair):
    from transformers import CLIPTextModel
    src, model = pair
    tok = ClipTokenizer(model.tokenizer_dir, model.manifest["pad_token"])
    ids = tok(PROMPTS)                                                     # (2, 77)
    embeds = np.asarray(model.token_table()[ids], dtype=np.float32)        # (2, 77, d)
    got = OnnxModel(model.onnx("text_encoder")).run({"inputs_embeds": embeds})[0]
    ref = CLIPTextModel.from_pretrained(src / "text_encoder").eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert got.shape == want.shape == (2, 77, model.dim)
    assert _max_err(got, want) < 1e-4
    # The causal mask matters: changing a late token must not change earlier positions.
    embeds2 = embeds.copy()
    embeds2[:, 10] += np.random.default_rng(0).standard_normal(model.dim).astype(np.float32)  # not a constant: LayerNorm removes those
    got2 = OnnxModel(model.onnx("text_encoder")).run({"inputs_embeds": embeds2})[0]
    assert _max_err(got2[:, :10], got[:, :10]) < 1e-5 and _max_err(got2[:, 10:], got[:, 10:]) > 1e-3


def test_unet_matches_diffusers(pair):
    from diffusers import UNet2DConditionModel
    src, model = pair
    rng = np.random.default_rng(0)
    m = model.manifest
    h = m["native_resolution"] // m["vae_scale_factor"]
    sample = rng.standard_normal((2, m["latent_channels"], h, h)).astype(np.float32)
    ehs = rng.standard_normal((2, 77, model.dim)).astype(np.float32)
    ref = UNet2DConditionModel.from_pretrained(src / "unet").eval()
    sess = OnnxModel(model.onnx("unet"))
    for t in (999, 1):
        got = sess.run({"sample": sample, "timestep": np.array(t), "encoder_hidden_states": ehs})[0]
        with torch.no_grad():
            want = ref(torch.from_numpy(sample), t, torch.from_numpy(ehs)).sample.numpy()
        assert _max_err(got, want) < 1e-4 * max(1.0, float(np.abs(want).max()))


def test_vae_matches_diffusers(pair):
    from diffusers import AutoencoderKL
    src, model = pair
    rng = np.random.default_rng(1)
    m = model.manifest
    H = m["native_resolution"]
    image = rng.uniform(-1, 1, (1, 3, H, H)).astype(np.float32)
    ref = AutoencoderKL.from_pretrained(src / "vae").eval()
    params = OnnxModel(model.onnx("vae_encoder")).run({"sample": image})[0]
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(image)).latent_dist
    C = m["latent_channels"]
    assert params.shape == (1, 2 * C, H // m["vae_scale_factor"], H // m["vae_scale_factor"])
    assert _max_err(params[:, :C], dist.mean.numpy()) < 1e-4
    assert _max_err(params[:, C:], dist.logvar.numpy()) < 1e-4
    latent = rng.standard_normal(dist.mean.shape).astype(np.float32)
    got = OnnxModel(model.onnx("vae_decoder")).run({"latent_sample": latent})[0]
    with torch.no_grad():
        want = ref.decode(torch.from_numpy(latent)).sample.numpy()
    assert got.shape == (1, 3, H, H)
    assert _max_err(got, want) < 1e-4 * max(1.0, float(np.abs(want).max()))
