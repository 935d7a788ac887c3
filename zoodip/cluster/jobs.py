"""JOBS.jsonl for train-many: one subject per line, every line checked before anything runs; the summary.

A line: {"images": "photos/dog", "token": "sks", "init": "dog", "out": "dog", "steps": 500, ...}: any
TrainConfig field by name. `images` is relative to the JOBS file, `out` to --out (default: the images
folder's name). train-many sets resume (a retried or re-run subject continues from its checkpoint), force
(a subject whose worker died before its first checkpoint starts over in its own folder) and progress (one
bar for all subjects).
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zo_runtime.io_utils import atomic_write_json, atomic_write_text
from zo_runtime.latents import list_images
from zo_runtime.train import CHECKPOINT, EMBEDS, checkpoint_step
from zo_runtime.train_config import TrainConfig

SET_BY_TRAIN_MANY = {"resume": True, "force": True, "progress": False}
LOSS_WINDOW = 20        # steps the summary's final loss is averaged over (one step's loss depends on its t)


@dataclass(frozen=True)
class Job:
    """One subject: where its photos are, where its run goes, its settings, and its line in JOBS."""

    line: int
    name: str
    images: Path
    out: Path
    cfg: TrainConfig


def _type_error(name: str, value, hint) -> str | None:
    """Why a JSON value does not fit a TrainConfig field's annotation (None: it fits)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1
    tp = args[0] if optional else hint
    if value is None:
        return None if optional else f"{name} may not be null"
    want = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(tp)
    if want is None and typing.get_origin(tp) is tuple:
        return None if isinstance(value, list) else f"{name} must be a list, got {value!r}"
    if want and (not isinstance(value, want) or (tp is not bool and isinstance(value, bool))):
        return f"{name} must be {tp.__name__}, got {value!r}"
    return None


def _job(line: int, text: str, base: Path, out_dir: Path) -> Job:
    """The Job of one JSONL line; ValueError saying what is wrong with it."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(spec, dict):
        raise ValueError("must be a JSON object such as {\"images\": ..., \"token\": \"sks\", \"init\": \"dog\"}")
    missing = [k for k in ("images", "token", "init") if k not in spec]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    hints, fields = typing.get_type_hints(TrainConfig), {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(spec) - fields - {"images", "out"})
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; settings are TrainConfig fields "
                         f"(`zoodip train --help`)")
    settings = {k: v for k, v in spec.items() if k in fields}
    bad = [e for e in (_type_error(k, v, hints[k]) for k, v in settings.items()) if e]
    if bad or not isinstance(spec["images"], str) or not isinstance(spec.get("out", ""), str):
        raise ValueError("; ".join(bad) or "images and out must be strings (paths)")
    images = base / spec["images"]
    list_images(images)                                  # the folder exists and holds images
    out = out_dir / spec.get("out", images.name)
    cfg = TrainConfig(**{**settings, **SET_BY_TRAIN_MANY})
    return Job(line, str(spec.get("out", images.name)), images, out, cfg)


def read_jobs(path: str | Path, out_dir: str | Path) -> list[Job]:
    """Every subject of a JOBS.jsonl file; ValueError listing every bad line by number (nothing has run)."""
    path, jobs, errors = Path(path), [], []
    if not path.is_file():
        raise FileNotFoundError(f"jobs file {path} does not exist")
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            jobs.append(_job(n, text, path.parent, Path(out_dir)))
        except (ValueError, TypeError, FileNotFoundError) as err:
            errors.append(f"  line {n}: {err}")
    seen: dict[Path, int] = {}
    for job in jobs:
        if job.out.resolve() in seen:
            errors.append(f"  line {job.line}: out {job.name!r} is line {seen[job.out.resolve()]}'s too; give each "
                          "subject its own \"out\"")
        seen.setdefault(job.out.resolve(), job.line)
    if errors:
        raise ValueError(f"{path}: {len(errors)} bad line(s), nothing was run:\n" + "\n".join(errors))
    if not jobs:
        raise ValueError(f"{path} holds no subjects (one JSON object per line)")
    return jobs


def finished(job: Job) -> bool:
    """Whether the subject's run is complete: its last train() call ended on its final checkpoint (not at a
    time budget) at or past the steps the line asks for."""
    ck, timing = job.out / CHECKPOINT, job.out / "timing.json"
    if not (ck.is_file() and timing.is_file() and (job.out / EMBEDS).is_file()):
        return False
    t, step = json.loads(timing.read_text()), checkpoint_step(ck)
    if t.get("last_step") != step or t.get("stopped") == "time budget reached":
        return False
    return job.cfg.steps is None or step >= job.cfg.steps or t.get("stopped") == "early stop"


def subject_row(job: Job, status: str, seconds: float | None, attempts: int = 1) -> dict:
    """The summary row of a subject, read from its folder: steps, final loss (mean of the last steps)."""
    log = job.out / "log.jsonl"
    rows = [json.loads(r) for r in log.read_text().splitlines() if r.strip()] if log.is_file() else []
    losses = [r["loss"] for r in rows if "loss" in r][-LOSS_WINDOW:]
    ck = job.out / CHECKPOINT
    return {"subject": job.name, "line": job.line, "steps": checkpoint_step(ck) if ck.is_file() else 0,
            "seconds": None if seconds is None else round(seconds, 2),
            "final_loss": round(float(np.mean(losses)), 6) if losses else None,
            "val_best": next((r["val_best"] for r in reversed(rows) if "val_best" in r), None),
            "status": status, "attempts": attempts, "out": str(job.out)}


def write_summary(out_dir: Path, rows: list[dict], wall: float) -> Path:
    """OUT/summary.json and OUT/summary.md (a table: subject, steps, seconds, final loss, status)."""
    done = [r for r in rows if r["status"] == "done"]
    totals = {"subjects": len(rows), "done": len(done), "skipped": sum(r["status"] == "skipped" for r in rows),
              "failed": sum(r["status"] not in ("done", "skipped") for r in rows), "wall_seconds": round(wall, 2),
              "train_seconds": round(sum(r["seconds"] or 0 for r in done), 2)}
    atomic_write_json(out_dir / "summary.json", {"totals": totals, "subjects": rows})
    lines = [f"# train-many: {totals['done']} trained, {totals['skipped']} skipped, {totals['failed']} failed, "
             f"{wall:.0f} s", "", f"| subject | steps | seconds | final loss (last {LOSS_WINDOW} steps) | status |",
             "|---|---:|---:|---:|---|"]
    for r in rows:
        loss = "" if r["final_loss"] is None else f"{r['final_loss']:.6f}"
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        retried = f" (attempt {r['attempts']})" if r["attempts"] > 1 else ""
        lines.append(f"| {r['subject']} | {r['steps']} | {seconds} | {loss} | {r['status']}{retried} |")
    atomic_write_text(out_dir / "summary.md", "\n".join(lines) + "\n")
    return out_dir / "summary.json"
