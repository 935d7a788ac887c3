"""SDXL on a tiny SDXL-shaped model: replica, export parity, streaming, quantize gates, embeds, generation parity
(training: test_sdxl_train.py).

The tiny model (export/replica.py "tiny-sdxl") has SDXL's blocks and conditioning with encoder widths 32 and 48
and a 40-wide pooled projection, so a swapped or mis-split dimension fails loudly. The full-size architecture is
checked by parameter counts on the meta device (no memory).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_without_torch
import torch

from zo_runtime.embeds import load_learned_embeds, save_learned_embeds
from zo_runtime.generate import GenerateConfig, Generator
from zo_runtime.model_dir import MANIFEST_KEYS, XL_MANIFEST_KEYS, ModelDir
from zo_runtime.session import OnnxModel
from zo_runtime.text import SdxlTextEncoder, pool_index

TOKEN = "<sks>"
PROMPT = f"a photo of {TOKEN} on the beach"
PROMPTS = ["a photo of a dog", "an oil painting of a red fox in the snow!"]   # "!" is encoder 2's pad token
LATENT_RTOL = 1e-5      # final latents vs diffusers, relative to their largest magnitude (the bar)
EXPORT_ATOL = 1e-4      # ONNX vs torch outputs (scaled by the output's magnitude where it exceeds 1)


@pytest.fixture(scope="module")
def xl_pipe(xl_diffusers):
    from diffusers import StableDiffusionXLPipeline
    torch.set_num_threads(1)    # shared 2-core machine: one torch thread is far faster than a contended pool
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_diffusers)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _vectors(model: ModelDir, k: int = 2, seed: int = 0) -> np.ndarray:
    """(k, d1 + d2) random learned vectors, [clip_l | clip_g]."""
    return np.random.default_rng(seed).standard_normal((k, sum(model.dims))).astype(np.float32)


def test_replica_architecture_matches_sdxl_base_sizes():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from export.replica import KINDS, SPECS
    assert {"sdxl", "tiny-sdxl"} <= set(KINDS)
    s = SPECS["sdxl"]
    with torch.device("meta"):   # shapes only
        models = (UNet2DConditionModel(**s["unet"]), AutoencoderKL(**s["vae"]),
                  CLIPTextModel(CLIPTextConfig(**s["text"])), CLIPTextModelWithProjection(CLIPTextConfig(**s["text_2"])))
    # stabilityai/stable-diffusion-xl-base-1.0: UNet, VAE, CLIP ViT-L, OpenCLIP bigG with projection
    assert tuple(sum(p.numel() for p in m.parameters()) for m in models) == (
        2_567_463_684, 83_653_863, 123_060_480, 694_659_840)
    assert (s["pad_token"], s["pad_token_2"], s["vae"]["scaling_factor"], s["vae"]["force_upcast"]) == (
        "<|endoftext|>", "!", 0.13025, True)


def test_replica_folder_loads_in_diffusers_and_is_seeded(xl_diffusers, xl_pipe, tmp_path):
    from safetensors.numpy import load_file
    from export.replica import write_replica
    assert type(xl_pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert xl_pipe.scheduler.config.timestep_spacing == "leading"
    assert (xl_pipe.tokenizer.pad_token, xl_pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert json.loads((xl_diffusers / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True
    # CLIP's own init, not torch defaults: projection std hidden^-0.5, zero biases, unit LayerNorms
    te2 = xl_pipe.text_encoder_2
    assert abs(float(te2.text_projection.weight.std()) - 48 ** -0.5) < 0.02
    assert float(te2.text_model.encoder.layers[0].self_attn.q_proj.bias.abs().max()) == 0
    assert float(te2.text_model.final_layer_norm.weight.min()) == 1
    f, k = "unet/diffusion_pytorch_model.safetensors", "conv_in.weight"
    again = write_replica("tiny-sdxl", tmp_path / "again", seed=0)
    other = write_replica("tiny-sdxl", tmp_path / "other", seed=1)
    w0, w0b, w1 = (load_file(p / f)[k] for p in (xl_diffusers, again, other))
    assert np.array_equal(w0, w0b) and not np.array_equal(w0, w1)


def test_streamed_writer_and_reader_round_trip_unit_by_unit(tmp_path):
    """Small units (as the full UNet uses) give a file diffusers reads, equal to what load_into reads."""
    from diffusers import UNet2DConditionModel
    from export.replica import SPECS
    from export.weights import load_into, write_random
    cfg = SPECS["tiny-sdxl"]["unet"]
    with torch.device("meta"):
        meta = UNet2DConditionModel(**cfg)
    (tmp_path / "unet").mkdir()
    meta.save_config(tmp_path / "unet")
    write_random(meta, tmp_path / "unet" / "diffusion_pytorch_model.safetensors", seed=3, limit=20_000)
    ref = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    with torch.device("meta"):
        ours = load_into(UNet2DConditionModel(**cfg), tmp_path / "unet")
    want, got = ref.state_dict(), ours.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[n], got[n]) for n in want)
    assert all(torch.isfinite(t).all() for t in want.values())
    # torch's constructor init: conv weights kaiming-uniform within 1/sqrt(fan_in), GroupNorm weights 1
    w = want["conv_in.weight"]
    assert float(w.abs().max()) <= (w[0].numel()) ** -0.5 and float(w.std()) > 0
    assert float(want["conv_norm_out.weight"].min()) == 1


def test_text_encoders_match_transformers_with_a_learned_token(xl_exported, xl_diffusers):
    """hidden_states[-2] of both encoders and the pooled projection, also where a learned token moves the pool."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    model = ModelDir.open(xl_exported)
    vec = _vectors(model, k=1)
    text = SdxlTextEncoder(model)
    text.add_tokens([TOKEN], vec)
    prompts = PROMPTS + [PROMPT]
    hidden, pooled = text(prompts)
    want = []
    for cls, sub, part in ((CLIPTextModel, "", vec[:, :32]), (CLIPTextModelWithProjection, "_2", vec[:, 32:])):
        enc = cls.from_pretrained(xl_diffusers / f"text_encoder{sub}").eval()
        tok = CLIPTokenizer.from_pretrained(xl_diffusers / f"tokenizer{sub}")
        tok.add_tokens([TOKEN])
        enc.resize_token_embeddings(len(tok), mean_resizing=False)
        enc.get_input_embeddings().weight.data[tok.convert_tokens_to_ids(TOKEN)] = torch.from_numpy(part[0])
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            want.append(enc(ids, output_hidden_states=True))
    assert hidden.shape == (3, 77, 80) and pooled.shape == (3, 40)
    assert _err(hidden[..., :32], want[0].hidden_states[-2]) < EXPORT_ATOL
    assert _err(hidden[..., 32:], want[1].hidden_states[-2]) < EXPORT_ATOL
    assert _err(pooled, want[1].text_embeds) < EXPORT_ATOL
    ids2 = text.tokenize(prompts)[1]
    at = pool_index(ids2, "argmax", 2)
    assert ids2[2, at[2]] >= 49408 and ids2[0, at[0]] == 49407   # the learned token, else the EOS


def test_unet_matches_diffusers_with_added_conditioning(xl_exported, xl_pipe):
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 16, 12)).astype(np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 80)).astype(np.float32),
             "text_embeds": rng.standard_normal((2, 40)).astype(np.float32),
             "time_ids": np.array([[32, 32, 0, 0, 32, 32], [64, 48, 4, 2, 32, 24]], np.float32)}
    unet = OnnxModel(ModelDir.open(xl_exported).onnx("unet"))
    for t in (999.0, 1.0, 500.5):
        got = unet.run({**feeds, "timestep": np.array(t)})[0]
        t_ = {k: torch.from_numpy(v) for k, v in feeds.items()}
        with torch.no_grad():
            want = xl_pipe.unet(t_["sample"], t, t_["encoder_hidden_states"], added_cond_kwargs={
                "text_embeds": t_["text_embeds"], "time_ids": t_["time_ids"]}).sample.numpy()
        assert _err(got, want) < EXPORT_ATOL * max(1.0, float(np.abs(want).max()))
    # the time ids matter: another original size gives another prediction
    other = unet.run({**feeds, "timestep": np.array(500.0), "time_ids": feeds["time_ids"] * 2})[0]
    assert _err(other, unet.run({**feeds, "timestep": np.array(500.0)})[0]) > 1e-3


def test_manifest_and_layout(xl_exported, tmp_path):
    from export.manifest import verify_files
    model = ModelDir.open(xl_exported)
    m = model.manifest
    assert set(MANIFEST_KEYS + XL_MANIFEST_KEYS) <= set(m) and verify_files(model.root, m) == []
    assert (m["family"], m["embedding_dim"], m["embedding_dim_2"], m["pooled_dim"], m["cross_attention_dim"]) == (
        "sdxl", 32, 48, 40, 80)
    assert (m["pad_token"], m["pad_token_2"], m["pool_rule"], m["scaling_factor"]) == ("<|endoftext|>", "!", "argmax",
                                                                                       0.13025)
    assert m["force_upcast"] and m["force_zeros_for_empty_prompt"] and m["addition_time_embed_dim"] == 8
    assert m["time_ids"] == ["original_height", "original_width", "crop_top", "crop_left", "target_height",
                             "target_width"]
    assert model.submodels == ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
    assert model.dims == (32, 48) and model.token_table("text_encoder_2").shape == (49408, 48)
    assert (model.root / "tokenizer_2" / "vocab.json").is_file()
    ins = {i.name: i.shape for i in OnnxModel(model.onnx("text_encoder_2")).session.get_inputs()}
    assert ins == {"inputs_embeds": ["batch_size", 77, 48], "pool_index": ["batch_size"]}
    for sub in model.submodels:   # no control flow: static quantizers and NPU compilers refuse subgraphs
        assert not [n for n in onnx.load(str(model.onnx(sub))).graph.node if n.op_type in ("If", "Loop")], sub
    import shutil
    copy = shutil.copytree(xl_exported, tmp_path / "copy")
    (copy / "text_encoder_2" / "model.onnx").unlink()
    with pytest.raises(ValueError, match="text_encoder_2"):
        ModelDir.open(copy)


def test_consolidate_streams_per_tensor_files_into_one(xl_exported, tmp_path):
    """The >2 GB path: per-tensor external files (as torch writes them) end in one model.onnx_data."""
    from export.large_onnx import DATA_NAME, consolidate_external_data
    src = ModelDir.open(xl_exported).onnx("unet")
    model = onnx.load(str(src))
    path = tmp_path / "unet" / "model.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=256)
    assert len(list(path.parent.iterdir())) > 20
    assert consolidate_external_data(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", DATA_NAME]
    rng = np.random.default_rng(1)
    feeds = {"sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32), "timestep": np.array(700.0),
             "encoder_hidden_states": rng.standard_normal((1, 77, 80)).astype(np.float32),
             "text_embeds": rng.standard_normal((1, 40)).astype(np.float32),
             "time_ids": np.array([[32, 32, 0, 0, 32, 32]], np.float32)}
    assert np.array_equal(OnnxModel(path).run(feeds)[0], OnnxModel(src).run(feeds)[0])
    assert not consolidate_external_data(src)    # inline weights: nothing to do


@pytest.mark.parametrize("scheme", ["w8", "w4"])
def test_weight_only_streams_external_weights_to_the_same_model(xl_exported, tmp_path, scheme):
    """UNet with its weights in model.onnx_data (the >2 GB layout): quantized from the graph alone, one weight
    read at a time, it is the model the whole-model path writes, node for node and tensor for tensor."""
    from onnx import numpy_helper
    from export import weight_only as wo
    from export.quantize import W8_BLOCK
    src = ModelDir.open(xl_exported).onnx("unet")
    path = tmp_path / "unet" / "model.onnx"
    path.parent.mkdir()
    onnx.save(onnx.load(str(src)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx_data", size_threshold=256)
    bits, block = (8, W8_BLOCK) if scheme == "w8" else (4, 32)

    def quantize(model, base=None):
        model = wo.nbits_matmul(model, bits, block, 1, base_dir=base)
        wo.int8_weight_only(model, ("Conv", "Gemm"), base_dir=base)
        if base is not None:
            wo.load_remaining(model, base)
        return model

    whole = quantize(onnx.load(str(path)))
    lazy = onnx.load(str(path), load_external_data=False)
    assert sum(n.op_type == "MatMul" for n in lazy.graph.node) > 10 and wo._streamable(lazy)
    streamed = quantize(lazy, path.parent)
    assert list(whole.graph.node) == list(streamed.graph.node)          # names, inputs, attributes (bits, K, N)
    assert {(o.domain, o.version) for o in whole.opset_import} == {(o.domain, o.version) for o in streamed.opset_import}
    arrays = lambda m: {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    a, b = arrays(whole), arrays(streamed)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in streamed.graph.initializer)
    with pytest.raises(ValueError, match="base_dir"):
        wo.int8_weight_only(onnx.load(str(path), load_external_data=False), ("Conv",))


def test_source_checks_name_the_problem(xl_diffusers, tmp_path):
    import shutil
    from export.source import check_architecture
    assert check_architecture(xl_diffusers)["family"] == "sdxl"
    refiner = shutil.copytree(xl_diffusers, tmp_path / "refiner")
    index = json.loads((refiner / "model_index.json").read_text())
    (refiner / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLImg2ImgPipeline",
                                                          "text_encoder": [None, None]}))
    with pytest.raises(ValueError, match="refiner"):
        check_architecture(refiner)
    (refiner / "model_index.json").write_text(json.dumps(index))
    unet = json.loads((refiner / "unet" / "config.json").read_text())
    (refiner / "unet" / "config.json").write_text(json.dumps({**unet, "projection_class_embeddings_input_dim": 80}))
    with pytest.raises(ValueError, match="time ids"):
        check_architecture(refiner)


def test_quantize_w8_passes_gates_for_both_encoders(xl_exported, photos, tmp_path):
    from export import gates as gt
    from export.quantize import QuantizeConfig, quantize_model
    cfg = QuantizeConfig(scheme="w8", calib_images=str(photos), calib_samples=4, text_samples=4, gate_samples=2,
                         zo_directions=8)
    q = ModelDir.open(quantize_model(xl_exported, tmp_path / "w8", cfg))
    g = q.manifest["gates"]
    assert g["passed"] and set(q.submodels) <= set(g)
    for sub in ("text_encoder", "text_encoder_2", "unet"):
        assert g[sub]["cosine"] > 0.999 and g[sub]["psnr_db"] > 40, sub
        bits = {a.i for n in onnx.load(str(q.onnx(sub))).graph.node if n.op_type == "MatMulNBits"
                for a in n.attribute if a.name == "bits"}
        assert bits == {8}, sub
    assert g["unet"]["cond_cosine"] > 0.99 and min(z["corr"] for z in g["zo"].values()) > 0.95
    assert (q.root / "tokenizer_2" / "vocab.json").is_file() and q.dims == (32, 48)
    want = SdxlTextEncoder(ModelDir.open(xl_exported))(PROMPTS)
    got = SdxlTextEncoder(q)(PROMPTS)
    assert all(gt.cosine(a, b) > 0.999 for a, b in zip(got, want))


def test_static_shapes_cover_the_added_inputs(xl_exported):
    from export.qdq import static_input_shapes
    model = ModelDir.open(xl_exported)
    shapes = {"batch": 2, "height": 32, "width": 32}
    assert static_input_shapes("text_encoder_2", model, shapes) == {
        "inputs_embeds": [2, 77, 48], "pool_index": [2], "last_hidden_state": [2, 77, 48], "text_embeds": [2, 40]}
    unet = static_input_shapes("unet", model, shapes)
    assert unet["encoder_hidden_states"] == [2, 77, 80] and unet["time_ids"] == [2, 6] and unet["text_embeds"] == [2, 40]


def test_embeds_clip_l_clip_g_round_trip_and_errors(tmp_path):
    from safetensors.numpy import load_file, save_file
    vec = np.arange(2 * 80, dtype=np.float32).reshape(2, 80) / 100
    path = save_learned_embeds(tmp_path / "xl.safetensors", TOKEN, vec, split=(32, 48))
    raw = load_file(str(path))
    assert set(raw) == {"clip_l", "clip_g"} and raw["clip_l"].shape == (2, 32) and raw["clip_g"].shape == (2, 48)
    name, got = load_learned_embeds(path, dim=80, split=(32, 48))
    assert name == TOKEN and np.array_equal(got, vec)
    # A1111's files carry no token name: the file name is the token
    save_file(raw, str(tmp_path / "my-dog.safetensors"))
    assert load_learned_embeds(tmp_path / "my-dog.safetensors", split=(32, 48))[0] == "my-dog"
    with pytest.raises(ValueError, match="SDXL embedding"):
        load_learned_embeds(path, dim=32)                                  # an SD 1.x/2.x model
    sd = save_learned_embeds(tmp_path / "sd.safetensors", TOKEN, vec[:, :32])
    with pytest.raises(ValueError, match="clip_l"):
        load_learned_embeds(sd, split=(32, 48))                           # an SD file for SDXL
    with pytest.raises(ValueError, match="clip_l size 32 does not match this model.s 48"):
        load_learned_embeds(path, split=(48, 32))                          # widths swapped
    save_file({"clip_l": raw["clip_l"], "clip_g": raw["clip_g"][:1]}, str(tmp_path / "uneven.safetensors"))
    with pytest.raises(ValueError, match="must match"):
        load_learned_embeds(tmp_path / "uneven.safetensors", split=(32, 48))


def test_diffusers_loads_the_learned_file_into_both_encoders(xl_exported, xl_diffusers, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file
    vec = _vectors(ModelDir.open(xl_exported), k=2)
    path = save_learned_embeds(tmp_path / "learned.safetensors", TOKEN, vec, split=(32, 48))
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_diffusers)
    state = load_file(path)
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for enc, tok, part in ((pipe.text_encoder, pipe.tokenizer, vec[:, :32]), (pipe.text_encoder_2, pipe.tokenizer_2,
                                                                               vec[:, 32:])):
        ids = tok.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
        assert ids == [49408, 49409]
        assert np.array_equal(enc.get_input_embeddings().weight[ids].detach().numpy(), part)


def _reference_latents(pipe, embeds: Path, scheduler: str, latents: np.ndarray, **kwargs) -> np.ndarray:
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
    from safetensors.torch import load_file
    if TOKEN not in pipe.tokenizer.get_vocab():
        state = load_file(embeds)
        pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    cls = {"euler": EulerDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler}[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=5, guidance_scale=7.5, latents=torch.from_numpy(latents),
                    num_images_per_prompt=len(latents), height=32, width=32, output_type="latent",
                    **kwargs).images.numpy()


@pytest.mark.parametrize("scheduler", ["euler", "dpm++2m"])
def test_generation_matches_stable_diffusion_xl_pipeline(xl_exported, xl_pipe, tmp_path, scheduler):
    """Learned token in both encoders, CFG with SDXL's all-zero empty negative, default micro-conditioning."""
    model = ModelDir.open(xl_exported)
    embeds = save_learned_embeds(tmp_path / "learned.safetensors", TOKEN, _vectors(model), split=(32, 48))
    gen = Generator(model, [embeds], provider="cpu")
    lat = np.random.default_rng(1).standard_normal((2, 4, 16, 16)).astype(np.float32)
    cfg = GenerateConfig(n=2, steps=5, scheduler=scheduler, progress=False)
    ref = _reference_latents(xl_pipe, embeds, scheduler, lat)
    cond = gen.conditioning([PROMPT] * 2)
    ours = gen.denoise(lat, cond, {k: np.zeros_like(v) for k, v in cond.items()}, cfg, [])
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < LATENT_RTOL, f"final latents differ from diffusers by {err:.2e} (relative)"
    if scheduler == "euler":   # micro-conditioning follows diffusers too, and changes the result
        sizes = dict(original_size=(64, 48), crops_coords_top_left=(4, 2), target_size=(32, 24))
        ref2 = _reference_latents(xl_pipe, embeds, scheduler, lat, **sizes)
        cfg2 = GenerateConfig(n=2, steps=5, scheduler=scheduler, progress=False, original_size=(64, 48),
                              crop_top_left=(4, 2), target_size=(32, 24))
        ours2 = gen.denoise(lat, cond, {k: np.zeros_like(v) for k, v in cond.items()}, cfg2, [])
        assert np.abs(ours2 - ref2).max() / np.abs(ref2).max() < LATENT_RTOL
        assert np.abs(ours2 - ours).max() > 1e-3


def test_sample_decodes_and_learned_vectors_matter(xl_exported, tmp_path):
    model = ModelDir.open(xl_exported)
    embeds = save_learned_embeds(tmp_path / "e.safetensors", TOKEN, _vectors(model), split=(32, 48))
    gen = Generator(model, [embeds], provider="cpu")
    cfg = GenerateConfig(n=2, steps=3, scheduler="euler", progress=False)
    first = gen.sample(PROMPT, cfg)
    assert first.shape == (2, 32, 32, 3) and first.dtype == np.uint8
    gen.set_token(TOKEN, _vectors(model, seed=5) * 3)       # both encoders' rows replaced
    assert np.abs(gen.sample(PROMPT, cfg).astype(int) - first).mean() > 1
    neg = gen.sample(PROMPT, GenerateConfig(n=2, steps=3, scheduler="euler", negative="blurry", progress=False))
    assert np.abs(neg.astype(int) - first).mean() > 0      # an encoded negative prompt, not zeros
    with pytest.raises(ValueError, match="clip_l"):
        gen.add_embeds(save_learned_embeds(tmp_path / "sd.safetensors", "<x>", np.zeros((1, 32), np.float32)))


def test_micro_conditioning_is_refused_for_sd_models(tiny_exported):
    with pytest.raises(ValueError, match="SDXL micro-conditioning"):
        Generator(tiny_exported, provider="cpu").sample("a dog", GenerateConfig(
            n=1, steps=1, original_size=(64, 64), progress=False))


def test_sdxl_generation_runs_where_torch_cannot_be_imported(xl_exported, tmp_path):
    model = ModelDir.open(xl_exported)
    embeds = save_learned_embeds(tmp_path / "e.safetensors", TOKEN, _vectors(model), split=(32, 48))
    code = f"""
from zo_runtime.generate import GenerateConfig, generate
generate({str(xl_exported)!r}, [{str(embeds)!r}], {PROMPT!r}, {str(tmp_path / 'o')!r},
         GenerateConfig(n=1, steps=2, scheduler='euler', provider='cpu', progress=False))
"""
    r = run_without_torch(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "o" / "000.png").is_file()
