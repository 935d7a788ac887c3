"""Random-weight diffusers folders with the exact SD 1.5 / SD 2.1 / SDXL base configs (benchmarks only), and tiny
test models.

No weights can be downloaded here, so speed and memory work runs on replicas: the real architectures and
configs, seeded random weights, and the real CLIP BPE tokenizer. Their images are noise; never judge quality
with them. SD 1.x/2.x components are built eagerly and saved with save_pretrained (peak: the 3.4 GB UNet, twice);
SDXL components are built on the meta device and written unit by unit (export/weights.py), so writing the
10.3 GB UNet peaks at one ~256 MB block.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
from pathlib import Path

from zo_runtime.assets import CLIP_BPE

from ._fs import umask_modes

# The real CLIP BPE (vocab.json + merges.txt) shipped with zoodip; SD 1.x, 2.x and SDXL share it.
TOKENIZER_DIR = Path(os.environ.get("ZOODIP_CLIP_TOKENIZER", CLIP_BPE))
KINDS = ("sd15", "sd21", "sdxl", "tiny", "tiny-v", "tiny-sdxl")

_SD_BLOCKS = dict(
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, in_channels=4, out_channels=4,
    act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32,
)
_SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4,
    layers_per_block=2, norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
)
# CLIP text configs keep the token ids the shipped configs carry (bos 0, eos 2, pad 1: pre-#24773 values).
_CLIP_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=49408, max_position_embeddings=77,
                 layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0, initializer_factor=1.0,
                 initializer_range=0.02)
_SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
              clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None)

SPECS = {
    # runwayml/stable-diffusion-v1-5: 860M UNet, CLIP ViT-L/14 text encoder, PNDM, epsilon, 512 px.
    "sd15": dict(
        unet=dict(_SD_BLOCKS, attention_head_dim=8, cross_attention_dim=768, sample_size=64),
        vae=dict(_SD_VAE, sample_size=512),
        text=dict(_CLIP_IDS, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                  num_hidden_layers=12, hidden_act="quick_gelu", projection_dim=768),
        scheduler=("PNDMScheduler", dict(_SCHED, prediction_type="epsilon")),
        pad_token="<|endoftext|>"),
    # stabilityai/stable-diffusion-2-1: OpenCLIP-H text (24 layers, last dropped -> 23), v-prediction, 768 px.
    "sd21": dict(
        unet=dict(_SD_BLOCKS, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
                  use_linear_projection=True, upcast_attention=True),
        vae=dict(_SD_VAE, sample_size=768),
        text=dict(_CLIP_IDS, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                  num_hidden_layers=23, hidden_act="gelu", projection_dim=512),
        scheduler=("DDIMScheduler", dict(_SCHED, prediction_type="v_prediction")),
        pad_token="!"),
    # Tiny SD 1.x for tests: 16x16 latents (32 px), d=32, real 49408-token vocabulary.
    "tiny": dict(
        unet=dict(block_out_channels=[32, 64], layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                  cross_attention_dim=32, attention_head_dim=[2, 4], norm_num_groups=32),
        vae=dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, in_channels=3, out_channels=3, latent_channels=4,
                 layers_per_block=1, norm_num_groups=32, sample_size=32, scaling_factor=0.18215),
        text=dict(_CLIP_IDS, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  hidden_act="quick_gelu", projection_dim=32),
        scheduler=("PNDMScheduler", dict(_SCHED, prediction_type="epsilon")),
        pad_token="<|endoftext|>"),
}
# Tiny SD 2.x style: linear projections, gelu (OpenCLIP) text encoder, v-prediction, pad "!".
SPECS["tiny-v"] = dict(
    SPECS["tiny"],
    unet=dict(SPECS["tiny"]["unet"], use_linear_projection=True),
    text=dict(SPECS["tiny"]["text"], hidden_act="gelu"),
    scheduler=("DDIMScheduler", dict(_SCHED, prediction_type="v_prediction")),
    pad_token="!")

# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0): 2.6B UNet with text_time added conditioning
# (pooled 1280 + 6 time ids x 256 = 2816), CLIP ViT-L (768, quick_gelu) + OpenCLIP bigG with projection (1280,
# 32 layers, gelu), both conditioning on their penultimate layer (768 + 1280 = 2048 cross-attention width).
_XL_UNET = dict(
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280], layers_per_block=2, in_channels=4, out_channels=4, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32, attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, addition_embed_type="text_time",
    addition_embed_type_num_heads=64, addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    sample_size=128)
# SDXL's EulerDiscreteScheduler config: leading spacing with steps_offset 1, linear sigma interpolation.
_XL_SCHED = ("EulerDiscreteScheduler", dict(_SCHED, prediction_type="epsilon", timestep_spacing="leading",
                                             interpolation_type="linear", use_karras_sigmas=False,
                                             sample_max_value=1.0))
SPECS["sdxl"] = dict(
    unet=_XL_UNET,
    vae=dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),   # overflows in fp16
    text=dict(_CLIP_IDS, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              hidden_act="quick_gelu", projection_dim=768),
    text_2=dict(_CLIP_IDS, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                hidden_act="gelu", projection_dim=1280),
    scheduler=_XL_SCHED,
    pad_token="<|endoftext|>", pad_token_2="!")
# Tiny SDXL for tests: same blocks and conditioning, 16x16 latents; the encoders differ in width (32, 48) and the
# pooled projection (40) differs from both, so a swapped dimension cannot pass unnoticed.
SPECS["tiny-sdxl"] = dict(
    unet=dict(_XL_UNET, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
              up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[32, 64], layers_per_block=1,
              attention_head_dim=[2, 4], cross_attention_dim=80, transformer_layers_per_block=[1, 2],
              addition_time_embed_dim=8, projection_class_embeddings_input_dim=40 + 6 * 8, sample_size=16),
    vae=dict(SPECS["tiny"]["vae"], scaling_factor=0.13025, force_upcast=True),
    text=dict(SPECS["tiny"]["text"], num_hidden_layers=3),
    text_2=dict(SPECS["tiny"]["text"], hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                hidden_act="gelu", projection_dim=40),
    scheduler=_XL_SCHED,
    pad_token="<|endoftext|>", pad_token_2="!")


def write_replica(kind: str, out: str | Path, seed: int = 0, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a diffusers pipeline folder for `kind` (one of KINDS) with seeded random weights; returns it."""
    if kind not in SPECS:
        raise ValueError(f"unknown replica {kind!r}: choose one of {', '.join(KINDS)}")
    out = Path(out).expanduser().resolve()  # resolved: 'a/missing/../b' must not be created half-way
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else TOKENIZER_DIR
    if not (tok_dir / "vocab.json").is_file() or not (tok_dir / "merges.txt").is_file():
        raise FileNotFoundError(f"{tok_dir} lacks vocab.json/merges.txt: set ZOODIP_CLIP_TOKENIZER to the CLIP BPE folder")
    if out.exists() and any(out.iterdir()):
        if (out / "model_index.json").is_file():
            print(f"{out} already holds a diffusers model; reusing it (delete it to rebuild)")
            return out
        raise FileExistsError(f"{out} exists and is not empty: pick a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        spec = SPECS[kind]
        (_write_xl_components if "text_2" in spec else _write_components)(spec, tmp, seed, tok_dir)
        umask_modes(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_components(spec: dict, root: Path, seed: int, tok_dir: Path) -> None:
    """Build, save and free one component at a time so peak memory is the largest one (the UNet)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    builders = {
        "unet": lambda: UNet2DConditionModel(**spec["unet"]),
        "vae": lambda: AutoencoderKL(**spec["vae"]),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**spec["text"])),
    }
    for i, (name, build) in enumerate(builders.items()):
        # fork_rng: seeding here must not reseed the caller's global generator.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + i)
            model = build().eval()
        model.save_pretrained(root / name, safe_serialization=True)
        del model
        gc.collect()
    _save_tokenizer(tok_dir, spec["pad_token"], root / "tokenizer")
    sched_cls = _save_scheduler(spec, root)
    _write_index(root, "StableDiffusionPipeline", sched_cls, {"text_encoder": ["transformers", "CLIPTextModel"],
                                                              "requires_safety_checker": False,
                                                              "safety_checker": [None, None]})


def _write_xl_components(spec: dict, root: Path, seed: int, tok_dir: Path) -> None:
    """SDXL: each component built on the meta device and streamed to disk unit by unit (export/weights.py)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from .weights import write_random

    parts = [("unet", lambda: UNet2DConditionModel(**spec["unet"])), ("vae", lambda: AutoencoderKL(**spec["vae"])),
             ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**spec["text"]))),
             ("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_2"])))]
    for i, (name, build) in enumerate(parts):
        with torch.device("meta"):
            model = build().eval()
        (root / name).mkdir()
        if name.startswith("text_encoder"):      # transformers: its own init (CLIP's normal stds), config.json
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(root / name)
            write_random(model, root / name / "model.safetensors", seed * 1000 + i, init=model._init_weights)
        else:                                    # diffusers models use torch's constructor init only
            model.save_config(root / name)
            write_random(model, root / name / "diffusion_pytorch_model.safetensors", seed * 1000 + i)
        del model
        gc.collect()
    _save_tokenizer(tok_dir, spec["pad_token"], root / "tokenizer")
    _save_tokenizer(tok_dir, spec["pad_token_2"], root / "tokenizer_2")
    sched_cls = _save_scheduler(spec, root)
    _write_index(root, "StableDiffusionXLPipeline", sched_cls, {
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "force_zeros_for_empty_prompt": True})   # SDXL base: an empty negative prompt is all-zero conditioning


def _save_tokenizer(tok_dir: Path, pad_token: str, dst: Path) -> None:
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token=pad_token,
                        model_max_length=77)
    tok.save_pretrained(dst)


def _save_scheduler(spec: dict, root: Path) -> str:
    import diffusers
    sched_cls, sched_cfg = spec["scheduler"]
    getattr(diffusers, sched_cls).from_config(sched_cfg).save_pretrained(root / "scheduler")
    return sched_cls


def _write_index(root: Path, pipeline: str, sched_cls: str, extra: dict) -> None:
    import diffusers
    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "scheduler": ["diffusers", sched_cls], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], **extra}
    (root / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
