"""ZOODiP textual inversion on onnxruntime: forward passes only, NumPy optimizer, resumable.

One step (method.md): draw image, prompt, t in the PUTS range and noise (common to all passes);
build n+1 embedding batches with v and v + mu z_i in the placeholder rows; text encoder as one
batch; UNet as one batch (or one by one); losses -> RGE -> subspace projection -> ZO-Adam.
"""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import latents as lat, priors, prompts, zo
from .train_config import TrainConfig, trajectory
from .embeds import save_learned_embeds, vector_names
from .io_utils import atomic_savez, atomic_write_json, atomic_write_text
from .model_dir import ModelDir
from .session import OnnxModel
from .text import TextEncoder

CHECKPOINT = "checkpoint.npz"
# Settings of older zoodip versions that no longer exist, at the value that behaves as this version does.
RETIRED = {"estimator": "rge", "lr_schedule": "constant", "average": 0.0, "normalize": "coordinate",
           "prior_power": 1.0, "prior_words": None, "guide_share": 0.5, "betas": [0.9, 0.999]}


def _place_tokens(text: TextEncoder, cfg: TrainConfig) -> tuple[list[str], np.ndarray]:
    """Add sks, sks_1, ... to the tokenizer; v0 = the init token's row, (k, d) float32."""
    pieces = text.tokenizer.tokenize(cfg.init)
    if len(pieces) != 1:
        raise ValueError(f"--init {cfg.init!r} is {len(pieces)} tokens {pieces}; the initializer must be a single "
                         "token: pick one word such as 'dog', 'toy' or 'cat'")
    init_id = text.tokenizer.token_id(pieces[0])
    tokens = vector_names(cfg.token, cfg.num_vectors)
    v0 = np.repeat(np.asarray(text.table[init_id], np.float32)[None], cfg.num_vectors, axis=0)
    text.add_tokens(tokens, v0)    # ValueError if the placeholder already exists
    return tokens, v0


class _Prompts:
    """Prompt draws, tokenized once per distinct prompt: (77,) ids, (77, d) base rows, rows where v goes."""

    def __init__(self, text: TextEncoder, tokens: list[str], names: list[str], cfg: TrainConfig):
        self.text, self.names, self.cache = text, names, {}
        self.ids = [text.tokenizer.token_id(t) for t in tokens]
        self.placeholder = " ".join(tokens)   # multi-vector prompts spell every vector, like diffusers
        self.templates = prompts.templates(cfg.templates)
        self.captions = prompts.load_captions(cfg.captions, names) if cfg.captions else None

    def draw(self, rng: np.random.Generator, image: int) -> tuple[str, np.ndarray, list[np.ndarray]]:
        """(prompt, (77, d) float32 token rows, [(r_j,) positions of vector j]) for the step's image."""
        if self.captions:
            return self._encode(self.captions[self.names[image]].format(self.placeholder))
        return self._encode(self.templates[int(rng.integers(len(self.templates)))].format(self.placeholder))

    def draw_template(self, i: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """((77, d) token rows, positions) of template i (captions: image i's caption)."""
        if self.captions:
            return self._encode(self.captions[self.names[i % len(self.names)]].format(self.placeholder))[1:]
        return self._encode(self.templates[i].format(self.placeholder))[1:]

    def _encode(self, prompt: str) -> tuple[str, np.ndarray, list[np.ndarray]]:
        if prompt not in self.cache:
            ids = self.text.tokenizer([prompt])[0]
            rows = [np.flatnonzero(ids == i) for i in self.ids]
            if any(r.size == 0 for r in rows):
                raise ValueError(f"prompt {prompt!r} lost the placeholder when truncated to 77 tokens; shorten it")
            # (77, d) rows once per prompt; the placeholder rows are overwritten every step.
            self.cache[prompt] = (self.text.token_embeds(ids[None])[0], rows)
        return (prompt, *self.cache[prompt])


@dataclass
class _Run:
    """Sessions and fixed data of a run (opened once)."""

    model: ModelDir
    text: TextEncoder
    unet: OnnxModel
    latents: lat.Latents
    prompts: _Prompts
    tokens: list[str]
    v0: np.ndarray            # (k, d)
    alphas: np.ndarray        # (T,) cumulative alphas
    resolution: int
    unet_rows: int            # UNet batch per call: passes (batched) or 1
    text_rows: int            # text-encoder batch per call
    dirs: zo.Directions       # the queries' directions (priors.build; rebuilt every prior_refresh steps)
    prior_args: tuple         # (prompts, batch) directions are built from (priors.PromptRows)


def _batch_dim(session: OnnxModel, name: str) -> int | None:
    dim = session.inputs[name].shape[0]
    return dim if isinstance(dim, int) else None


def _batch_per_call(session: OnnxModel, name: str, passes: int, want: int, what: str) -> int:
    """Batch per call: `want` unless a static-shape model fixes it (to passes or to 1)."""
    fixed = _batch_dim(session, name)
    if fixed is None or fixed == want:
        return want
    if fixed in (1, passes):
        return fixed
    raise ValueError(f"{session.path}: static batch {fixed} fits neither 1 nor the {passes} passes of a step; "
                     f"quantize the {what} with batch 1 or {passes} (or change --queries)")


def _open(model_dir, images_dir, out: Path, cfg: TrainConfig) -> _Run:
    model = ModelDir.open(model_dir)
    res = lat.check_resolution(model, cfg.resolution)
    opts = dict(cfg.provider_options)
    latents = lat.encode_images(model, images_dir, res, out, cfg.provider, opts)
    text = TextEncoder(model, cfg.provider, opts)
    tokens, v0 = _place_tokens(text, cfg)
    passes = cfg.zo.passes
    text_rows = _batch_per_call(text.session, "inputs_embeds", passes, passes, "text encoder")
    drawer = _Prompts(text, tokens, latents.names, cfg)
    # Before the UNet loads (a Jacobian's J is transient); a dynamic-batch text encoder takes 16 rows a call.
    draws = [drawer.draw_template(i) for i in range(min(cfg.prior_prompts, len(drawer.templates)))]
    batch = text_rows if _batch_dim(text.session, "inputs_embeds") else 16
    dirs = priors.build(cfg, text, (draws, batch), v0)
    unet = OnnxModel(model.onnx("unet"), cfg.provider, opts)
    unet_rows = _batch_per_call(unet, "sample", passes, passes if cfg.unet_batch == "batch" else 1, "UNet")
    return _Run(model, text, unet, latents, drawer, tokens, v0,
                model.alphas_cumprod(), res, unet_rows, text_rows, dirs, (draws, batch))


def _losses(run: _Run, emb: np.ndarray, x_t: np.ndarray, t: int, target: np.ndarray,
            sample: np.ndarray) -> np.ndarray:
    """(P,) float64 MSE of every pass: text encoder then UNet, batched or one by one."""
    P = emb.shape[0]
    tr = run.text_rows
    hidden = np.concatenate([run.text.encode_embeds(emb[i:i + tr]) for i in range(0, P, tr)])  # (P, 77, d)
    ts = np.array(t, np.float32)
    if run.unet.inputs["timestep"].shape:                  # a (B,) timestep input instead of a scalar
        ts = np.full(run.unet_rows, t, np.float32)
    sample[:] = x_t                                          # (rows, C, h, w), same x_t for every pass
    out = np.concatenate([run.unet.run({"sample": sample, "timestep": ts,
                                        "encoder_hidden_states": hidden[i:i + run.unet_rows]})[0]
                          for i in range(0, P, run.unet_rows)])           # (P, C, h, w)
    diff = out.astype(np.float32) - target
    return np.mean(diff * diff, axis=(1, 2, 3), dtype=np.float64)


def _draw(run: _Run, cfg: TrainConfig, seed: int, step: int):
    """A step's draws, common to all its passes: image, flip, prompt, t, noise -> x_t and the target."""
    rng = zo.step_rng(seed, step)
    index, flip = int(rng.integers(len(run.latents.names))), bool(rng.random() < 0.5)
    prompt, base, rows = run.prompts.draw(rng, index)
    t = zo.sample_timestep(rng, *cfg.t_range)
    x0 = run.latents.sample(rng, index, flip, cfg.latent)                 # (1, C, h, w)
    eps = rng.standard_normal(x0.shape, dtype=np.float32)
    a = run.alphas[t]
    x_t = (np.sqrt(a) * x0 + np.sqrt(1 - a) * eps).astype(np.float32)
    if run.model.manifest["prediction_type"] == "v_prediction":
        return prompt, base, rows, t, x_t, (np.sqrt(a) * eps - np.sqrt(1 - a) * x0).astype(np.float32)
    return prompt, base, rows, t, x_t, eps


def eval_loss(run: _Run, cfg: TrainConfig, vectors: np.ndarray, draws: int = 16, seed: int = 10_000) -> float:
    """Mean loss of (k, d) vectors over a fixed set of draws (same images, t, noise for any vectors)."""
    emb = np.empty((1, run.text.tokenizer.max_length, vectors.shape[1]), np.float32)
    sample = np.empty((run.unet_rows, *run.latents.mean.shape[2:]), np.float32)
    total = 0.0
    for step in range(1, draws + 1):
        _, base, rows, t, x_t, target = _draw(run, cfg, seed, step)
        emb[:] = base
        for j, r in enumerate(rows):
            emb[:, r] = vectors[j]
        total += float(np.mean([_losses(run, emb[[0] * run.unet_rows], x_t, t, target, sample)]))
    return total / draws


def _truncate_log(path: Path, step: int) -> None:
    """Keep log rows up to `step` (rows after the checkpoint belong to a killed run)."""
    rows = path.read_text().splitlines() if path.is_file() else []
    keep = [r for r in rows if r.strip() and json.loads(r)["step"] <= step]
    atomic_write_text(path, "".join(r + "\n" for r in keep))


def _start(out: Path, cfg: TrainConfig, v0: np.ndarray) -> zo.ZOState:
    """A fresh optimizer state, or the checkpoint's when resuming (same settings required)."""
    ck = out / CHECKPOINT
    if not ck.is_file():
        if cfg.resume:
            tqdm.write(f"no {CHECKPOINT} in {out}; starting from step 0")
        _truncate_log(out / "log.jsonl", 0)
        return zo.ZOState.start(v0, cfg.zo)
    with np.load(ck) as z:
        saved, state = json.loads(str(z["config"])), zo.ZOState.from_arrays(z)
    if not cfg.resume:
        raise FileExistsError(f"{out} already holds a run at step {state.step}: pass --resume to continue it, "
                              "or choose another --out")
    then, now = trajectory(saved), cfg.trajectory()
    changed = sorted(k for k in now.keys() | then.keys() if then.get(k) != now.get(k))
    changed += sorted(k for k, v in RETIRED.items() if k in saved and saved[k] != v)   # settings gone since
    if changed:
        raise ValueError(f"cannot resume {ck}: {', '.join(f'{k}={saved.get(k)!r} (now {now.get(k)!r})' for k in changed)}; "
                         "use the settings of the first run or another --out")
    if state.v.size != v0.size:
        raise ValueError(f"{ck} holds {state.v.size} values, this model needs {v0.size}; use another --out")
    _truncate_log(out / "log.jsonl", state.step)
    return state


def _save(out: Path, run: _Run, state: zo.ZOState, cfg: TrainConfig) -> Path:
    """Atomic checkpoint (state + config), then the learned embeddings."""
    arrays = {**state.arrays(), "config": np.array(json.dumps(cfg.as_dict()))}
    atomic_savez(out / CHECKPOINT, **arrays)
    return save_learned_embeds(out / "learned_embeds.safetensors", cfg.token,
                               state.v.reshape(run.v0.shape))


def _write_config(out: Path, run: _Run, cfg: TrainConfig, images_dir) -> None:
    from importlib.metadata import PackageNotFoundError, version
    import onnxruntime

    try:
        zoodip_version = version("zoodip")
    except PackageNotFoundError:
        zoodip_version = "unknown"
    atomic_write_json(out / "config.json", {
        "config": cfg.as_dict(), "model": str(run.model.root.resolve()), "images": str(Path(images_dir).resolve()),
        "images_used": run.latents.names, "tokens": run.tokens, "resolution": run.resolution,
        "scheme": run.model.manifest.get("scheme"), "prediction_type": run.model.manifest["prediction_type"],
        "passes_per_step": cfg.zo.passes, "unet_calls_per_step": math.ceil(cfg.zo.passes / run.unet_rows),
        "provider": run.unet.provider,
        "versions": {"zoodip": zoodip_version, "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
                     "python": platform.python_version()},
    })


def _sample(out: Path, run: _Run, cfg: TrainConfig, step: int) -> None:
    """A 4-image grid with the current token, when the generate stage is installed."""
    try:
        from .generate import GenerateConfig, generate
    except ImportError as err:
        tqdm.write(f"--sample-every: skipping samples ({err})")
        return
    gcfg = GenerateConfig(n=4, steps=25, seed=0, height=run.resolution, width=run.resolution, provider=cfg.provider,
                          provider_options=cfg.provider_options, progress=False)
    generate(run.model.root, [out / "learned_embeds.safetensors"], f"a photo of {run.prompts.placeholder}",
             out / "samples" / f"step_{step:06d}", gcfg)


def train(model_dir: str | Path, images_dir: str | Path, out_dir: str | Path, cfg: TrainConfig) -> Path:
    """Learn cfg.token on the images; returns OUT/learned_embeds.safetensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = _open(model_dir, images_dir, out, cfg)
    state = _start(out, cfg, run.v0)
    _write_config(out, run, cfg, images_dir)
    zcfg, k, d = cfg.zo, *run.v0.shape
    P = zcfg.passes
    pts = np.empty((P, k * d), np.float32)                        # (P, k*d) query points
    emb = np.empty((P, run.text.tokenizer.max_length, d), np.float32)   # (P, 77, d)
    C, h = run.latents.mean.shape[2], run.latents.mean.shape[3]
    sample = np.empty((run.unet_rows, C, h, run.latents.mean.shape[4]), np.float32)
    bar = tqdm(total=cfg.steps, initial=state.step, desc=f"train {cfg.token}", unit="step", disable=not cfg.progress)
    ema, timing, first = None, [], state.step + 1
    with open(out / "log.jsonl", "a", encoding="utf-8") as log:
        while state.step < cfg.steps:
            t0 = time.perf_counter()
            step = state.step + 1
            at = priors.anchor(state, step, cfg.prior_refresh, first, cfg.tau) if priors.refreshes(cfg) else None
            if at is not None:                                    # e.g. J^T J at the current v (TE passes only)
                run.dirs = priors.build(cfg, run.text, run.prior_args, at.reshape(k, d))
            prompt, base, rows, t, x_t, target = _draw(run, cfg, cfg.seed, step)   # 1-3: shared by all passes
            # 4-5. Losses at v (and v + mu z_i): placeholder rows replaced in every pass.
            zo.query_points(state.v, cfg.seed, step, zcfg, run.dirs, out=pts)
            emb[:] = base
            for j, r in enumerate(rows):
                emb[:, r] = pts.reshape(P, k, d)[:, j, None]
            t1 = time.perf_counter()
            losses = _losses(run, emb, x_t, t, target, sample)
            t_session = time.perf_counter() - t1
            if not np.isfinite(losses).all():
                raise FloatingPointError(
                    f"loss is not finite at step {step} ({losses.tolist()}, t={t}, prompt {prompt!r}): the model "
                    f"overflowed or v diverged. The last good checkpoint ({out / CHECKPOINT}, every "
                    f"{cfg.save_every or cfg.steps} steps) is intact: lower --lr or --mu and resume, or check the model")
            # 5-7. Estimate, project, Adam, history, PCA refresh.
            projected = int(state.basis.shape[0]) if cfg.subspace else 0   # dims removed from this step's g
            g = zo.update(state, losses, cfg.seed, zcfg, run.dirs)
            loss = float(losses[0])
            ema = loss if ema is None else 0.98 * ema + 0.02 * loss
            seconds = time.perf_counter() - t0
            log.write(json.dumps({"step": step, "loss": loss, "t": t, "grad_norm": float(np.linalg.norm(g)),
                                  "projected_dims": projected, "seconds": round(seconds, 6),
                                  "session_seconds": round(t_session, 6)}) + "\n")
            log.flush()
            if cfg.save_every and step % cfg.save_every == 0:
                _save(out, run, state, cfg)
            if cfg.sample_every and step % cfg.sample_every == 0:
                _save(out, run, state, cfg)
                _sample(out, run, cfg, step)
            timing.append((seconds, t_session))
            bar.set_postfix_str(f"loss {ema:.4f} t {t}", refresh=False)
            bar.update(1)
    bar.close()
    path = _save(out, run, state, cfg)
    _summary(out, timing, ema, cfg)
    return path


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint file was saved at."""
    with np.load(path) as z:
        return int(z["step"])


def _summary(out: Path, timing: list, ema: float | None, cfg: TrainConfig) -> None:
    """Mean step time and the share spent outside session.run (first step = warm-up, left out)."""
    steady = timing[1:] or timing
    if not steady:
        return
    total, inside = (float(np.sum([s[i] for s in steady])) for i in (0, 1))
    outside = 1 - inside / total if total > 0 else 0.0
    tqdm.write(f"{len(timing)} steps, {total / len(steady):.3f} s/step, {100 * outside:.1f}% outside session.run; "
               f"smoothed loss {ema:.4f}; wrote {out / 'learned_embeds.safetensors'}")
    atomic_write_json(out / "timing.json", {"steps": len(timing), "step_seconds": total / len(steady),
                                            "outside_session_share": outside, "passes_per_step": cfg.zo.passes})
