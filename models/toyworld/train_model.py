"""Train the toy-world SD pipeline from scratch (VAE, then text encoder + UNet) and save it in diffusers format.

python -m models.toyworld.train_model [--stage all|vae|cache|unet|export]

Resumable: every stage checkpoints into `runs/toyworld/` (git-ignored) and skips work already done.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.toyworld import world
from models.toyworld import model_parts as parts

REPO = Path(__file__).resolve().parents[2]
CLASSIFIER = Path(__file__).with_name("classifier.onnx")


@dataclass(frozen=True)
class TrainConfig:
    run_dir: Path = REPO / "runs" / "toyworld"  # git-ignored checkpoints and logs
    out_dir: Path = Path(__file__).with_name("pipeline")  # shipped fp16 diffusers folder
    seed: int = 0  # one seed drives data, init and noise
    vae_steps: int = 900  # trial: colors survived after ~2,300 batch-32 steps; lr 1e-3 converges sooner
    vae_batch: int = 32  # fresh images each step, rendered on the fly
    vae_crop: int = 32  # train on random 32 px crops: 4x cheaper, the conv VAE is translation-equivariant
    vae_min_steps: int = 400  # stop early after this once reconstructions pass the classifier at vae_target
    vae_target: float = 0.99  # per-attribute classifier accuracy on reconstructions
    vae_lr: float = 1e-3  # tiny VAE, no GAN: tolerates a high rate
    vae_kl: float = 1e-6  # SD's KL weight: near-deterministic latents, still KL-regularized
    vae_check_every: int = 200  # classifier check of reconstructions (loss says little about colors)
    cache_images: int = 20_000  # ~17 images per (training triple, background): jitter variety
    unet_steps: int = 6000  # upper bound; the time budget below usually ends the stage first
    unet_minutes: float = 45.0  # wall-clock budget of the stage (cumulative over resumes)
    unet_batch: int = 32  # more updates per CPU-second than the trial's 64, which matters early in training
    unet_lr: float = 1e-3  # AdamW for UNet + text encoder, small models tolerate it; clipped at norm 1
    warmup: int = 200  # linear LR warmup steps
    anneal_from: float = 0.8  # LR decays linearly to 10% over the last 20% of the time budget
    ema_decay: float = 0.995  # ~200-step average: a short run cannot afford a long EMA lag
    caption_dropout: float = 0.1  # empty caption 10% of the time -> classifier-free guidance works
    offset_noise: float = 0.1  # per-channel noise offset: the background is the latent mean, which the
    #                            SD schedule's non-zero terminal SNR leaks at t=999; offset forces text use
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting: ~3x faster convergence in its paper
    sample_every: int = 400  # quick DDIM+classifier check of the EMA model during training
    checkpoint_seconds: float = 180.0  # resumable every 3 minutes
    arch: parts.ArchConfig = field(default_factory=parts.ArchConfig)


def log(cfg: TrainConfig, msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(cfg.run_dir / "train.log", "a") as f:
        f.write(line + "\n")


def batch_images(rng: np.random.Generator, n: int, crop: int) -> torch.Tensor:
    """(n, 3, crop, crop) in [-1, 1]: random crops of fresh images of training triples only."""
    imgs, _ = world.make_dataset(n, int(rng.integers(2**31)), world.training_triples())
    ys, xs = rng.integers(0, world.SIZE - crop + 1, size=(2, n))
    imgs = np.stack([im[y:y + crop, x:x + crop] for im, y, x in zip(imgs, ys, xs)])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def check_vae(vae, n: int = 256) -> tuple[dict[str, float], dict[str, float]]:
    """Classifier accuracy on VAE reconstructions and on the originals of fresh images (loss cannot tell)."""
    from models.toyworld.attributes import AttributeClassifier, attribute_accuracy
    imgs, scenes = world.make_dataset(n, 999, world.training_triples())
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    wanted = [{"shape": s.shape, "color": s.color, "pattern": s.pattern, "background": s.background} for s in scenes]
    clf = AttributeClassifier()
    return attribute_accuracy(clf.predict(rec), wanted), attribute_accuracy(clf.predict(imgs), wanted)


def train_vae(cfg: TrainConfig) -> None:
    """Stage 1: AutoencoderKL on fresh procedural images; MSE + L1 + tiny KL."""
    final = cfg.run_dir / "vae"
    if (final / "config.json").is_file():
        log(cfg, f"vae: {final} exists, skipping")
        return
    vae = parts.make_vae(cfg.arch)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    ckpt = cfg.run_dir / "vae_ckpt.pt"
    step = parts.load_checkpoint(ckpt, {"vae": vae}, opt)
    rng = np.random.default_rng(cfg.seed + step)
    last_save, t0 = time.time(), time.time()
    while step < cfg.vae_steps:
        x = batch_images(rng, cfg.vae_batch, cfg.vae_crop)  # (B, 3, crop, crop)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            log(cfg, f"vae step {step} loss {loss.item():.4f} ({(time.time() - t0) / 100:.2f} s/step)")
            t0 = time.time()
        if (step % cfg.vae_check_every == 0 or step == cfg.vae_steps) and CLASSIFIER.is_file():
            acc, orig = check_vae(vae.eval())
            vae.train()
            log(cfg, f"vae step {step} classifier accuracy on reconstructions {acc}, on originals {orig}")
            # survives = reconstructions read as well as originals (within 1 point), or above the target
            if step >= cfg.vae_min_steps and all(acc[k] >= min(cfg.vae_target, orig[k] - 0.01) for k in acc):
                break
        if time.time() - last_save > cfg.checkpoint_seconds:
            parts.save_checkpoint(ckpt, step, {"vae": vae}, opt, {})
            last_save = time.time()
    vae.eval().save_pretrained(final)
    log(cfg, f"vae: saved {final}")


def build_cache(cfg: TrainConfig) -> None:
    """Stage 2: render training images once, store VAE posterior mean/std and labels; set scaling_factor."""
    from diffusers import AutoencoderKL
    path = cfg.run_dir / "latents.pt"
    if path.is_file():
        log(cfg, f"cache: {path} exists, skipping")
        return
    vae = AutoencoderKL.from_pretrained(cfg.run_dir / "vae").eval()
    imgs, scenes = world.make_dataset(cfg.cache_images, cfg.seed + 7, world.training_triples())
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(imgs), 500):
            x = torch.from_numpy(imgs[i:i + 500]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            d = vae.encode(x).latent_dist
            means.append(d.mean)
            stds.append(d.std)
    mean, std = torch.cat(means), torch.cat(stds)  # (N, 4, 16, 16) each
    scaling = float(1.0 / (mean + std * torch.randn_like(std)).std())  # unit-variance latents, like SD's 0.18215
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(cfg.run_dir / "vae")
    torch.save({"mean": mean.half(), "std": std.half(), "scenes": scenes}, path)
    log(cfg, f"cache: {len(scenes)} latents, scaling_factor {scaling:.4f}")


def train_unet(cfg: TrainConfig) -> None:
    """Stage 3: text encoder + UNet jointly, epsilon objective on the SD 1.x DDPM schedule."""
    from diffusers import AutoencoderKL, DDPMScheduler
    done = cfg.run_dir / "unet_done.pt"
    if done.is_file():
        log(cfg, "unet: done, skipping")
        return
    cache = torch.load(cfg.run_dir / "latents.pt", weights_only=False)
    sf = AutoencoderKL.load_config(cfg.run_dir / "vae")["scaling_factor"]
    tok = parts.load_tokenizer()
    text, unet = parts.make_text_encoder(cfg.arch), parts.make_unet(cfg.arch)
    ema = parts.Ema([text, unet], cfg.ema_decay)
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    ckpt = cfg.run_dir / "unet_ckpt.pt"
    step = parts.load_checkpoint(ckpt, {"text": text, "unet": unet, "ema": ema}, opt)
    spent = parts.load_extra(ckpt).get("seconds", 0.0)  # wall seconds of earlier runs of this stage
    sched = DDPMScheduler(**parts.SCHEDULE)
    acp = sched.alphas_cumprod  # (1000,)
    rng = np.random.default_rng(cfg.seed + 100 + step)
    torch.manual_seed(cfg.seed + step)
    last_save, t0, t_start = time.time(), time.time(), time.time()
    log(cfg, f"unet: text {parts.count(text) / 1e6:.2f}M, unet {parts.count(unet) / 1e6:.2f}M params, start {step}")
    while step < cfg.unet_steps and spent + time.time() - t_start < 60 * cfg.unet_minutes:
        idx = torch.from_numpy(rng.integers(len(cache["scenes"]), size=cfg.unet_batch))
        x0 = (cache["mean"][idx].float() + cache["std"][idx].float() * torch.randn(len(idx), 4, 16, 16)) * sf
        caps = [world.caption(cache["scenes"][i], rng) if rng.random() >= cfg.caption_dropout else ""
                for i in idx.tolist()]
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn_like(x0) + cfg.offset_noise * torch.randn(len(idx), 4, 1, 1)
        t = torch.randint(0, 1000, (len(idx),))
        pred = unet(sched.add_noise(x0, noise, t), t, text(ids)[0]).sample  # (B, 4, 16, 16)
        snr = acp[t] / (1 - acp[t])
        weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # (B,)
        loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        frac = (spent + time.time() - t_start) / (60 * cfg.unet_minutes)  # share of the time budget used
        anneal = min(1.0, max(0.1, (1 - frac) / (1 - cfg.anneal_from)))  # linear to 10% over the last part
        for g in opt.param_groups:
            g["lr"] = cfg.unet_lr * min(1.0, (step + 1) / cfg.warmup) * anneal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        step += 1
        if step % 50 == 0:
            log(cfg, f"unet step {step} loss {loss.item():.4f} ({(time.time() - t0) / 50:.2f} s/step)")
            t0 = time.time()
        if time.time() - last_save > cfg.checkpoint_seconds:
            parts.save_checkpoint(ckpt, step, {"text": text, "unet": unet, "ema": ema}, opt,
                                  {"seconds": spent + time.time() - t_start})
            last_save = time.time()
        if step % cfg.sample_every == 0 and CLASSIFIER.is_file():
            log(cfg, f"unet step {step} EMA sample check {quick_check(cfg, text, unet, ema)}")
    seconds = spent + time.time() - t_start
    parts.save_checkpoint(ckpt, step, {"text": text, "unet": unet, "ema": ema}, opt, {"seconds": seconds})
    torch.save({"steps": step, "seconds": seconds}, done)
    log(cfg, f"unet: finished at step {step} after {seconds / 60:.1f} min")


def quick_check(cfg: TrainConfig, text, unet, ema, prompts: int = 32) -> dict:
    """EMA weights -> pipeline -> DDIM 25 / guidance 5 on `prompts` training-triple prompts -> classifier."""
    from models.toyworld.evaluate_model import EvalConfig, score_split
    from models.toyworld.attributes import AttributeClassifier
    with ema.swapped():
        pipe = parts.assemble_pipeline(cfg.run_dir / "vae", text, unet)
        acc, _ = score_split(pipe, AttributeClassifier(), world.training_triples(),
                             EvalConfig(prompts=prompts, images_per_prompt=1, batch=prompts))
    text.train(), unet.train()
    return {k: round(v, 3) for k, v in acc.items()}


def export(cfg: TrainConfig) -> None:
    """Stage 4: EMA weights -> fp16 diffusers folder with tokenizer and SD 1.x scheduler config."""
    text, unet = parts.make_text_encoder(cfg.arch), parts.make_unet(cfg.arch)
    ema = parts.Ema([text, unet], cfg.ema_decay)
    parts.load_checkpoint(cfg.run_dir / "unet_ckpt.pt", {"text": text, "unet": unet, "ema": ema}, None)
    with ema.swapped():
        pipe = parts.assemble_pipeline(cfg.run_dir / "vae", text, unet, sampler="pndm")
        pipe.to(torch.float16).save_pretrained(cfg.out_dir, safe_serialization=True)
    log(cfg, f"export: wrote {cfg.out_dir}")


STAGES = {"vae": train_vae, "cache": build_cache, "unet": train_unet, "export": export}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["all", *STAGES], default="all")
    ap.add_argument("--unet-steps", type=int, default=TrainConfig.unet_steps)
    ap.add_argument("--unet-minutes", type=float, default=TrainConfig.unet_minutes)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = TrainConfig(unet_steps=args.unet_steps, unet_minutes=args.unet_minutes)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    for name, fn in STAGES.items():
        if args.stage in ("all", name):
            t0 = time.time()
            fn(cfg)
            log(cfg, f"stage {name} took {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
