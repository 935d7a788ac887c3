"""Backprop Textual Inversion on the fp32 toy model: the quality reference of bench.toy.quality.

The diffusers script's recipe (bench.torch_ti.load: frozen fp32 UNet/VAE/text encoder, AdamW, only the
placeholder row learns), trained for real: a random object template per sample like the script, batch 1
by default (ToyTIConfig.batch), t ~ Uniform{0..999} (no PUTS: that is ZOODiP's), true gradients. One change of implementation, not of
math: AdamW runs on a (1, d) copy of the placeholder row spliced into the embedding output, instead of
on the whole (49409, d) table with the other rows restored after each step. AdamW is elementwise, so
the row follows the same trajectory; the script's way spends 0.3-0.9 s a step on the toy model
updating 6.3M frozen values, more than the model itself.
Torch lives only here, in bench/; the token is then scored by the same torch-free generator.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from zo_runtime.prompts import OBJECT_TEMPLATES

from .. import torch_ti


@dataclass(frozen=True)
class ToyTIConfig:
    steps: int = 2000                 # matched to the zoodip runs it is compared with
    lr: float = 5e-3                  # the paper's TI learning rate (diffusers' 5e-4 x batch 4 x 2.5 ~ same scale)
    t_range: tuple[int, int] = (0, 1000)   # the TI script samples every timestep
    resolution: int = 64              # the toy world's native size
    batch: int = 1                    # samples per step (image, flip, template, t, noise each); the script's is 4
    seed: int = 0
    # One thread: the toy model's ops are too small to split, and OpenMP threads that wait on each other
    # on a shared 2-core machine slowed a step from 0.08 s to several seconds.
    threads: int = 1


def token_ids(parts, prompt: str):
    tok = parts.tokenizer
    return tok(prompt, padding="max_length", truncation=True, max_length=tok.model_max_length,
               return_tensors="pt").input_ids


def _loss(parts, latents, ids, t_range, gen):
    """The script's epsilon/v MSE for one image, flip, timestep and noise."""
    import torch
    import torch.nn.functional as F

    i = int(torch.randint(0, latents.shape[0], (1,), generator=gen))
    x0 = latents[i:i + 1]
    if torch.rand(1, generator=gen) < 0.5:                 # random flip, as zoodip's data draws do
        x0 = torch.flip(x0, dims=[3])
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(t_range[0], t_range[1], (1,), generator=gen)
    xt = parts.scheduler.add_noise(x0, noise, t)
    pred = parts.unet(xt, t, parts.text_encoder(ids)[0]).sample
    target = parts.scheduler.get_velocity(x0, noise, t) \
        if parts.scheduler.config.prediction_type == "v_prediction" else noise
    return F.mse_loss(pred.float(), target.float())


def row_optimizer(parts, tcfg):
    """A trainable (1, d) placeholder row spliced into the (frozen) embedding output; AdamW on it alone."""
    import torch

    emb = parts.text_encoder.get_input_embeddings()
    emb.weight.requires_grad_(False)
    vec = torch.nn.Parameter(emb.weight[parts.placeholder_id].detach().clone()[None])     # (1, d)
    pid = parts.placeholder_id

    def splice(module, inputs, out):                # out: (B, 77, d); rows of the placeholder -> vec
        mask = (inputs[0] == pid)[..., None]
        return torch.where(mask, vec.expand_as(out), out)

    emb.register_forward_hook(splice)
    opt = torch.optim.AdamW([vec], lr=tcfg.lr, betas=(0.9, 0.999), weight_decay=tcfg.weight_decay, eps=1e-8)
    return vec, opt


def train_ti(pipeline_dir: str | Path, images_dir: str | Path, init: str, cfg: ToyTIConfig,
             eval_at: list[int], on_eval: Callable[[int, np.ndarray], None]) -> dict:
    """Train; call on_eval(step, (1, d) vector) at each step in eval_at; returns timing and losses."""
    import torch

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    tcfg = replace(torch_ti.TorchTIConfig(), resolution=cfg.resolution, lr=cfg.lr, init=init, seed=cfg.seed,
                   steps=1, warmup=0)
    parts = torch_ti.load(pipeline_dir, tcfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    latents = torch_ti.encode_images(parts, images_dir, tcfg)               # (N, C, h, w), encoded once
    vec, opt = row_optimizer(parts, tcfg)
    rng = random.Random(cfg.seed)
    losses, train_s = [], 0.0
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        loss = sum(_loss(parts, latents, token_ids(parts, rng.choice(OBJECT_TEMPLATES).format(tcfg.token)),
                         cfg.t_range, gen) for _ in range(cfg.batch)) / cfg.batch
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if step in eval_at:
            on_eval(step, vec.detach().numpy().astype(np.float32).copy())
    return {"train_seconds": train_s, "loss_first100": float(np.mean(losses[:100])),
            "loss_last100": float(np.mean(losses[-100:]))}
