"""Random-weight diffusers folders with the exact SD 1.5 / SD 2.1 configs (benchmarks only), and tiny test models.

No weights can be downloaded here, so speed and memory work runs on replicas: the real architectures and
configs, seeded random weights, and the real CLIP BPE tokenizer. Their images are noise; never judge quality
with them.
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

# The real CLIP BPE (vocab.json + merges.txt) shipped with zoodip; SD 1.x and 2.x share it.
TOKENIZER_DIR = Path(os.environ.get("ZOODIP_CLIP_TOKENIZER", CLIP_BPE))
KINDS = ("sd15", "sd21", "tiny", "tiny-v")

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


def write_replica(kind: str, out: str | Path, seed: int = 0, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a diffusers StableDiffusionPipeline folder for `kind` (sd15|sd21|tiny|tiny-v) with seeded random weights."""
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
        _write_components(SPECS[kind], tmp, seed, tok_dir)
        umask_modes(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_components(spec: dict, root: Path, seed: int, tok_dir: Path) -> None:
    """Build, save and free one component at a time so peak memory is the largest one (the UNet)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                        pad_token=spec["pad_token"], model_max_length=77)
    tok.save_pretrained(root / "tokenizer")
    sched_cls, sched_cfg = spec["scheduler"]
    getattr(diffusers, sched_cls).from_config(sched_cfg).save_pretrained(root / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None], "scheduler": ["diffusers", sched_cls],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
