"""One subject, many workers: the driver runs zo_runtime.train's loop, Ray actors run the step's UNet passes.

The seed trick (MeZO, OpenAI's evolution strategies): a step's image, prompt, t and noise come from
(seed, step), so the driver sends (step, the (P, D) query points, a worker's UNet calls) - P x D float32,
9 KB at SD 1.5's P = 3, D = 768 - and gets scalar losses back. Each worker runs the text encoder on all P
points (the one batch a single process runs) and the UNet on its own calls only, so every loss is the float
`zoodip train` computes at the same thread count, and so is the trajectory. The driver opens no UNet; it
keeps v, the ZO state, the checkpoints and the text encoder (prompts, Jacobian directions). Validation
draws go to the workers too, split like the passes: the driver stays UNet-free and they run in parallel.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from zo_runtime import objective as obj, zo
from zo_runtime.latents import Latents
from zo_runtime.train import train as train_loop
from zo_runtime.train_config import TrainConfig

from . import ClusterConfig, connect, pool_size
from .pool import Pool


class QueryWorker:
    """A Ray actor holding one opened model (text encoder + UNet); evaluates its share of each step."""

    def __init__(self, model_dir: str, cfg: TrainConfig, latents: Latents, threads: int):
        os.environ["ZOODIP_THREADS"] = str(threads)      # read when the sessions open, just below
        self.run = obj.open_objective(model_dir, latents, None, cfg, role="worker")
        self.buf = obj.Buffers.for_run(self.run)
        self.drawn: tuple[int, tuple] | None = None      # (step, draws): a re-sent share reuses them

    def info(self) -> dict:
        return {"pid": os.getpid(), "unet_rows": self.run.unet_rows}

    def losses(self, step: int, points: np.ndarray, calls: list[int]) -> np.ndarray:
        """(len(calls),) losses of UNet calls `calls` of step `step` at the (P, D) points."""
        if self.drawn is None or self.drawn[0] != step:
            self.drawn = (step, obj.draw(self.run, zo.step_rng(self.run.cfg.seed, step)))
        return obj.point_losses(self.run, points, self.drawn[1], self.buf, calls)

    def fixed(self, vectors: np.ndarray, draws: list[int], stream: int) -> list[float]:
        return obj.fixed_losses(self.run, vectors, draws, stream)


def shares(count: int, workers: int) -> list[list[int]]:
    """count items dealt round robin to at most `workers` shares: the longest share is ceil(count / workers)."""
    return [list(range(k, count, workers)) for k in range(min(workers, count))]


class Remote:
    """objective.Evaluator whose passes run on a pool of QueryWorkers (started by open, stopped by close)."""

    worker = QueryWorker        # the actor class (a benchmark times its calls in a subclass)

    def __init__(self, ray, cluster: ClusterConfig):
        self.ray, self.cluster, self.pool = ray, cluster, None

    def open(self, model_dir, images_dir, out: Path, cfg: TrainConfig) -> obj.Objective:
        run = obj.open_objective(model_dir, images_dir, out, cfg, role="driver")
        if run.cfg.unet_batch != "single":
            raise ValueError("workers run one UNet pass per call: drop --set unet_batch=batch to train on a cluster")
        workers = pool_size(self.ray, self.cluster, most=run.cfg.zo.passes)
        # The driver's Latents travel to the workers: they need the model at the same path, not the photos.
        self.pool = Pool(self.ray, self.worker, (str(model_dir), run.cfg, run.latents, self.cluster.threads),
                         workers, self.cluster)
        if any(i["unet_rows"] != 1 for i in self.pool.info):
            raise ValueError(f"{run.model.onnx('unet')} has a static batch of {run.cfg.zo.passes}: one step is one "
                             "UNet call, which cannot be split over workers; train it with plain `zoodip train`")
        return run

    def losses(self, run: obj.Objective, step: int, points: np.ndarray, drawn: tuple, buf: obj.Buffers) -> np.ndarray:
        parts = shares(len(points), len(self.pool.live) or 1)
        got = self.pool.run([lambda a, c=c: a.losses.remote(step, points, c) for c in parts])
        out = np.empty(len(points))
        for calls, part in zip(parts, got):
            out[calls] = part
        return out

    def validation_loss(self, run: obj.Objective, vectors: np.ndarray) -> float:
        return self.fixed_loss(run, vectors, range(1, run.cfg.val_draws + 1), obj.VALIDATION_STREAM)

    def fixed_loss(self, run: obj.Objective, vectors: np.ndarray, draws, stream: int) -> float:
        draws = list(draws)
        parts = shares(len(draws), len(self.pool.live) or 1)
        got = self.pool.run([lambda a, c=c: a.fixed.remote(vectors, [draws[i] for i in c], stream) for c in parts])
        values = [0.0] * len(draws)
        for items, part in zip(parts, got):
            for i, v in zip(items, part):
                values[i] = v
        return obj.mean_in_order(values)                 # the order fixed_loss sums in here

    def close(self) -> None:
        if self.pool:
            self.pool.close()


def train(model_dir: str | Path, images_dir: str | Path, out_dir: str | Path, cfg: TrainConfig,
          cluster: ClusterConfig) -> Path:
    """zoodip train with the step's passes on Ray workers; returns OUT/learned_embeds.safetensors."""
    ray, started = connect(cluster, "zoodip train --address/--workers")
    remote = Remote(ray, cluster)
    try:
        return train_loop(model_dir, images_dir, out_dir, cfg, evaluator=remote)
    finally:
        remote.close()
        if started:
            ray.shutdown()
