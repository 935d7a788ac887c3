"""Direction priors for ZO queries: z ~ N(0, S) instead of N(0, I), S shaped to where the loss can move.

vocab: S = covariance of token rows (the directions in which words differ).
jacobian: S = J^T J of the text encoder at v0, J = d(hidden states)/d(placeholder row) by finite
differences (d + 1 text-encoder passes per prompt, no UNet pass). On the toy world the exact gradient
puts 86-91% of its energy in the top 16 of 128 eigen-directions of J^T J, against 75% for the vocab
covariance and 12.5% for an isotropic draw (bench/toy_grad_spectrum.py). Neither prior beat isotropic
queries on the toy benchmark (README, time-to-quality), and neither did the inverse (--prior-power -1,
Gauss-Newton through the text encoder): a trained token's displacement is 2.5-4x denser than isotropic
in J^T J's top 16 directions, and that stiff part alone carries most of what it learned (bench/toy_split.py).
What did beat isotropic queries: even weight over the top 16 (--prior-rank 16), J^T J rebuilt at the
current vector every 125 steps (--prior-refresh 125).
Both return the (d, d) symmetric square root that zo.direction applies (zo.prior_sqrt / prior_from_moment).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import zo
from .text import TextEncoder


def vocab_prior(text: TextEncoder, words: str | None, mix: float, power: float = 1.0) -> np.ndarray:
    """From the rows of the words in file `words` (None: the whole token table, right for SD)."""
    if words is None:
        return zo.prior_sqrt(text.table, mix, power)
    path = Path(words)
    if not path.is_file():
        raise FileNotFoundError(f"--prior-words {path} is missing: give a text file of words, or leave it out "
                                "to use the whole token table")
    pieces = [p for w in path.read_text(encoding="utf-8").split() for p in text.tokenizer.tokenize(w)]
    ids = sorted({text.tokenizer.token_id(p) for p in pieces})
    if len(ids) < 2:
        raise ValueError(f"--prior-words {path} names {len(ids)} token(s); a covariance needs at least 2")
    return zo.prior_sqrt(np.asarray(text.table[ids], np.float32), mix, power)


def jacobian_moment(text: TextEncoder, prompts: list[tuple[np.ndarray, list[np.ndarray]]], v0: np.ndarray,
                    h: float = 1e-2, batch: int = 16) -> np.ndarray:
    """(d, d) float64 sum over prompts and vectors of J^T J, J = (77 d_out, d) finite-difference Jacobian.

    prompts: [(77, d) token rows, [(r_j,) positions of vector j]]; v0: (k, d) vectors. A prompt's J is
    held whole (SD 1.5: 59,136 x 768 float32 = 181 MB; J^T J is summed over float64 row slices, never a
    float64 copy of J). Built before the UNet loads the run's peak RSS does not grow (w8 replica, 256 px:
    1.17 GiB with or without); rebuilt next to it (--prior-refresh) neither (512 px: 1.28 vs 1.27 GiB).
    """
    d = v0.shape[1]
    m = np.zeros((d, d))
    for base, rows in prompts:
        emb = np.repeat(base[None], batch, axis=0)                      # (b, 77, d)
        for j, r in enumerate(rows):
            for i, rr in enumerate(rows):
                emb[:, rr] = v0[i]
            c0 = text.encode_embeds(emb)[0].reshape(-1)              # whole batch: static-batch models
            jac = np.empty((c0.size, d), np.float32)
            for s in range(0, d, batch):
                cols = np.arange(s, min(s + batch, d))
                pts = np.repeat(v0[j][None], batch, axis=0)
                pts[np.arange(len(cols)), cols] += h                    # unit steps along dims s..s+b
                emb[:, r] = pts[:, None]
                out = text.encode_embeds(emb)[:len(cols)].reshape(len(cols), -1)
                jac[:, cols] = ((out - c0) / h).T
            for i in range(0, len(jac), 4096):               # float64 in row slices: no second (rows, d) copy
                part = jac[i:i + 4096].astype(np.float64)
                m += part.T @ part
    return m


def jacobian_prior(text: TextEncoder, prompts, v0: np.ndarray, mix: float, batch: int = 16,
                   power: float = 1.0, rank: int = 0) -> np.ndarray:
    return zo.prior_from_moment(jacobian_moment(text, prompts, v0, batch=batch), mix, power, rank)


def build(directions: str, text: TextEncoder, words: str | None, mix: float, prompts, v0: np.ndarray,
          batch: int, power: float = 1.0, rank: int = 0) -> np.ndarray | None:
    """The (d, d) prior a direction kind needs (vocab or jacobian), None for the others.

    prompts: the templates' (rows, positions) whose J^T J a jacobian prior sums (TrainConfig.prior_prompts).
    """
    if directions == "vocab":
        return vocab_prior(text, words, mix, power)
    if directions == "jacobian":
        return jacobian_prior(text, prompts, v0, mix, batch, power, rank)
    return None


def check(cfg) -> None:
    """ValueError naming the option when a TrainConfig's prior settings cannot work together."""
    if not 0 <= cfg.prior_mix <= 1:
        raise ValueError(f"--prior-mix must be in [0, 1], got {cfg.prior_mix}")
    if cfg.prior_prompts < 1 or cfg.prior_rank < 0 or not 0 <= cfg.prior_refresh <= cfg.tau:
        raise ValueError(f"need --prior-prompts >= 1, --prior-rank >= 0, 0 <= --prior-refresh <= --tau (a resume "
                         f"rebuilds from the tau-step history); got {cfg.prior_prompts}, {cfg.prior_rank}, "
                         f"{cfg.prior_refresh}")
    if cfg.prior_refresh and cfg.directions != "jacobian":
        raise ValueError(f"--prior-refresh rebuilds a jacobian prior: use it with --directions jacobian "
                         f"(got {cfg.directions})")


def from_config(cfg, text: TextEncoder, args: tuple, v: np.ndarray) -> np.ndarray | None:
    """build() with a TrainConfig's prior settings; args = (prompts, batch) kept by the run."""
    return build(cfg.directions, text, cfg.prior_words, cfg.prior_mix, args[0], v, args[1], cfg.prior_power,
                 cfg.prior_rank)


def anchor(state: zo.ZOState, step: int, every: int, first: int, tau: int) -> np.ndarray | None:
    """(D,) the v a refreshed jacobian prior must be computed at before `step`, or None (keep the prior).

    Refreshes happen at steps 1 + j * every, at the v the step starts from. `first`: this process's first
    step; a resume inside a period rebuilds that period's prior from the history ring (every <= tau), so a
    resumed run repeats an uninterrupted one. Period 0's prior (at v0) is the one built when the run opens.
    """
    start = (step - 1) // every * every + 1                 # the period's first step
    if start == 1 or (step != start and step != first):
        return None
    return state.v.copy() if step == start else state.history[(start - 2) % tau].copy()
