"""A better start than the class word: add candidate words' token rows to it, kept by a fixed validation loss.

An experiment of issue #20 (docs/research.md#a-searched-init-issue-20): it plugs into the trainer through
--init, which takes words joined by + (objective.place_tokens sums their rows).

Greedy over `rounds`: each round scores v + e(w) for every candidate word w not yet used, on the same
`draws` (image, t, noise) draws (base passes only, a random stream of their own), and keeps the best
when it lowers the loss; a round with no gain ends the search. The result is an init such as
"heart+checkered". On the toy world the first round ranks the concept's own color or pattern word first on
most screening runs: the diffusion loss on the photos already prefers a start that draws them.

Cost: at most rounds x (len(candidates) + 1) x draws UNet passes, spent before step 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zo_runtime import objective as obj

SEARCH_STREAM = 4         # apart from training (0, 1) and the early-stop validation set (3)


@dataclass(frozen=True)
class InitSearchConfig:
    """Which words to try and how hard: the single source of the search's defaults."""

    candidates: tuple[str, ...] = ()     # single-token words to try adding to --init
    rounds: int = 2                      # words added at most
    draws: int = 16                      # (image, t, noise) draws each candidate is scored on

    def __post_init__(self):
        if self.rounds < 1 or self.draws < 1:
            raise ValueError(f"rounds and draws must be >= 1, got {self.rounds}, {self.draws}")

    def max_passes(self) -> int:
        """UNet passes the search spends at most: the start and, per round, every candidate not yet used."""
        n = len(dict.fromkeys(self.candidates))
        return self.draws * (1 + sum(max(n - r, 0) for r in range(self.rounds)))


def search_rng(seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, i, SEARCH_STREAM])


def search_loss(run: obj.Objective, v: np.ndarray, draws: int) -> float:
    """Mean base loss of the (k, d) vectors v on the search's fixed draws 0 .. draws-1."""
    return float(np.mean(obj.eval_losses(run, v, (search_rng(run.cfg.seed, i) for i in range(draws)))))


def search_init(run: obj.Objective, cfg: InitSearchConfig) -> tuple[str, list[dict], int]:
    """(init string, [{round, word, loss}] scores, UNet passes spent) from run.cfg.init and cfg.candidates.

    run: an opened Objective (its v0 is the start: (k, d), every vector gets the same added rows)."""
    used = run.cfg.init.split("+")
    words = [w for w in dict.fromkeys(cfg.candidates) if w not in used]
    rows = {w: obj.word_rows(run.text, w, "candidate") for w in words}     # every word checked before a pass

    v, passes = run.v0.copy(), cfg.draws
    best, scores = search_loss(run, v, cfg.draws), []
    for r in range(1, cfg.rounds + 1):
        tried = {w: search_loss(run, v + rows[w], cfg.draws) for w in words}
        passes += cfg.draws * len(tried)
        scores += [{"round": r, "word": w, "loss": s} for w, s in tried.items()]
        if not tried or min(tried.values()) >= best:
            break
        pick = min(tried, key=tried.get)
        best, v = tried[pick], v + rows[pick]
        used.append(pick)
        words.remove(pick)
    return "+".join(used), scores, passes
