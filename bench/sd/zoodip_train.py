"""One short zoodip training run in this process (torch-free): peak RSS, step time, session.run share.

Run by bench.sd.memory and bench.sd.speed in a fresh subprocess per model folder:
    python -m bench.sd.zoodip_train MODEL --images DIR --resolution 512 --steps 4 --result OUT.json

Step times come from the trainer's own log.jsonl (`seconds` per step); the time spent inside
onnxruntime is measured by wrapping InferenceSession.run / run_with_iobinding, so the share of a
step spent outside session.run (sampling, perturbation, Adam, PCA, logging) is
1 - (text-encoder + UNet run time) / (step time), summed over the timed steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from .. import common

# Defaults of the measurement (not of zoodip): few steps, because one fp32 step at 512 px is ~15 s here.
STEPS = 4          # timed steps = STEPS - WARMUP
WARMUP = 1         # the first step pays session warm-up and buffer allocation
STEP_SUBMODELS = ("text_encoder", "text_encoder_2", "unet")   # a step's session calls (SDXL: both encoders)


class RunTimer:
    """Wraps onnxruntime.InferenceSession.run (and run_with_iobinding) to add up seconds per submodel."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.events: list[tuple[str, float, float]] = []     # (submodel, start, duration)
        self.cpu: list[tuple[str, float]] = []                 # (submodel, process CPU seconds at start)

    def install(self) -> None:
        import onnxruntime as ort

        cls = ort.InferenceSession
        for name in ("run", "run_with_iobinding"):
            orig = getattr(cls, name, None)
            if orig is not None and not getattr(orig, "_bench_wrapped", False):
                setattr(cls, name, self._wrap(orig))

    def _wrap(self, orig):
        timer = self

        def wrapped(session, *args, **kwargs):
            t0 = time.perf_counter()
            timer.cpu.append((Path(str(getattr(session, "_model_path", "?"))).parent.name, time.process_time()))
            try:
                return orig(session, *args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                sub = Path(str(getattr(session, "_model_path", "?"))).parent.name or "?"
                timer.seconds[sub] += dt
                timer.calls[sub] += 1
                timer.events.append((sub, t0, dt))

        wrapped._bench_wrapped = True
        return wrapped


def _train_config(cfg_cls, **wanted):
    """Build the trainer's config from the options it has (its field names are the trainer's API)."""
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    return cfg_cls(**{k: v for k, v in wanted.items() if k in names and v is not None}), \
        sorted(k for k in wanted if k not in names and wanted[k] is not None)


def _read_log(out_dir: Path) -> list[dict]:
    log = out_dir / "log.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{log} is missing: the trainer writes one row per step there")
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def run(model_dir: str | Path, images_dir: str | Path, out_dir: Path, steps: int, warmup: int, **options) -> dict:
    """Train `steps` steps with the zoodip defaults (plus `options`), measuring RSS and time per phase."""
    from zo_runtime.model_dir import ModelDir
    from zo_runtime.train import TrainConfig, train

    timer = RunTimer()
    timer.install()
    manifest = ModelDir.open(model_dir).manifest
    # The paper's schedule unless asked otherwise: its steps make only the step's own session calls (the
    # Jacobian directions of the fast schedule add text-encoder calls between steps), so calls group by step.
    cfg, ignored = _train_config(TrainConfig, steps=steps, **{"schedule": "paper", **options})
    with common.RssSampler() as rss:
        rss.mark("start")
        t0 = time.perf_counter()
        train(model_dir, images_dir, out_dir, cfg)
        wall = time.perf_counter() - t0
        rss.mark("end")
    rows = _read_log(out_dir)
    timed = rows[warmup:] or rows
    step_s = [float(r["seconds"]) for r in timed]
    run_s = _session_seconds_in_steps(timer, rows, len(timed))
    starts = [t for sub, t, _ in timer.events if sub in STEP_SUBMODELS]
    steps_from = min(starts) - rss.t0 if starts else None    # set-up (sessions, VAE encoding) ends here
    passes = getattr(cfg, "passes", None) or int(getattr(cfg, "queries", 2)) + 1
    return {
        "method": "zoodip", "model": str(model_dir), "scheme": manifest.get("scheme"), "images": str(images_dir),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()
                   if isinstance(v, (int, float, str, bool, tuple, list, type(None)))},
        "options_not_in_trainer": ignored,
        "peak_rss_gb": common.gib(common.peak_rss_bytes()),
        "peak_rss_training_gb": rss.peak_after(steps_from) if steps_from is not None else None,
        "setup_seconds": round(steps_from, 2) if steps_from is not None else None,
        "step_seconds": common.time_stats(step_s)["median"],
        "step_stats": common.time_stats(step_s),
        "step_cpu_seconds": _cpu_per_step(timer, rows, warmup),
        "forward_passes_per_step": passes,
        "session_run_seconds_per_step": run_s and run_s["total"],
        "unet_seconds_per_step": run_s and run_s["unet"],
        "text_encoder_seconds_per_step": run_s and run_s["text_encoder"],     # SDXL: both encoders
        # Same process, same load: a step against its own UNet passes (the n+1 forwards + 5% bound).
        "step_over_unet_seconds": (round(common.time_stats(step_s)["mean"] / run_s["unet"], 4)
                                   if run_s and run_s["unet"] and step_s else None),
        "outside_session_run_share": (round(1 - run_s["total"] / common.time_stats(step_s)["mean"], 4)
                                      if run_s and step_s else None),
        "trainer_outside_session_share": _trainer_share(timed),
        "session_seconds_total": {k: round(v, 3) for k, v in timer.seconds.items()},
        "session_calls": dict(timer.calls),
        "train_wall_seconds": round(wall, 2),
        "losses": [r.get("loss") for r in rows],
        "torch_imported": "torch" in sys.modules,
        "marks": rss.marks, "rss_timeline": rss.timeline(),
    }


def _cpu_per_step(timer: RunTimer, rows: list[dict], warmup: int) -> float | None:
    """Process CPU seconds (all threads) between the starts of the timed steps, per step.

    On a shared machine wall time stretches with the neighbours' load; CPU seconds much less so.
    A step starts with its first text-encoder call (the only text-encoder calls are the steps').
    """
    te = [c for sub, c in timer.cpu if sub == "text_encoder"]
    if not rows or not te or len(te) % len(rows):
        return None
    starts = te[::len(te) // len(rows)][warmup:]            # one per step, warm-up left out
    return round((starts[-1] - starts[0]) / (len(starts) - 1), 3) if len(starts) >= 2 else None


def _trainer_share(timed: list[dict]) -> float | None:
    """The trainer's own view (its `session_seconds` column includes OnnxModel's input checks)."""
    if not timed or "session_seconds" not in timed[0]:
        return None
    total = sum(float(r["seconds"]) for r in timed)
    return round(1 - sum(float(r["session_seconds"]) for r in timed) / total, 4) if total > 0 else None


def _session_seconds_in_steps(timer: RunTimer, rows: list[dict], n_timed: int) -> dict | None:
    """Mean text-encoder (SDXL: both) and UNet session seconds per step over the last `n_timed` steps.

    Calls are grouped into steps by count: every step makes the same number of text-encoder and UNet
    calls (set-up calls are VAE-encoder ones), so the last n_timed * calls_per_step calls are the timed steps.
    """
    step_events = [e for e in timer.events if e[0] in STEP_SUBMODELS]
    if not rows or not step_events or len(step_events) % len(rows):
        return None
    per_step = len(step_events) // len(rows)
    last = step_events[-n_timed * per_step:]
    sums = {"text_encoder": sum(d for s, _, d in last if s.startswith("text_encoder")) / n_timed,
            "unet": sum(d for s, _, d in last if s == "unet") / n_timed}
    return {"total": round(sum(sums.values()), 4), **{k: round(v, 4) for k, v in sums.items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="zoodip model folder (export or quantize output)")
    p.add_argument("--images", required=True)
    p.add_argument("--resolution", type=int, default=None, help="default: the model's native resolution")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--unet-batch", default=None, help="passed to the trainer when it has this option")
    p.add_argument("--provider", default=None, help="execution provider (the trainer's default: auto)")
    p.add_argument("--out", default=None, help="training output folder (default: a temporary one)")
    p.add_argument("--result", required=True)
    a = p.parse_args(argv)
    if a.steps <= a.warmup:
        raise SystemExit(f"--steps ({a.steps}) must exceed --warmup ({a.warmup})")
    with tempfile.TemporaryDirectory(prefix="zoodip-bench-train-") as tmp:
        out_dir = Path(a.out) if a.out else Path(tmp) / "out"
        res = run(a.model, a.images, out_dir, a.steps, a.warmup, resolution=a.resolution,
                  unet_batch=a.unet_batch, provider=a.provider, token="sks", init="dog", seed=0)
    res["machine"] = common.machine_facts()
    common.write_json(a.result, res)


if __name__ == "__main__":
    main()
