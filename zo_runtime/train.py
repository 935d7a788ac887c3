"""ZOODiP textual inversion on onnxruntime: forward passes only, NumPy optimizer, resumable.

`train` owns the loop: per step, refresh the directions when due, draw (image, prompt, t, noise),
evaluate the n+1 query points (objective.py), update v with the ZO core (zo.py), log, checkpoint.
Around it: a plan printed after the first timed steps (plan.py), an optional time budget, and
optional early stopping on a fixed validation set (early_stop.py). Outputs are written atomically.
Where the passes run is the evaluator's business (objective.Evaluator): this process by default, Ray
workers under zoodip.cluster; the loop and its state stay here either way.
"""
from __future__ import annotations

import json
import math
import platform
import time
import zipfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import init_search, objective as obj, plan as pl, priors, zo
from .early_stop import Tracker
from .embeds import save_learned_embeds
from .io_utils import atomic_savez, atomic_write_json, atomic_write_text
from .train_config import TrainConfig, trajectory

CHECKPOINT = "checkpoint.npz"
EMBEDS, LAST_EMBEDS = "learned_embeds.safetensors", "learned_embeds_last.safetensors"
OUTPUTS = (EMBEDS, LAST_EMBEDS, "config.json", "log.jsonl", "timing.json", init_search.RESULT)   # a run's in OUT
# Settings of older zoodip versions that no longer exist, at the value that behaves as this version does.
RETIRED = {"estimator": "rge", "lr_schedule": "constant", "average": 0.0, "normalize": "coordinate",
           "prior_power": 1.0, "prior_words": None, "guide_share": 0.5, "betas": [0.9, 0.999]}


def _truncate_log(path: Path, step: int) -> None:
    """Keep log rows up to `step` (rows after the checkpoint belong to a killed run)."""
    rows = path.read_text().splitlines() if path.is_file() else []
    keep = [r for r in rows if r.strip() and json.loads(r)["step"] <= step]
    atomic_write_text(path, "".join(r + "\n" for r in keep))


def _fresh(out: Path, cfg: TrainConfig, v0: np.ndarray) -> tuple[zo.ZOState, Tracker]:
    """Step 0, after making sure nothing another run wrote in OUT is replaced without --force."""
    found = [n for n in OUTPUTS if (out / n).is_file() and (out / n).stat().st_size > 0]
    if found and not cfg.force:
        raise FileExistsError(f"{out} holds {', '.join(found)} from another run (and no checkpoint to resume): "
                              "choose another --out, or pass --force to replace them")
    if cfg.resume:
        tqdm.write(f"no {CHECKPOINT} in {out}; starting from step 0")
    _truncate_log(out / "log.jsonl", 0)
    return zo.ZOState.start(v0, cfg.zo), Tracker.start(v0)


def _load_checkpoint(ck: Path, v0: np.ndarray) -> tuple[dict, dict | None, zo.ZOState, Tracker]:
    """(settings, fingerprint, state, tracker) of a checkpoint; never unpickles; one clear error if damaged."""
    try:
        with np.load(ck, allow_pickle=False) as z:
            saved = json.loads(str(z["config"]))
            fingerprint = json.loads(str(z["fingerprint"])) if "fingerprint" in z.files else None
            return saved, fingerprint, zo.ZOState.from_arrays(z), Tracker.from_arrays(z, v0)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{ck} is damaged or not zoodip's ({type(err).__name__}): delete it or use another "
                         "--out") from None


def _start(out: Path, cfg: TrainConfig, v0: np.ndarray, fingerprint: dict) -> tuple[zo.ZOState, Tracker]:
    """A fresh optimizer state and validation tracker, or the checkpoint's when resuming (same settings,
    model and photos)."""
    ck = out / CHECKPOINT
    if not ck.is_file() or (cfg.force and not cfg.resume):      # --force without --resume: start it over
        return _fresh(out, cfg, v0)
    saved, made_with, state, tracker = _load_checkpoint(ck, v0)
    if not cfg.resume:
        raise FileExistsError(f"{out} already holds a run at step {state.step}: pass --resume to continue it, "
                              "--force to start it over, or choose another --out")
    if made_with is not None and made_with != fingerprint:
        what = " and ".join(k for k in ("model", "images") if made_with.get(k) != fingerprint.get(k))
        raise ValueError(f"cannot resume {ck}: it was trained with other {what} (fingerprints differ); use the same "
                         "MODEL and --images, or another --out")
    then, now = trajectory(saved), cfg.trajectory()
    changed = sorted(k for k in now.keys() | then.keys() if then.get(k) != now.get(k))
    changed += sorted(k for k, v in RETIRED.items() if k in saved and saved[k] != v)   # settings gone since
    if changed:
        raise ValueError(f"cannot resume {ck}: {', '.join(f'{k}={saved.get(k)!r} (now {now.get(k)!r})' for k in changed)}; "
                         "use the settings of the first run or another --out")
    if state.v.size != v0.size:
        raise ValueError(f"{ck} holds {state.v.size} values, this model needs {v0.size}; use another --out")
    _truncate_log(out / "log.jsonl", state.step)
    return state, tracker


def _save(out: Path, run: obj.Objective, state: zo.ZOState, tracker: Tracker) -> Path:
    """Atomic checkpoint (state, validation tracker, config, fingerprint), then the learned embeddings: the
    vector with the best validation loss under early stopping (the last one beside it), else the last one."""
    cfg = run.cfg
    atomic_savez(out / CHECKPOINT, **state.arrays(), **tracker.arrays(), config=np.array(json.dumps(cfg.as_dict())),
                 fingerprint=np.array(json.dumps(run.fingerprint)))
    last = state.v.reshape(run.v0.shape)
    split = run.text.dims if run.model.is_xl else None      # SDXL: A1111's clip_l / clip_g file
    if not cfg.early_stop:
        return save_learned_embeds(out / EMBEDS, cfg.token, last, split)
    save_learned_embeds(out / LAST_EMBEDS, cfg.token, last, split)
    return save_learned_embeds(out / EMBEDS, cfg.token, tracker.best_v.reshape(run.v0.shape), split)


def _write_config(out: Path, run: obj.Objective, images_dir, plan: pl.Plan | None = None,
                  found: init_search.Found | None = None) -> None:
    from importlib.metadata import PackageNotFoundError, version
    import onnxruntime

    try:
        zoodip_version = version("zoodip")
    except PackageNotFoundError:
        zoodip_version = "unknown"
    cfg = run.cfg
    atomic_write_json(out / "config.json", {
        "config": cfg.as_dict(), "model": str(run.model.root.resolve()), "images": str(Path(images_dir).resolve()),
        "images_used": run.latents.names, "tokens": run.tokens, "resolution": run.resolution,
        "scheme": run.model.manifest.get("scheme"), "prediction_type": run.model.manifest["prediction_type"],
        "passes_per_step": cfg.zo.passes, "unet_calls_per_step": math.ceil(cfg.zo.passes / run.unet_rows),
        "provider": (run.unet or run.text.session).provider, "plan": plan.as_dict() if plan else None,
        "start": found.init if found else run.cfg.init, "init_search_passes": found.passes if found else 0,
        "versions": {"zoodip": zoodip_version, "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
                     "python": platform.python_version()},
    })


def _sample(out: Path, run: obj.Objective, step: int) -> None:
    """A 4-image grid with the current token, when the generate stage is installed."""
    try:
        from .generate import GenerateConfig, generate
    except ImportError as err:
        tqdm.write(f"sample_every: skipping samples ({err})")
        return
    cfg = run.cfg
    gcfg = GenerateConfig(n=4, steps=25, seed=0, height=run.resolution, width=run.resolution, provider=cfg.provider,
                          provider_options=cfg.provider_options, progress=False, force=True)   # the run's own folder
    generate(run.model.root, [out / EMBEDS], f"a photo of {run.prompts.placeholder}",
             out / "samples" / f"step_{step:06d}", gcfg)


def _step(run: obj.Objective, ev: obj.Evaluator, state: zo.ZOState, buf: obj.Buffers, first: int) -> dict:
    """One ZO step on state (in place); returns its log row. first: this process's first step."""
    cfg, (k, d) = run.cfg, run.v0.shape
    step = state.step + 1
    at = priors.anchor(state, step, cfg.prior_refresh, first, cfg.tau) if priors.refreshes(cfg) else None
    if at is not None:                                          # e.g. J^T J at the current v (TE passes only)
        run.dirs = priors.build(cfg, run.text, run.prior_args, at.reshape(k, d))
    drawn = obj.draw(run, zo.step_rng(cfg.seed, step))         # 1-3. image, prompt, t, noise: shared by all passes
    zo.query_points(state.v, cfg.seed, step, cfg.zo, run.dirs, out=buf.points)
    t1 = time.perf_counter()
    losses = ev.losses(run, step, buf.points, drawn, buf)      # 4-5. losses at v and v + mu z_i
    t_session = time.perf_counter() - t1
    if not np.isfinite(losses).all():
        raise FloatingPointError(
            f"loss is not finite at step {step} ({losses.tolist()}, t={drawn.t}, prompt {drawn.prompt!r}): the model "
            f"overflowed or v diverged. The last good checkpoint ({CHECKPOINT}, every "
            f"{cfg.save_every or cfg.steps} steps) is intact: lower --lr or --set mu=... and resume, or check the model")
    projected = int(state.basis.shape[0]) if cfg.subspace else 0   # dims removed from this step's g
    g = zo.update(state, losses, cfg.seed, cfg.zo, run.dirs)    # 5-7. estimate, project, Adam, PCA refresh
    return {"step": step, "loss": float(losses[0]), "t": drawn.t, "grad_norm": float(np.linalg.norm(g)),
            "projected_dims": projected, "session_seconds": round(t_session, 6)}


def _validate(run: obj.Objective, ev: obj.Evaluator, state: zo.ZOState, tracker: Tracker) -> dict:
    """Validation loss of the current vector; the tracker keeps the best. Returns the log fields."""
    loss = ev.validation_loss(run, state.v.reshape(run.v0.shape))
    best = tracker.update(state.step, loss, state.v)
    return {"val_loss": loss, "val_best": best}


def _searched(run: obj.Objective, ev: obj.Evaluator, out: Path, state: zo.ZOState, tracker: Tracker) -> tuple:
    """--init-candidates: (run, state, tracker, found) from the searched start (searched on a fresh run, read
    back from OUT on a resume, where state and tracker are the checkpoint's)."""
    t0, fresh = time.perf_counter(), state.step == 0
    run, found, searched = init_search.searched_start(run, ev, out, fresh)
    tqdm.write(init_search.summary(found, time.perf_counter() - t0 if searched else None))
    if fresh:
        state, tracker = zo.ZOState.start(run.v0, run.cfg.zo), Tracker.start(run.v0)
    return run, state, tracker, found


def _plan(run: obj.Objective, timing: list, steps: int, done: int, budget: float | None, elapsed: float,
          fit_budget: bool) -> pl.Plan:
    """The plan from the timed steps (the first one left out: one-off start costs) and the loop's overheads;
    fit_budget: choose the steps that fit the budget (no --steps given)."""
    cfg = run.cfg
    step_s = float(np.median([t for t, _ in timing[1:] or timing]))
    overhead = (run.dirs_seconds / cfg.prior_refresh if priors.refreshes(cfg) else 0.0) \
        + (cfg.val_draws * step_s / cfg.zo.passes / cfg.val_every if cfg.early_stop else 0.0)
    plan = pl.Plan(cfg.zo.passes, step_s, overhead, steps, done, budget, run.resolution, pl.peak_rss_gb())
    if budget is not None and fit_budget:
        left = budget - elapsed            # <= 0: the budget ended inside warm-up, no step more
        fit = done + (pl.steps_within(left, plan.seconds_per_step, steps - done) if left > 0 else 0)
        plan = pl.Plan(cfg.zo.passes, step_s, overhead, fit, done, budget, run.resolution, plan.peak_rss_gb)
    return plan


def train(model_dir: str | Path, images_dir: str | Path, out_dir: str | Path, cfg: TrainConfig,
          evaluator: obj.Evaluator | None = None) -> Path:
    """Learn cfg.token on the images; returns OUT/learned_embeds.safetensors.

    evaluator: where the passes run (None: here, objective.Local())."""
    started, out, fit_budget = time.perf_counter(), Path(out_dir), cfg.steps is None
    out.mkdir(parents=True, exist_ok=True)
    ev = evaluator or obj.Local()
    run = ev.open(model_dir, images_dir, out, cfg)
    cfg = run.cfg
    state, tracker = _start(out, cfg, run.v0, run.fingerprint)     # refuses before any pass is spent
    budget = pl.parse_duration(cfg.time_budget) if cfg.time_budget else None
    found = None
    if cfg.init_candidates is not None:
        run, state, tracker, found = _searched(run, ev, out, state, tracker)
    _write_config(out, run, images_dir, found=found)
    buf, steps, first, timing, stop = obj.Buffers.for_run(run), cfg.steps, state.step + 1, [], None
    bar = tqdm(total=steps, initial=state.step, desc=f"train {cfg.token}", unit="step", disable=not cfg.progress)
    with open(out / "log.jsonl", "a", encoding="utf-8") as log:
        if cfg.early_stop and state.step == 0:                 # the start is a candidate too
            log.write(json.dumps({"step": 0, **_validate(run, ev, state, tracker)}) + "\n")
        while state.step < steps and stop is None:
            t0 = time.perf_counter()
            row = _step(run, ev, state, buf, first)
            timing.append((time.perf_counter() - t0, row["session_seconds"]))
            if cfg.early_stop and (state.step % cfg.val_every == 0 or state.step == steps):
                row.update(_validate(run, ev, state, tracker))
                stop = "early stop" if tracker.stop(cfg.patience) else None
            log.write(json.dumps({**row, "seconds": round(timing[-1][0], 6)}) + "\n")
            log.flush()
            sample = cfg.sample_every and state.step % cfg.sample_every == 0
            if sample or cfg.save_every and state.step % cfg.save_every == 0:
                _save(out, run, state, tracker)
            if sample:
                _sample(out, run, state.step)
            over = budget is not None and time.perf_counter() - started > budget
            # the plan after warm-up, or from the steps timed so far when a budget ends the run inside it
            if cfg.warmup_steps and (len(timing) == cfg.warmup_steps or over and len(timing) < cfg.warmup_steps):
                plan = _plan(run, timing, steps, state.step, budget, time.perf_counter() - started, fit_budget)
                steps, bar.total = plan.steps, plan.steps
                _write_config(out, run, images_dir, plan, found)   # before the line: whoever reads it finds it
                tqdm.write(plan.line())
            if stop is None and over:
                stop = "time budget reached"
            bar.set_postfix_str(f"loss {row['loss']:.4f} t {row['t']}", refresh=False)
            bar.update(1)
    bar.close()
    path = _save(out, run, state, tracker)
    _summary(out, timing, cfg, state.step, stop, tracker)
    return path


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint file was saved at."""
    with np.load(path) as z:
        return int(z["step"])


def _summary(out: Path, timing: list, cfg: TrainConfig, step: int, stop: str | None, tracker: Tracker) -> None:
    """Mean step time (first step = warm-up, left out) and why the run ended."""
    steady = timing[1:] or timing
    if not steady:
        return
    total, inside = (float(np.sum([s[i] for s in steady])) for i in (0, 1))
    outside = 1 - inside / total if total > 0 else 0.0
    why = f"; {stop} at step {step}" if stop else ""
    best = f"; best validation loss at step {tracker.best_step}" if cfg.early_stop else ""
    tqdm.write(f"{len(timing)} steps, {total / len(steady):.3f} s/step, {100 * outside:.1f}% outside session.run"
               f"{why}{best}; wrote {out / EMBEDS}")
    atomic_write_json(out / "timing.json", {"steps": len(timing), "step_seconds": total / len(steady),
                                            "outside_session_share": outside, "stopped": stop, "last_step": step,
                                            "passes_per_step": cfg.zo.passes})
