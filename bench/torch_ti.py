"""Reference PyTorch Textual Inversion step, as diffusers' examples/textual_inversion does it.

fp32 UNet, VAE and CLIP text encoder, all frozen except the token-embedding table; AdamW over that
table; true gradients by backprop through the UNet and the text encoder; after each step every row
but the placeholder's is restored. Differences from the script, all in the reference's favour:
latents are VAE-encoded once and cached (the script re-encodes every step), no accelerate wrapper,
and the gradient of non-placeholder rows is masked to zero (the script discards those updates by
restoring the rows; masking makes "only the placeholder learns" exact without changing memory).

    python -m bench.torch_ti MODEL_DIFFUSERS --images DIR --resolution 512 --steps 3 --result OUT.json
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import common

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class TorchTIConfig:
    resolution: int = 512        # SD 1.5 native; the memory goal is stated at 512 px
    steps: int = 3               # timed steps after warm-up; one costs ~9 s at 512 px on 2 cores
    warmup: int = 1              # the first step pays allocator growth and kernel selection
    lr: float = 5e-3             # the paper's TI/ZOODiP learning rate; it does not change cost
    weight_decay: float = 1e-2   # diffusers' AdamW default in the TI script (why rows are restored)
    token: str = "sks"           # placeholder, as in the paper
    init: str = "dog"            # initializer word: must be one token
    template: str = "a photo of a {}"   # the script's first object template
    max_images: int = 5          # DreamBooth subjects have 3-6 photos
    threads: int = 0             # 0: torch's default (all cores)
    seed: int = 0

    def __post_init__(self):
        if self.resolution % 8 or self.resolution <= 0:
            raise ValueError(f"resolution {self.resolution} must be a positive multiple of 8 (the VAE factor)")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError("steps must be >= 1 and warmup >= 0")
        if "{}" not in self.template:
            raise ValueError(f"template {self.template!r} needs a '{{}}' for the placeholder")


@dataclass
class TIParts:
    """The loaded pipeline pieces plus the training state of one TI run."""

    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    scheduler: object
    placeholder_id: int
    optimizer: object
    orig_embeds: object          # (V+1, d) copy the script keeps to restore frozen rows



def add_placeholder(tok, cfg: TorchTIConfig) -> tuple[list[int], int]:
    """Add cfg.token to a CLIP tokenizer: (the ids whose rows the start sums, the placeholder's id), checked.

    A plain init must be one token, as in the diffusers script; words joined by + (zoodip's --init-candidates
    start, e.g. "ring+solid") sum the rows of every piece of every word, as zo_runtime.objective.init_rows."""
    words = cfg.init.split("+")
    ids = [i for w in words for i in tok.encode(w, add_special_tokens=False)]
    if len(words) == 1 and len(ids) != 1:
        raise ValueError(f"the initializer {cfg.init!r} must be a single token (it is {len(ids)})")
    if not all(w.strip() for w in words):
        raise ValueError(f"the initializer {cfg.init!r} has an empty word")
    if tok.add_tokens([cfg.token]) != 1:
        raise ValueError(f"placeholder {cfg.token!r} is already in the vocabulary; pick another")
    return ids, tok.convert_tokens_to_ids(cfg.token)


def load(model_dir: str | Path, cfg: TorchTIConfig) -> TIParts:
    """Load a diffusers SD folder and set it up for TI exactly like the diffusers script."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(model_dir)
    if not (root / "unet").is_dir() or not (root / "text_encoder").is_dir():
        raise FileNotFoundError(f"{root} is not a diffusers SD folder (needs unet/, text_encoder/, vae/, tokenizer/)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
    sched = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    init_ids, pid = add_placeholder(tok, cfg)
    te.resize_token_embeddings(len(tok))
    table = te.get_input_embeddings().weight                  # (V+1, d)
    with torch.no_grad():
        table[pid] = table[init_ids].sum(0)
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    te.text_model.encoder.requires_grad_(False)
    te.text_model.final_layer_norm.requires_grad_(False)
    te.text_model.embeddings.position_embedding.requires_grad_(False)
    mask = torch.zeros(table.shape[0], 1)
    mask[pid] = 1.0
    table.register_hook(lambda g: g * mask)                   # only the placeholder row gets a gradient
    opt = torch.optim.AdamW(te.get_input_embeddings().parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                            weight_decay=cfg.weight_decay, eps=1e-8)
    te.train()
    return TIParts(tok, te, vae, unet, sched, pid, opt, table.detach().clone())


def image_paths(images_dir: str | Path, limit: int) -> list[Path]:
    folder = Path(images_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of training images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise ValueError(f"{folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def encode_images(parts: TIParts, images_dir: str | Path, cfg: TorchTIConfig):
    """Center-cropped, resized photos -> (N, C, h, w) scaled latents (encoded once, one image at a time)."""
    import torch
    from zo_runtime.image_io import load_rgb

    latents = []
    with torch.no_grad():
        for path in image_paths(images_dir, cfg.max_images):
            x = torch.from_numpy(load_rgb(path, cfg.resolution).astype(np.float32) / 127.5 - 1.0)
            x = x.permute(2, 0, 1)[None]                           # (1, 3, H, W) in [-1, 1]
            lat = parts.vae.encode(x).latent_dist.sample()        # (1, C, h, w)
            latents.append(lat * parts.vae.config.scaling_factor)
    return torch.cat(latents)


def prompt_ids(parts: TIParts, cfg: TorchTIConfig):
    """(1, 77) ids of the template with the placeholder."""
    tok = parts.tokenizer
    return tok(cfg.template.format(cfg.token), padding="max_length", truncation=True,
               max_length=tok.model_max_length, return_tensors="pt").input_ids


def ti_loss(parts: TIParts, latents, ids, gen):
    """The script's diffusion loss for one random image, timestep and noise (batch 1)."""
    import torch
    import torch.nn.functional as F

    i = int(torch.randint(0, latents.shape[0], (1,), generator=gen))
    x0 = latents[i:i + 1]                                         # (1, C, h, w)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, parts.scheduler.config.num_train_timesteps, (1,), generator=gen)
    xt = parts.scheduler.add_noise(x0, noise, t)
    cond = parts.text_encoder(ids)[0]                             # (1, 77, d), graph kept for backward
    pred = parts.unet(xt, t, cond).sample
    if parts.scheduler.config.prediction_type == "v_prediction":
        target = parts.scheduler.get_velocity(x0, noise, t)
    else:
        target = noise
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def ti_step(parts: TIParts, latents, ids, gen) -> dict:
    """Forward, backward, AdamW, restore frozen rows; returns the loss and the phase times."""
    import torch

    t0, c0 = time.perf_counter(), time.process_time()
    loss = ti_loss(parts, latents, ids, gen)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    keep = torch.ones(parts.orig_embeds.shape[0], dtype=torch.bool)
    keep[parts.placeholder_id] = False
    with torch.no_grad():
        table = parts.text_encoder.get_input_embeddings().weight
        table[keep] = parts.orig_embeds[keep]
    t3 = time.perf_counter()
    return {"loss": float(loss.detach()), "forward_s": t1 - t0, "backward_s": t2 - t1, "update_s": t3 - t2,
            "step_s": t3 - t0, "cpu_s": time.process_time() - c0}


def run(model_dir: str | Path, images_dir: str | Path, cfg: TorchTIConfig) -> dict:
    """Load, encode, warm up, time `cfg.steps` TI steps; peak RSS and times per phase."""
    import torch

    with common.RssSampler() as rss:
        rss.mark("start")
        parts = load(model_dir, cfg)
        gen = torch.Generator().manual_seed(cfg.seed)
        latents = encode_images(parts, images_dir, cfg)
        ids = prompt_ids(parts, cfg)
        rss.mark("loaded")
        rows = [ti_step(parts, latents, ids, gen) for _ in range(cfg.warmup)]
        rss.mark("warm")
        rows += [ti_step(parts, latents, ids, gen) for _ in range(cfg.steps)]
        rss.mark("end")
    timed = rows[cfg.warmup:]
    return {
        "method": "torch_ti", "config": asdict(cfg), "model": str(model_dir), "images": str(images_dir),
        "num_images": int(latents.shape[0]),
        "peak_rss_gb": common.gib(common.peak_rss_bytes()),
        "peak_rss_training_gb": rss.peak_between("loaded", "end"),
        "step_seconds": common.time_stats([r["step_s"] for r in timed])["median"],
        "step_stats": common.time_stats([r["step_s"] for r in timed]),
        "step_cpu_seconds": common.time_stats([r["cpu_s"] for r in timed])["median"],
        "forward_seconds": common.time_stats([r["forward_s"] for r in timed])["median"],
        "backward_seconds": common.time_stats([r["backward_s"] for r in timed])["median"],
        "forward_passes_per_step": 1, "backward_passes_per_step": 1,
        "losses": [round(r["loss"], 6) for r in rows],
        "torch_threads": torch.get_num_threads(),
        "marks": rss.marks, "rss_timeline": rss.timeline(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="diffusers SD folder (e.g. runs/sd15 from `zoodip replica sd15 runs/sd15`)")
    p.add_argument("--images", required=True, help="folder of training photos")
    p.add_argument("--resolution", type=int, default=TorchTIConfig.resolution)
    p.add_argument("--steps", type=int, default=TorchTIConfig.steps)
    p.add_argument("--warmup", type=int, default=TorchTIConfig.warmup)
    p.add_argument("--threads", type=int, default=TorchTIConfig.threads)
    p.add_argument("--result", required=True, help="JSON file to write")
    a = p.parse_args(argv)
    cfg = TorchTIConfig(resolution=a.resolution, steps=a.steps, warmup=a.warmup, threads=a.threads)
    out = run(a.model, a.images, cfg)
    out["machine"] = common.machine_facts()
    common.write_json(a.result, out)


if __name__ == "__main__":
    main()
