"""Torch-free generation vs diffusers' StableDiffusionPipeline on tiny models; files, determinism, errors."""
import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import run_without_torch
from click.testing import CliRunner
from PIL import Image

from zo_runtime.embeds import save_learned_embeds
from zo_runtime.generate import GenerateConfig, Generator, generate
from zo_runtime.image_io import read_meta

# Decoded images may differ by one 8-bit level where a pixel sits on a rounding boundary.
IMAGE_ATOL_U8 = 1
# Final latents (before the VAE), relative to their largest magnitude: ORT vs torch float32 kernels.
LATENT_RTOL = 1e-4
TOKEN = "<sks>"
PROMPT = f"a photo of {TOKEN} on the beach"
STEPS = 5


def _embeds(path, dim, k=2, seed=0, scale=1.0):
    vec = np.random.default_rng(seed).standard_normal((k, dim)).astype(np.float32) * scale
    return save_learned_embeds(path, TOKEN, vec)


def _dim(model):
    return json.loads((model / "manifest.json").read_text())["embedding_dim"]


def _reference(diffusers_dir, embeds, scheduler, latents):
    """diffusers' final latents and decoded [0, 1] images for PROMPT with the TI file loaded."""
    import torch
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           StableDiffusionPipeline)
    # One thread: on this shared 2-core machine torch's thread pool is ~40x slower than one thread.
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(diffusers_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(embeds))
    pipe.set_progress_bar_config(disable=True)
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler}[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    size = latents.shape[-1] * pipe.vae_scale_factor
    with torch.no_grad():
        lat = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, latents=torch.from_numpy(latents),
                   num_images_per_prompt=len(latents), height=size, width=size, output_type="latent").images
        image = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample     # what output_type="np" does
    return lat.numpy(), pipe.image_processor.postprocess(image, output_type="np")


def _parity(diffusers_dir, exported, tmp_path, scheduler):
    embeds = _embeds(tmp_path / "sks.safetensors", _dim(exported))
    gen = Generator(exported, [embeds], provider="cpu")
    cfg = GenerateConfig(n=2, steps=STEPS, scheduler=scheduler, progress=False)
    h = int(gen.model.manifest["native_resolution"]) // gen.vae_factor
    lat = np.random.default_rng(1).standard_normal((2, gen.latent_channels, h, h)).astype(np.float32)
    ref_lat, ref_img = _reference(diffusers_dir, embeds, scheduler, lat)

    text = gen.encode([PROMPT] * 2 + [""] * 2)                          # [cond; uncond]
    ours_lat = gen.denoise(lat, text[:2], text[2:], cfg, [])
    err = np.abs(ours_lat - ref_lat).max() / np.abs(ref_lat).max()
    assert err < LATENT_RTOL, f"final latents differ from diffusers by {err:.2e} (relative)"

    ours = gen.sample(PROMPT, cfg, latents=lat)
    ref = (ref_img * 255).round().astype(np.uint8)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= IMAGE_ATOL_U8, f"images differ by up to {diff.max()} levels"

    # The learned rows matter: other vectors for the same token (set_token overwrites) give other pixels.
    gen.set_token(TOKEN, np.random.default_rng(5).standard_normal((2, gen.text.dim)) * 3)
    other = gen.sample(PROMPT, cfg, latents=lat)
    assert np.abs(other.astype(int) - ref.astype(int)).mean() > 10 * max(diff.mean(), 0.01)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++2m"])
def test_pipeline_matches_diffusers_with_learned_token(tiny_diffusers, tiny_exported, tmp_path, scheduler):
    _parity(tiny_diffusers, tiny_exported, tmp_path, scheduler)


def test_v_prediction_pipeline_matches_diffusers(tiny_v_diffusers, tiny_v_exported, tmp_path):
    assert json.loads((tiny_v_exported / "manifest.json").read_text())["prediction_type"] == "v_prediction"
    _parity(tiny_v_diffusers, tiny_v_exported, tmp_path, "ddim")


def test_multi_vector_token_expands_once(tiny_exported, tmp_path):
    gen = Generator(tiny_exported, [_embeds(tmp_path / "e.safetensors", _dim(tiny_exported), k=3)], provider="cpu")
    full = f"{TOKEN} {TOKEN}_1 {TOKEN}_2"
    assert gen.prompt_text(f"a {TOKEN} dog") == f"a {full} dog"
    assert gen.prompt_text(f"a {full} dog") == f"a {full} dog"          # pre-expanded prompts stay as they are
    ids = gen.text.tokenizer([gen.prompt_text(f"a {TOKEN}")])[0]
    assert (ids >= gen.text.tokenizer.base_vocab_size).sum() == 3
    # a second file with another token: both usable in one prompt, each with its own rows
    vec = np.full((1, gen.text.dim), 0.25, np.float32)
    assert gen.add_embeds(save_learned_embeds(tmp_path / "s.safetensors", "<style>", vec)) == "<style>"
    ids = gen.text.tokenizer([gen.prompt_text(f"a {TOKEN} in <style>")])
    rows = gen.text.token_embeds(ids)[0]
    assert (ids >= gen.text.tokenizer.base_vocab_size).sum() == 4 and np.allclose(rows[6], vec[0])


def test_guidance_pair_is_one_unet_call_per_step(tiny_exported, tmp_path):
    gen = Generator(tiny_exported, [_embeds(tmp_path / "e.safetensors", _dim(tiny_exported))], provider="cpu")
    batches = []
    run = gen.unet.run
    gen.unet.run = lambda feeds: batches.append(len(feeds["sample"])) or run(feeds)
    gen.sample(PROMPT, GenerateConfig(n=3, steps=4, progress=False))
    assert batches == [6] * 4


def test_generate_writes_pngs_with_metadata_and_is_deterministic(tiny_exported, tmp_path):
    embeds = _embeds(tmp_path / "e.safetensors", _dim(tiny_exported))
    cfg = GenerateConfig(n=3, steps=4, scheduler="euler-a", seed=7, progress=False)
    a = generate(tiny_exported, [embeds], PROMPT, tmp_path / "a", cfg)
    b = generate(tiny_exported, [embeds], PROMPT, tmp_path / "b", cfg)
    assert a == tmp_path / "a"
    names = sorted(p.name for p in a.iterdir())
    assert names == ["000.png", "001.png", "002.png", "grid.png"]
    pix = [np.asarray(Image.open(a / f"{i:03d}.png")) for i in range(3)]
    for i in range(3):
        assert np.array_equal(pix[i], np.asarray(Image.open(b / f"{i:03d}.png")))   # same seed, same pixels
    assert not np.array_equal(pix[0], pix[1])
    meta = read_meta(a / "001.png")
    assert meta["prompt"] == PROMPT and json.loads(meta["seed"]) == 8 and json.loads(meta["steps"]) == 4
    assert meta["scheduler"] == "euler-a" and json.loads(meta["guidance"]) == 7.5 and meta["model"]
    grid = np.asarray(Image.open(a / "grid.png"))
    assert grid.shape[0] > pix[0].shape[0] and grid.shape[1] > 1.9 * pix[0].shape[1]
    # image i starts from seed + i: remaking image 1 alone gives the same picture
    alone = generate(tiny_exported, [embeds], PROMPT, tmp_path / "c", GenerateConfig(
        n=1, steps=4, scheduler="euler-a", seed=8, progress=False))
    assert np.abs(np.asarray(Image.open(alone / "000.png")).astype(int) - pix[1]).max() <= IMAGE_ATOL_U8


def _make_static(src, dst, batch):
    """Copy an export and pin every model input/output batch axis to `batch` (an NPU-style static model)."""
    shutil.copytree(src, dst)
    for sub in ("text_encoder", "unet", "vae_decoder"):
        path = dst / sub / "model.onnx"
        m = onnx.load(str(path))
        for v in list(m.graph.input) + list(m.graph.output):
            dims = v.type.tensor_type.shape.dim
            if len(dims) > 1:
                dims[0].dim_value = batch
        onnx.save(m, str(path))
    manifest = json.loads((dst / "manifest.json").read_text())
    res = manifest["native_resolution"]
    manifest["static_shapes"] = {"batch": batch, "height": res, "width": res}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_static_batch_model_runs_guidance_in_chunks(tiny_exported, tmp_path):
    static = _make_static(tiny_exported, tmp_path / "static", batch=1)
    cfg = GenerateConfig(n=2, steps=3, progress=False)
    gen = Generator(static, provider="cpu")
    batches = []
    run = gen.unet.run
    gen.unet.run = lambda feeds: batches.append(len(feeds["sample"])) or run(feeds)
    got = gen.sample("a photo of a dog", cfg)
    assert batches == [1] * 4 * 3
    want = Generator(tiny_exported, provider="cpu").sample("a photo of a dog", cfg)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= IMAGE_ATOL_U8
    with pytest.raises(ValueError, match="static-shape"):
        gen.sample("a dog", GenerateConfig(n=1, steps=1, height=64, width=64, progress=False))


@pytest.mark.slow
def test_quantized_static_model_generates_close_to_fp32(tiny_exported, tmp_path, photos):
    from export.quantize import QuantizeConfig, quantize_model
    q = quantize_model(tiny_exported, tmp_path / "w8", QuantizeConfig(
        scheme="w8", target="npu-static", gate=False, calib_samples=2, text_samples=2, gate_samples=1,
        zo_directions=8, calib_images=str(photos)))
    embeds = _embeds(tmp_path / "e.safetensors", _dim(tiny_exported))
    cfg = GenerateConfig(n=2, steps=4, progress=False)
    got = Generator(q, [embeds], provider="cpu").sample(PROMPT, cfg)
    want = Generator(tiny_exported, [embeds], provider="cpu").sample(PROMPT, cfg)
    # INT8 weights: a few levels off at most on average, far below the images' own spread.
    assert np.abs(got.astype(int) - want).mean() < 0.1 * want.std()


def test_bad_embeds_files_give_clear_errors(tiny_exported, tmp_path):
    from safetensors.numpy import save_file
    d = _dim(tiny_exported)
    cases = {
        "dim.safetensors": ({"<a>": np.zeros((1, d + 1), np.float32)}, "does not match this model"),
        "nan.safetensors": ({"<a>": np.full((1, d), np.nan, np.float32)}, "NaN"),
        "layout.safetensors": ({"x": np.zeros((1, d), np.float32), "y": np.zeros((1, d), np.float32)},
                               "unknown embedding layout"),
    }
    for name, (tensors, msg) in cases.items():
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(ValueError, match=msg):
            Generator(tiny_exported, [tmp_path / name], provider="cpu")
    (tmp_path / "old.pt").write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(ValueError, match="pickled files are never loaded.*safetensors"):
        Generator(tiny_exported, [tmp_path / "old.pt"], provider="cpu")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        Generator(tiny_exported, [tmp_path / "junk.safetensors"], provider="cpu")
    one = _embeds(tmp_path / "one.safetensors", d)
    with pytest.raises(ValueError, match="already loaded"):
        Generator(tiny_exported, [one, _embeds(tmp_path / "two.safetensors", d, seed=2)], provider="cpu")


def test_generation_runs_where_torch_cannot_be_imported(tiny_exported, tmp_path):
    embeds = _embeds(tmp_path / "e.safetensors", _dim(tiny_exported))
    code = f"""
from zo_runtime.generate import GenerateConfig, generate
generate({str(tiny_exported)!r}, [{str(embeds)!r}], {PROMPT!r}, {str(tmp_path / 'o')!r},
         GenerateConfig(n=1, steps=2, provider='cpu', progress=False))
"""
    r = run_without_torch(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "o" / "000.png").is_file()


def test_cli_generate_and_one_line_errors(tiny_exported, tmp_path):
    from zoodip.cli import main
    embeds = _embeds(tmp_path / "e.safetensors", _dim(tiny_exported))
    r = CliRunner().invoke(main, ["generate", str(tiny_exported), "--embeds", str(embeds), "--prompt", PROMPT,
                                  "--out", str(tmp_path / "o"), "-n", "2", "--steps", "2", "--provider", "cpu"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "001.png").is_file() and (tmp_path / "o" / "grid.png").is_file()
    (tmp_path / "bad.pt").write_bytes(b"x")
    r = CliRunner().invoke(main, ["generate", str(tiny_exported), "--embeds", str(tmp_path / "bad.pt"),
                                  "--prompt", PROMPT, "--out", str(tmp_path / "p"), "--provider", "cpu"])
    assert r.exit_code == 1 and "pickled files are never loaded" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["generate", str(tiny_exported), "--prompt", "x", "--out", str(tmp_path / "q"),
                                  "--scheduler", "pndm"])
    assert r.exit_code != 0 and "pndm" in r.output
