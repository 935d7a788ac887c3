"""Many subjects: `zoodip train-many MODEL JOBS.jsonl --out DIR` on a pool of Ray actors.

Each actor keeps the model's text encoder and UNet open (objective.Sessions) and trains one subject at a
time with the ordinary zo_runtime.train loop into the subject's own folder (atomic outputs, a checkpoint
every save_every steps). A subject whose actor dies is resumed from its last checkpoint on the next free
actor; resume is exact, so it ends bit-identical to an uninterrupted run at the same thread count. A
subject whose output is complete is skipped. On a multi-node cluster every node must see MODEL, the
photos and DIR at the same paths (a shared file system): a retry on another node reads the checkpoint.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from zo_runtime import objective as obj
from zo_runtime.model_dir import ModelDir
from zo_runtime.train import train

from . import ClusterConfig, connect, pool_size
from .jobs import Job, finished, read_jobs, subject_row, write_summary
from .pool import Pool

# What a subject's own train() may raise on its inputs or a diverged run: its row says so, others go on.
SUBJECT_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, FloatingPointError, OSError)


class SubjectWorker:
    """A Ray actor: the model's sessions, opened once, and train() for one subject at a time."""

    def __init__(self, model_dir: str, threads: int):
        os.environ["ZOODIP_THREADS"] = str(threads)      # read when the sessions open (first subject)
        self.model_dir, self.local = model_dir, obj.Local(obj.Sessions())

    def info(self) -> dict:
        return {"pid": os.getpid()}

    def train(self, job: Job) -> tuple[str, float]:
        """(status, seconds) of training one subject (resuming its checkpoint, if any)."""
        t0 = time.perf_counter()
        try:
            train(self.model_dir, job.images, job.out, job.cfg, evaluator=self.local)
        except SUBJECT_ERRORS as err:
            return f"error: {type(err).__name__}: {err}", time.perf_counter() - t0
        return "done", time.perf_counter() - t0


def train_many(model_dir: str | Path, jobs_file: str | Path, out_dir: str | Path, cluster: ClusterConfig,
               progress: bool = True) -> Path:
    """Train every subject of JOBS on a Ray pool; returns OUT/summary.json (also OUT/summary.md)."""
    started, out_dir = time.perf_counter(), Path(out_dir)
    ModelDir.open(model_dir)                             # a bad model fails before any Ray start
    jobs = read_jobs(jobs_file, out_dir)                 # ... and so does every bad line
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {j.line: subject_row(j, "skipped", None) for j in jobs if finished(j)}
    todo = [j for j in jobs if j.line not in rows]
    if todo:
        _run(model_dir, todo, rows, cluster, progress, out_dir, started)
    return write_summary(out_dir, [rows[j.line] for j in jobs], time.perf_counter() - started)


def _run(model_dir, todo: list[Job], rows: dict, cluster: ClusterConfig, progress: bool, out_dir: Path,
         started: float) -> None:
    """Train `todo` on the pool, filling rows (line -> summary row) as subjects finish."""
    ray, own = connect(cluster, "zoodip train-many")
    pool, bar = None, tqdm(total=len(todo) + len(rows), initial=len(rows), desc="subjects", unit="subject",
                           disable=not progress)
    try:
        pool = Pool(ray, SubjectWorker, (str(model_dir), cluster.threads), pool_size(ray, cluster, len(todo)), cluster)
        tries: dict[int, int] = {}

        def task(job: Job):
            def submit(actor):
                tries[job.line] = tries.get(job.line, 0) + 1
                return actor.train.remote(job)
            return submit

        def done(i: int, result) -> None:
            job = todo[i]
            status, seconds = (result if isinstance(result, tuple)
                               else (f"failed: its worker died {tries[job.line]} times", None))
            rows[job.line] = subject_row(job, status, seconds, tries[job.line])
            write_summary(out_dir, [rows[k] for k in sorted(rows)], time.perf_counter() - started)
            bar.update(1)

        pool.run([task(j) for j in todo], attempts=cluster.retries + 1, done=done)
    finally:
        bar.close()
        if pool:
            pool.close()
        if own:
            ray.shutdown()
