"""A better start than the class word (--init-candidates): add the candidate word whose row lowers a fixed loss.

Greedy over cfg.init_rounds: each round scores v + e(w) for every candidate word w not yet used on the same
cfg.init_draws (image, t, noise) draws (base passes only, a random stream of their own), and keeps the best
when it lowers the loss; a round without a gain ends the search. The start becomes e.g. "dog+brown", the sum
of the words' rows (objective.init_rows). The class word carries the shape but rarely the color or the
texture, and the ZO walk spends its first thousand passes finding them; the diffusion loss on the photos
already prefers a start that draws them. On the toy world one round ranked one of the concept's own words
first on 7 of 8 screening runs and scored 1.08x the class-word start over 12 fresh runs
(docs/research.md#a-searched-init-issue-20).

Cost: at most init_draws x (1 + candidates + (candidates - 1) + ...) UNet passes
(TrainConfig.init_search_passes), spent before
step 1; the fast schedule takes them off its steps (schedule.resolve), so its pass budget stays 9,000.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import objective as obj, priors
from .io_utils import atomic_write_json

SEARCH_STREAM = 4         # apart from training (0, 1) and the early-stop validation set (3)
RESULT = "init_search.json"


@dataclass(frozen=True)
class Found:
    """The search's outcome (OUT/init_search.json): the start, every score, what it cost."""

    init: str                     # e.g. "dog+brown"
    loss: float                   # its mean loss on the search's draws
    scores: list                  # [{"round", "word", "loss"}], the start's as round 0
    passes: int                   # UNet passes spent
    settings: dict                # what it was searched with: a rerun with the same settings reuses it


def _settings(run: obj.Objective) -> dict:
    """Everything the search's losses depend on (JSON-ready): the words, the draws, the model and the photos."""
    c = run.cfg.as_dict()
    keep = ("init", "init_rounds", "init_draws", "seed", "t_range", "templates", "captions", "latent", "num_vectors")
    return {**{k: c[k] for k in keep}, "candidates": list(run.cfg.init_words()), "resolution": run.resolution,
            **run.fingerprint}


def search_loss(run: obj.Objective, ev: obj.Evaluator, v: np.ndarray) -> float:
    """Mean base loss of the (k, d) vectors v on the search's fixed draws 0 .. init_draws - 1."""
    return ev.fixed_loss(run, v, range(run.cfg.init_draws), SEARCH_STREAM)


def search(run: obj.Objective, ev: obj.Evaluator) -> Found:
    """Greedy search from run.v0 over run.cfg's candidates (every word checked before the first pass)."""
    cfg, used = run.cfg, run.cfg.init.split("+")
    words = list(cfg.init_words())
    rows = {w: obj.word_rows(run.text, w, "--init-candidates") for w in words}
    bar = tqdm(total=cfg.init_search_passes(), desc="init search", unit="pass", disable=not cfg.progress)
    v = run.v0.copy()
    best = search_loss(run, ev, v)
    scores, passes = [{"round": 0, "word": cfg.init, "loss": best}], cfg.init_draws
    bar.update(cfg.init_draws)
    for r in range(1, cfg.init_rounds + 1):
        tried = {}
        for w in words:
            tried[w] = search_loss(run, ev, v + rows[w])
            bar.update(cfg.init_draws)
        passes += cfg.init_draws * len(tried)
        scores += [{"round": r, "word": w, "loss": s} for w, s in tried.items()]
        if not tried or min(tried.values()) >= best:
            break
        pick = min(tried, key=tried.get)
        best, v = tried[pick], v + rows[pick]
        used.append(pick)
        words.remove(pick)
    bar.close()
    return Found("+".join(used), best, scores, passes, _settings(run))


def restart(run: obj.Objective, init: str) -> obj.Objective:
    """run starting from `init` instead: v0 its rows, the directions rebuilt there (Jacobian ones depend on v0).

    The placeholder's table rows keep the first init: training writes v into the prompt rows itself."""
    v0 = obj.init_rows(run.text, init, len(run.tokens))
    return dataclasses.replace(run, cfg=run.cfg, v0=v0, dirs=priors.build(run.cfg, run.text, run.prior_args, v0))


def searched_start(run: obj.Objective, ev: obj.Evaluator, out: Path, fresh: bool) -> tuple[obj.Objective, Found, bool]:
    """(run from the searched start, the search, whether it ran now): searched on a fresh run (or reused from
    OUT/init_search.json when its settings match), read back on a resume."""
    path = out / RESULT
    saved = _read(path)
    if saved is not None and saved.settings != _settings(run):
        if not fresh:
            raise ValueError(f"cannot resume: {path} was searched with other settings than this run's "
                             "(--init, --init-candidates, the model or the photos); use those of the first run")
        saved = None
    if saved is not None:
        return restart(run, saved.init), saved, False
    if not fresh:
        raise ValueError(f"cannot resume with --init-candidates: {path} is missing or damaged (the checkpoint was "
                         "trained without the search); drop --init-candidates, or use another --out")
    c = run.cfg
    tqdm.write(f"init search: {len(c.init_words())} words x {c.init_draws} draws, at most "
               f"{c.init_search_passes()} UNet passes before step 1")
    found = search(run, ev)
    atomic_write_json(path, dataclasses.asdict(found))
    return restart(run, found.init), found, True


def _read(path: Path) -> Found | None:
    """OUT/init_search.json, or None when missing or unreadable (a fresh run searches again)."""
    try:
        return Found(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def summary(found: Found, seconds: float | None) -> str:
    """The line printed after the search (seconds: its time; None: read back from OUT)."""
    took = f" in {seconds:.0f} s" if seconds is not None else f", searched before ({RESULT})"
    return (f"init search: start {found.init} (loss {found.scores[0]['loss']:.5f} -> {found.loss:.5f} on "
            f"{found.settings['init_draws']} fixed draws), {found.passes} UNet passes{took}")
