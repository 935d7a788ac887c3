"""Perturbation directions for the ZO queries: which kinds exist, and the Jacobian subspace.

gaussian: z ~ N(0, I) (the reference). jacobian: queries spread evenly over the top-k eigen-directions
of the text encoder's J^T J at the current vector, plus `prior_mix` of the rest, with J^T J rebuilt
every `prior_refresh` steps; J = d(hidden states)/d(placeholder row) by finite differences (d + 1
text-encoder passes per prompt, no UNet pass). On the toy world the exact gradient puts 86-91% of its
energy in the top 16 of 128 such directions (docs/research.md), and the refreshed top-16 subspace
reached backprop TI's fidelity in 9,000 passes where isotropic queries needed 18,000.

Other kinds plug in from outside (bench/) with `register(name, builder)`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from . import zo

if TYPE_CHECKING:                      # a type only: this module never imports onnxruntime
    from .text import TextEncoder

# prompts a Jacobian is summed over: [((77, d) token rows, [(r_j,) positions of vector j])], and the
# text-encoder batch per call
PromptRows = tuple[list[tuple[np.ndarray, list[np.ndarray]]], int]
# builder(cfg, text encoder, prompt rows, (k, d) vectors to build at) -> directions
Builder = Callable[[object, "TextEncoder", PromptRows, np.ndarray], zo.Directions]


def jacobian_moment(text: TextEncoder, prompts, v0: np.ndarray, h: float = 1e-2, batch: int = 16) -> np.ndarray:
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


def jacobian_subspace(cfg, text: TextEncoder, prompts: PromptRows, v: np.ndarray) -> zo.Shaped:
    """Queries evenly over the top cfg.prior_rank directions of J^T J at v, cfg.prior_mix of the rest."""
    moment = jacobian_moment(text, prompts[0], v, batch=prompts[1])
    return zo.Shaped(zo.top_k_sqrt(moment, cfg.prior_rank, cfg.prior_mix))


BUILDERS: dict[str, Builder] = {
    "gaussian": lambda cfg, text, prompts, v: zo.Gaussian(),
    "jacobian": jacobian_subspace,
}


def register(name: str, builder: Builder) -> None:
    """Make `name` a TrainConfig.directions value (an experiment's directions, registered from bench/ before
    training through the library; the CLI offers the product's kinds)."""
    BUILDERS[name] = builder


def build(cfg, text: TextEncoder, prompts: PromptRows, v: np.ndarray) -> zo.Directions:
    """The directions cfg.directions names, built at the (k, d) vectors v."""
    return BUILDERS[cfg.directions](cfg, text, prompts, v)


def check(cfg) -> None:
    """ValueError naming the option when a TrainConfig's direction settings cannot work."""
    if cfg.directions is None:                # the schedule picks it (schedule.resolve checks again)
        return
    if cfg.directions not in BUILDERS:
        raise ValueError(f"--directions must be one of {', '.join(BUILDERS)}, got {cfg.directions!r}")
    if cfg.directions == "gaussian":          # the prior_* settings shape other kinds only
        return
    if not 0 <= cfg.prior_mix <= 1:
        raise ValueError(f"prior_mix must be in [0, 1], got {cfg.prior_mix}")
    if cfg.prior_prompts < 1 or cfg.prior_rank < 1 or not 0 <= cfg.prior_refresh <= cfg.tau:
        raise ValueError(f"need prior_prompts >= 1, prior_rank >= 1, 0 <= prior_refresh <= tau (a resume "
                         f"rebuilds from the tau-step history); got {cfg.prior_prompts}, {cfg.prior_rank}, "
                         f"{cfg.prior_refresh}")


def refreshes(cfg) -> bool:
    """Whether the run rebuilds its directions every cfg.prior_refresh steps (gaussian ones never change)."""
    return cfg.directions != "gaussian" and cfg.prior_refresh > 0


def anchor(state: zo.ZOState, step: int, every: int, first: int, tau: int) -> np.ndarray | None:
    """(D,) the v refreshed directions must be built at before `step`, or None (keep the current ones).

    Refreshes happen at steps 1 + j * every, at the v the step starts from. `first`: this process's first
    step; a resume inside a period rebuilds that period's directions from the history ring (every <= tau),
    so a resumed run repeats an uninterrupted one. Period 0's (at v0) are the ones built when the run opens.
    """
    start = (step - 1) // every * every + 1                 # the period's first step
    if start == 1 or (step != start and step != first):
        return None
    return state.v.copy() if step == start else state.history[(start - 2) % tau].copy()
