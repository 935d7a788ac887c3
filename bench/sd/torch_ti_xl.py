"""Reference PyTorch Textual Inversion on SDXL (diffusers' textual_inversion_sdxl.py recipe), both encoders' rows trained.

fp32 UNet, VAE and both CLIP text encoders, everything frozen but the two token-embedding tables; the
placeholder is added to both tokenizers and initialized from the same word in each; AdamW over both tables;
backprop through the UNet and both encoders; every row but the placeholder's restored after each step. SDXL's
conditioning as the script builds it: hidden_states[-2] of each encoder concatenated, encoder 2's pooled
projection as text_embeds, time ids (original size, crop top-left, target size) from each photo's geometry.
Differences from the script, all in the reference's favour (less memory, less time):
- weights are streamed into meta-built models (export/sdxl.py: plain file reads, one copy; from_pretrained
  maps each file while copying it, which counts the UNet twice at load time);
- latents are VAE-encoded once, before the UNet is loaded, and cached (the script encodes every step);
- batch 1 (the script's default is 16), no accelerate wrapper; gradients of frozen rows are masked to zero.
Photos and time ids are zoodip's (zo_runtime.latents.load_image: short side resized, centre crop).

    python -m bench.sd.torch_ti_xl MODEL_DIFFUSERS --images DIR --resolution 512 --result OUT.json
    python -m bench.sd.torch_ti_xl MODEL_DIFFUSERS --images DIR --resolution 1024 --saved-only --result OUT.json
    python -m bench.sd.torch_ti_xl --sweep 256 512 768 1024 --base MODEL_DIFFUSERS --images DIR \\
        --data-limit-gb 16 --out bench/results/sdxl_torch_ti.json

--saved-only runs one forward pass without keeping its graph and adds up the bytes autograd would keep for the
backward pass (saved tensors, parameters left out): resident weights + saved bytes is a measured lower bound of
a TI step's peak at a resolution whose step does not fit here. --sweep runs each resolution in its own process
under RLIMIT_DATA (bench.common.run_guarded): a step that needs more fails to allocate, and is recorded as
needing more than the limit; then a --saved-only run gives the bound.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import common
from ..torch_ti import TorchTIConfig, add_placeholder, image_paths

RESOLUTIONS = (256, 512, 768, 1024)


@dataclass(frozen=True)
class TorchTIXLConfig(TorchTIConfig):
    """TorchTIConfig's settings (and checks) at SDXL's size."""

    resolution: int = 1024       # SDXL native
    steps: int = 2               # timed steps after warm-up (an SDXL step at 512 px is minutes on 2 cores)
    init: str = "dog"            # one token in both tokenizers (the same CLIP BPE)


@dataclass
class XLParts:
    tokenizers: tuple            # (tokenizer, tokenizer_2), the placeholder added to both
    encoders: tuple              # (CLIPTextModel, CLIPTextModelWithProjection)
    unet: object
    scheduler: object
    placeholder_ids: tuple       # its id in each tokenizer
    optimizer: object
    orig_tables: tuple           # copies of both tables, to restore the frozen rows
    latents: object              # (N, 4, h, w) scaled VAE latents, encoded once
    time_ids: object             # (N, 6) original (h, w), crop (top, left), target (h, w)


def _text_encoders(root: Path, cfg: TorchTIXLConfig):
    """Both tokenizers and encoders, the placeholder added and initialized, only its rows trainable."""
    import torch
    from transformers import CLIPTokenizer

    from export.sdxl import load_clip
    toks, encs, pids, tables = [], [], [], []
    for k, sub in enumerate(("text_encoder", "text_encoder_2")):
        tok = CLIPTokenizer.from_pretrained(root / ("tokenizer" if k == 0 else "tokenizer_2"))
        init, pid = add_placeholder(tok, cfg)
        enc = load_clip(root / sub, with_projection=k == 1)
        enc.resize_token_embeddings(len(tok))
        table = enc.get_input_embeddings().weight                        # (V+1, d_k)
        with torch.no_grad():
            table[pid] = table[init].sum(0)
        enc.requires_grad_(False)                                        # the script freezes the encoder,
        table.requires_grad_(True)                                       # its norm and positions: only tokens learn
        mask = torch.zeros(table.shape[0], 1)
        mask[pid] = 1.0
        table.register_hook(lambda g, m=mask: g * m)
        enc.train()
        toks.append(tok), encs.append(enc), pids.append(pid), tables.append(table)
    return toks, encs, pids, tables


def encode_photos(root: Path, images_dir: str | Path, cfg: TorchTIXLConfig):
    """(N, 4, h, w) scaled latents and (N, 6) time ids; the VAE is freed before the UNet is loaded."""
    import torch
    from diffusers import AutoencoderKL

    from zo_runtime.latents import load_image
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae").eval()
    geometry, latents = [], []
    with torch.no_grad():
        for path in image_paths(images_dir, cfg.max_images):
            x = torch.from_numpy(load_image(path, cfg.resolution, geometry))[None]
            latents.append(vae.encode(x).latent_dist.sample() * vae.config.scaling_factor)
    del vae
    time_ids = torch.tensor([g[0] for g in geometry], dtype=torch.float32)   # unflipped crops
    return torch.cat(latents), time_ids


def load(model_dir: str | Path, images_dir: str | Path, cfg: TorchTIXLConfig, rss=None) -> XLParts:
    import torch
    from diffusers import DDPMScheduler

    from export.sdxl import load_unet
    root = Path(model_dir)
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root} is not a diffusers SDXL folder (no {sub}/)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    latents, time_ids = encode_photos(root, images_dir, cfg)
    rss and rss.mark("encoded")
    toks, encs, pids, tables = _text_encoders(root, cfg)
    unet = load_unet(root / "unet").eval()
    unet.requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    opt = torch.optim.AdamW(tables, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
    return XLParts(tuple(toks), tuple(encs), unet, sched, tuple(pids), opt,
                   tuple(t.detach().clone() for t in tables), latents, time_ids)


def prompt_ids(parts: XLParts, cfg: TorchTIXLConfig) -> tuple:
    return tuple(tok(cfg.template.format(cfg.token), padding="max_length", truncation=True,
                     max_length=tok.model_max_length, return_tensors="pt").input_ids for tok in parts.tokenizers)


def xl_loss(parts: XLParts, ids: tuple, gen):
    """The script's loss for one random photo, timestep and noise (batch 1)."""
    import torch
    import torch.nn.functional as F

    i = int(torch.randint(0, parts.latents.shape[0], (1,), generator=gen))
    x0 = parts.latents[i:i + 1]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, parts.scheduler.config.num_train_timesteps, (1,), generator=gen)
    xt = parts.scheduler.add_noise(x0, noise, t)
    out1 = parts.encoders[0](ids[0], output_hidden_states=True)
    out2 = parts.encoders[1](ids[1], output_hidden_states=True)
    cond = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)        # (1, 77, 2048)
    added = {"text_embeds": out2.text_embeds, "time_ids": parts.time_ids[i:i + 1]}    # (1, 1280), (1, 6)
    pred = parts.unet(xt, t, cond, added_cond_kwargs=added).sample
    target = noise if parts.scheduler.config.prediction_type == "epsilon" else parts.scheduler.get_velocity(x0, noise, t)
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def xl_step(parts: XLParts, ids: tuple, gen) -> dict:
    """Forward, backward, AdamW, restore frozen rows of both tables; the loss and phase times."""
    import torch

    t0, c0 = time.perf_counter(), time.process_time()
    loss = xl_loss(parts, ids, gen)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for enc, orig, pid in zip(parts.encoders, parts.orig_tables, parts.placeholder_ids):
            keep = torch.ones(orig.shape[0], dtype=torch.bool)
            keep[pid] = False
            enc.get_input_embeddings().weight[keep] = orig[keep]
    t3 = time.perf_counter()
    return {"loss": float(loss.detach()), "forward_s": t1 - t0, "backward_s": t2 - t1, "update_s": t3 - t2,
            "step_s": t3 - t0, "cpu_s": time.process_time() - c0}


def saved_bytes(parts: XLParts, ids: tuple, gen) -> dict:
    """One forward pass that keeps nothing for backward, counting what autograd would keep (unique storages,
    parameters left out): the activation memory a TI step holds at its peak, on top of the weights."""
    import torch

    params = {p.untyped_storage().data_ptr() for m in (*parts.encoders, parts.unet) for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.device.type == "cpu":
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return None                                             # dropped: this forward is never differentiated

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        loss = xl_loss(parts, ids, gen)
    seconds = time.perf_counter() - t0
    del loss
    return {"saved_tensor_gb": common.gib(sum(seen.values())), "saved_storages": len(seen),
            "forward_seconds": round(seconds, 2)}


def run(model_dir: str | Path, images_dir: str | Path, cfg: TorchTIXLConfig, saved_only: bool = False) -> dict:
    import torch

    with common.RssSampler() as rss:
        rss.mark("start")
        parts = load(model_dir, images_dir, cfg, rss)
        gen = torch.Generator().manual_seed(cfg.seed)
        ids = prompt_ids(parts, cfg)
        rss.mark("loaded")
        if saved_only:
            saved = saved_bytes(parts, ids, gen)
            rss.mark("end")
        else:
            rows = [xl_step(parts, ids, gen) for _ in range(cfg.warmup)]
            rss.mark("warm")
            rows += [xl_step(parts, ids, gen) for _ in range(cfg.steps)]
            rss.mark("end")
    weights = sum(p.numel() * p.element_size() for m in (*parts.encoders, parts.unet) for p in m.parameters())
    out = {"method": "torch_ti_xl", "config": asdict(cfg), "model": str(model_dir), "images": str(images_dir),
           "num_images": int(parts.latents.shape[0]), "time_ids": parts.time_ids.tolist(),
           "weights_gb": common.gib(weights), "peak_rss_gb": common.gib(common.peak_rss_bytes()),
           "loaded_rss_gb": rss.marks["loaded"]["rss_gb"], "torch_threads": torch.get_num_threads(),
           "marks": rss.marks, "rss_timeline": rss.timeline()}
    if saved_only:
        out.update(mode="saved_only", **saved,
                   lower_bound_step_peak_gb=round(out["loaded_rss_gb"] + saved["saved_tensor_gb"], 3))
        return out
    timed = rows[cfg.warmup:]
    out.update(mode="step", peak_rss_training_gb=rss.peak_between("loaded", "end"),
               step_seconds=common.time_stats([r["step_s"] for r in timed])["median"],
               step_stats=common.time_stats([r["step_s"] for r in timed]),
               step_cpu_seconds=common.time_stats([r["cpu_s"] for r in timed])["median"],
               forward_seconds=common.time_stats([r["forward_s"] for r in timed])["median"],
               backward_seconds=common.time_stats([r["backward_s"] for r in timed])["median"],
               forward_passes_per_step=1, backward_passes_per_step=1,
               losses=[round(r["loss"], 6) for r in rows])
    return out


def sweep(base: Path, images: Path, resolutions: list[int], out: Path, data_limit_gb: float,
          min_available_gb: float, steps: int, warmup: int, log_dir: Path, saved_only_after_fail: bool = True,
          timeout_s: float = 4 * 3600) -> Path:
    """Each resolution in its own process under RLIMIT_DATA; a resolution whose step fails to allocate gets a
    --saved-only run for its lower bound. Results merge into `out` by resolution (reruns replace)."""
    import json
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update(base=str(base), images=str(images), machine=common.machine_facts(), data_limit_gb=data_limit_gb)
    result["note"] = common.load_note(result["machine"])
    runs = result.setdefault("resolutions", {})
    log_dir.mkdir(parents=True, exist_ok=True)
    for res in resolutions:
        print(f"[bench.sd.torch_ti_xl] {res} px (RLIMIT_DATA {data_limit_gb} GiB) ...", flush=True)
        entry = _one(base, images, res, ["--steps", str(steps), "--warmup", str(warmup)], data_limit_gb,
                     min_available_gb, log_dir / f"torch_ti_xl_{res}.log", timeout_s)
        if not entry.get("fits") and saved_only_after_fail and not entry.get("machine_low"):
            print(f"[bench.sd.torch_ti_xl]   {res} px did not fit; forward-only count of saved tensors ...", flush=True)
            entry["saved_only"] = _one(base, images, res, ["--saved-only"], data_limit_gb, min_available_gb,
                                       log_dir / f"torch_ti_xl_{res}_saved.log", timeout_s)
        runs[str(res)] = entry
        print(f"[bench.sd.torch_ti_xl]   {res} px: {_summary(entry)}", flush=True)
        common.write_json(out, result)
    fitting = [int(r) for r, e in runs.items() if e.get("fits")]
    result["largest_fitting_resolution"] = max(fitting) if fitting else None
    return common.write_json(out, result)


def _one(base, images, res, extra, data_limit_gb, min_available_gb, log, timeout_s) -> dict:
    import json
    import tempfile
    with tempfile.TemporaryDirectory(prefix="zoodip-ti-xl-") as tmp:
        path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench.sd.torch_ti_xl", str(base), "--images", str(images), "--resolution",
               str(res), *extra, "--result", str(path)]
        proc = common.run_guarded(cmd, log, min_available_gb=min_available_gb, data_limit_gb=data_limit_gb,
                                  timeout=timeout_s)
        data = json.loads(path.read_text()) if path.is_file() and proc["returncode"] == 0 else {}
    proc["rss_timeline"] = proc["rss_timeline"][:: max(1, len(proc["rss_timeline"]) // 200)]
    text = Path(log).read_text(errors="replace")[-4000:] if Path(log).is_file() else ""
    return classify(data, proc, text, data_limit_gb)


def classify(data: dict, proc: dict, log_tail: str, data_limit_gb: float | None) -> dict:
    """One run's entry: fits, or why not. An allocation failure under the data limit is "needs more than the
    limit"; a kill because the machine ran low is not a verdict on the method (machine_low)."""
    entry = {**data, "process": proc, "fits": proc["returncode"] == 0,
             "machine_low": bool(proc["killed"] and "MemAvailable" in proc["killed"])}
    if entry["fits"]:
        return entry
    lines = log_tail.strip().splitlines()
    oom = [line for line in lines if "can't allocate memory" in line or "MemoryError" in line
           or "out of memory" in line.lower()]
    if oom and not proc["killed"]:
        entry["needs_more_than_gb"] = data_limit_gb
        entry["error"] = oom[-1][:300]
    else:
        entry["error"] = (proc["killed"] or (lines[-1] if lines else "failed"))[:300]
    return entry


def _summary(e: dict) -> str:
    if e.get("fits"):
        return f"peak RSS {e.get('peak_rss_gb')} GiB, step {e.get('step_seconds')} s"
    s = e.get("saved_only", {})
    bound = f"; lower bound {s.get('lower_bound_step_peak_gb')} GiB" if s.get("fits") else ""
    return f"did not fit ({e.get('error') or e['process'].get('killed')}){bound}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="diffusers SDXL folder (`zoodip replica sdxl DIR`)")
    p.add_argument("--images", required=True)
    p.add_argument("--resolution", type=int, default=TorchTIXLConfig.resolution)
    p.add_argument("--steps", type=int, default=TorchTIXLConfig.steps)
    p.add_argument("--warmup", type=int, default=TorchTIXLConfig.warmup)
    p.add_argument("--threads", type=int, default=TorchTIXLConfig.threads)
    p.add_argument("--saved-only", action="store_true", help="one forward; count what backward would keep")
    p.add_argument("--result", help="JSON file to write (one run)")
    p.add_argument("--sweep", type=int, nargs="+", help="resolutions, each in its own capped process")
    p.add_argument("--base", type=Path, help="--sweep: the diffusers SDXL folder")
    p.add_argument("--out", type=Path, help="--sweep: JSON file to write (merged by resolution)")
    p.add_argument("--data-limit-gb", type=float, default=16.0, help="--sweep: RLIMIT_DATA of each run")
    p.add_argument("--min-available-gb", type=float, default=1.5,
                   help="--sweep: kill a run when the machine's MemAvailable falls below this")
    p.add_argument("--log-dir", type=Path, default=Path("runs/bench_logs"))
    a = p.parse_args(argv)
    if a.sweep:
        if not a.base or not a.out:
            p.error("--sweep needs --base and --out")
        print(f"wrote {sweep(a.base, Path(a.images), a.sweep, a.out, a.data_limit_gb, a.min_available_gb, a.steps, a.warmup, a.log_dir)}")
        return
    if not a.model or not a.result:
        p.error("MODEL and --result are required (or --sweep)")
    cfg = TorchTIXLConfig(resolution=a.resolution, steps=a.steps, warmup=a.warmup, threads=a.threads)
    out = run(a.model, a.images, cfg, saved_only=a.saved_only)
    out["machine"] = common.machine_facts()
    common.write_json(a.result, out)


if __name__ == "__main__":
    main()
