"""Early stopping on a fixed validation set (in the spirit of DVAR, Voronov et al. 2023, arXiv 2302.04841).

The validation set is drawn once from the seed: the training images, timesteps inside the training
range and noise, on a random stream of its own. Every `val_every` steps the base loss of the current
vector on it is measured (base passes only); the best vector by that loss is kept, and the run stops
when it has not improved for `patience` evaluations. Same draws for every vector: differences between
checkpoints are not drowned by the draw-to-draw spread of the diffusion loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Tracker:
    """The best vector so far by validation loss (checkpointed with the optimizer state)."""

    best_v: np.ndarray          # (D,) vector with the lowest validation loss so far
    best_loss: float = float("inf")
    best_step: int = 0
    since_best: int = 0         # evaluations since the best one

    KEYS = ("val_best_v", "val_best_loss", "val_best_step", "val_since_best")

    @classmethod
    def start(cls, v: np.ndarray) -> "Tracker":
        return cls(np.asarray(v, np.float32).ravel().copy())

    def update(self, step: int, loss: float, v: np.ndarray, min_delta: float = 0.0) -> bool:
        """Record an evaluation at `step`; True when it is the new best (by more than min_delta, relative)."""
        if loss < self.best_loss * (1 - min_delta):
            self.best_v, self.best_loss, self.best_step, self.since_best = v.copy(), float(loss), step, 0
            return True
        self.since_best += 1
        return False

    def stop(self, patience: int) -> bool:
        """No improvement for `patience` evaluations."""
        return patience > 0 and self.since_best >= patience

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(zip(self.KEYS, (self.best_v, np.float64(self.best_loss), np.int64(self.best_step),
                                    np.int64(self.since_best))))

    @classmethod
    def from_arrays(cls, a, v: np.ndarray) -> "Tracker":
        """From arrays() or a checkpoint; a checkpoint without validation state starts a fresh tracker at v."""
        keys = a.files if hasattr(a, "files") else a
        if "val_best_v" not in keys:
            return cls.start(v)
        return cls(np.array(a["val_best_v"], np.float32), float(a["val_best_loss"]), int(a["val_best_step"]),
                   int(a["val_since_best"]))
