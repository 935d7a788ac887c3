"""The ZOODiP optimizer core in NumPy: seeded directions, RGE, PUTS, Subspace Gradient, ZO-Adam.

Pure functions of (vector, seed, step, config). Every random draw comes from a local
np.random.Generator keyed by (seed, step, stream), so nothing random is stored and a resumed
run repeats an uninterrupted one exactly. Vectors are flattened: D = num_vectors * d.

The seam for perturbation directions is a `Directions` object: it draws query i's z for (seed, step)
and says how many dims the draws spread over (E|z|^2), which the estimate divides by. The product
ships `Gaussian` (the reference) and `Shaped` (z = A g, e.g. the text encoder's Jacobian subspace,
built in priors.py); experiments register their own through priors.register.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Stream ids keep the data draws and the perturbation directions independent.
_DATA, _DIRECTION = 0, 1


@dataclass(frozen=True)
class ZOConfig:
    """Optimizer settings; defaults are the reference's (SD 1.5)."""

    queries: int = 2                 # n: CLIP-I peaked at n=2 in the paper's ablation (n+1 passes per step)
    mu: float = 1e-3                 # perturbation size; SD 2.x/SDXL use 1e-2
    tau: int = 128                   # subspace: history length and refresh period
    nu: float = 1e-3                 # subspace: keep components explaining > 1 - nu of the variance
    subspace: bool = True            # Subspace Gradient on (paper's ablation: best with PUTS)
    # At most this share of the D dims is projected out. A tau=128 history removes <= 127 of SD 1.5's
    # 768 dims (16.5%), so 0.17 leaves the reference unchanged there; on a D=128 model the uncapped rule
    # froze 121 of 128 dims after the first refresh and halved toy-world concept fidelity.
    subspace_cap: float = 0.17
    lr: float = 5e-3                 # paper's learning rate (reference script: 1e-2)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam defaults, as in the reference ZOAdam
    # Large on purpose: damps steps where the ZO second moment is tiny. On the toy world sqrt(s) ~ 4e-4 < eps,
    # so ZO-Adam acts as momentum SGD with lr / ~1.4e-3: the estimate's scale (n, a prior) sets the step.
    eps: float = 1e-3

    def __post_init__(self):
        if self.queries < 1:
            raise ValueError(f"queries must be >= 1, got {self.queries}")
        if not self.mu > 0:
            raise ValueError(f"mu must be > 0, got {self.mu}")
        if self.tau < 2:
            raise ValueError(f"tau must be >= 2 (PCA needs a history), got {self.tau}")
        if not 0 < self.nu < 1:
            raise ValueError(f"nu must be in (0, 1), got {self.nu}")
        if not 0 <= self.subspace_cap <= 1:
            raise ValueError(f"subspace_cap must be in [0, 1], got {self.subspace_cap}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")

    @property
    def passes(self) -> int:
        """Forward passes per step: the base pass and one per query."""
        return self.queries + 1


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The generator for a step's data draws (image, flip, prompt, t, noise)."""
    return np.random.default_rng([seed, step, _DATA])


class Directions(Protocol):
    def draw(self, seed: int, step: int, i: int, size: int) -> np.ndarray:
        """(D,) float32 direction z_i of query i of a step, regenerated from its seed whenever needed."""

    def span(self, size: int, projected: int) -> float:
        """E|z|^2 left once Subspace Gradient removes `projected` of the `size` dims."""


class Gaussian:
    """z ~ N(0, I_D): the reference's directions."""

    def draw(self, seed: int, step: int, i: int, size: int) -> np.ndarray:
        return np.random.default_rng([seed, step, _DIRECTION, i]).standard_normal(size, dtype=np.float32)

    def span(self, size: int, projected: int) -> float:
        return size - projected


class Shaped(Gaussian):
    """z = g A per vector (D = k d), g ~ N(0, I), A a (d, d) symmetric square root of the covariance."""

    def __init__(self, sqrt: np.ndarray):
        self.sqrt = sqrt
        self.trace = float(np.sum(sqrt * sqrt))       # E|z|^2 per vector = tr(A A): once per A, not per step

    def draw(self, seed: int, step: int, i: int, size: int) -> np.ndarray:
        z = super().draw(seed, step, i, size)
        return (z.reshape(-1, self.sqrt.shape[0]) @ self.sqrt).ravel()   # A symmetric: z A^T = z A

    def span(self, size: int, projected: int) -> float:
        # E|z|^2 over D dims, of which the subspace projection takes its share projected / D
        return round(self.trace * size / self.sqrt.shape[0], 3) * (1 - projected / size)


def top_k_sqrt(moment: np.ndarray, k: int, mix: float) -> np.ndarray:
    """(d, d) symmetric A with A A = P_k + mix (I - P_k), P_k the projector on the (d, d) PSD `moment`'s
    top-k eigen-directions: every one of them equally (no ill-conditioning from the moment's spread),
    the rest at `mix` so every direction stays reachable; E|z|^2 = k + mix (d - k)."""
    if not 0 <= mix <= 1:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    _, v = np.linalg.eigh(moment)
    w = np.full(moment.shape[0], mix)
    w[-k:] = 1.0                                      # eigh sorts ascending: the last k are the top k
    return ((v * np.sqrt(w)) @ v.T).astype(np.float32)


def sample_timestep(rng: np.random.Generator, lo: int, hi: int) -> int:
    """PUTS: one t ~ Uniform{lo, ..., hi-1} shared by every pass of the step."""
    return int(rng.integers(lo, hi))


def query_points(v: np.ndarray, seed: int, step: int, cfg: ZOConfig, dirs: Directions,
                 out: np.ndarray | None = None) -> np.ndarray:
    """(n+1, D) points to evaluate: [v, v + mu z_1, ..., v + mu z_n]."""
    out = np.empty((cfg.passes, v.size), np.float32) if out is None else out
    out[0] = v
    for i in range(cfg.queries):
        np.multiply(dirs.draw(seed, step, i, v.size), cfg.mu, out=out[i + 1])
        out[i + 1] += v
    return out


def estimate(losses: np.ndarray, seed: int, step: int, size: int, cfg: ZOConfig, dirs: Directions,
             projected: int = 0) -> np.ndarray:
    """g = sum_i g_i z_i / (n sqrt((D' + n - 1) / n)), D' = the span left after projection (reference ZOAdam)."""
    losses = np.asarray(losses, dtype=np.float64)
    n = cfg.queries
    coeffs = (losses[1:] - losses[0]) / cfg.mu                   # (n,) directional derivatives
    g = np.zeros(size, np.float64)
    for i, c in enumerate(coeffs):
        g += c * dirs.draw(seed, step, i, size)
    span = dirs.span(size, projected)
    return (g / (n * np.sqrt((span + n - 1) / n))).astype(np.float32)


def subspace_basis(history: np.ndarray, nu: float, cap: float = 1.0) -> np.ndarray:
    """(r, D) low-variance directions of a standardized (tau, D) history: PCA components[k+1:],
    at most floor(cap * D) of them (the lowest-variance ones)."""
    std = history.std(axis=0)
    x = (history - history.mean(axis=0)) / np.where(std > 0, std, 1.0)   # like sklearn's StandardScaler
    _, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    var = s ** 2
    if not var.sum() > 0:
        return np.zeros((0, history.shape[1]), np.float32)
    cum = np.cumsum(var / var.sum())
    hits = np.flatnonzero(cum > 1 - nu)
    k = int(hits[0]) if hits.size else len(cum) - 1   # index of the first component past 1 - nu
    start = max(k + 1, len(vt) - int(cap * history.shape[1]))
    return np.ascontiguousarray(vt[start:], dtype=np.float32)


def project(g: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """g - (g V^T) V: remove the (orthonormal) rows of V from g."""
    return g - (g @ basis.T) @ basis if basis.shape[0] else g


@dataclass
class ZOState:
    """Everything the optimizer carries between steps (checkpointed as is)."""

    v: np.ndarray          # (D,) current embedding, flattened
    m: np.ndarray          # (D,) Adam first moment
    s: np.ndarray          # (D,) Adam second moment
    history: np.ndarray    # (tau, D) ring buffer of v after each update
    basis: np.ndarray      # (r, D) directions projected out (r = 0 until the first refresh)
    step: int = 0          # updates done

    KEYS = ("v", "m", "s", "history", "basis")

    @classmethod
    def start(cls, v: np.ndarray, cfg: ZOConfig) -> "ZOState":
        v = np.asarray(v, np.float32).ravel().copy()
        return cls(v, np.zeros_like(v), np.zeros_like(v), np.zeros((cfg.tau, v.size), np.float32),
                   np.zeros((0, v.size), np.float32))

    def arrays(self) -> dict[str, np.ndarray]:
        return {**{k: getattr(self, k) for k in self.KEYS}, "step": np.int64(self.step)}

    @classmethod
    def from_arrays(cls, a) -> "ZOState":
        """From arrays() or an open checkpoint .npz (extra keys of older checkpoints are ignored)."""
        return cls(*(np.array(a[k], np.float32) for k in cls.KEYS), step=int(a["step"]))


def adam_update(state: ZOState, g: np.ndarray, cfg: ZOConfig) -> None:
    """ZO-Adam with bias correction, no weight decay; updates state.v/m/s in place."""
    b1, b2 = cfg.betas
    t = state.step + 1
    state.m *= b1
    state.m += (1 - b1) * g
    state.s *= b2
    state.s += (1 - b2) * (g * g)
    m_hat = state.m / (1 - b1 ** t)
    s_hat = state.s / (1 - b2 ** t)
    state.v -= (cfg.lr * m_hat / (np.sqrt(s_hat) + cfg.eps)).astype(np.float32)


def update(state: ZOState, losses: np.ndarray, seed: int, cfg: ZOConfig, dirs: Directions) -> np.ndarray:
    """One optimizer step from the step's losses: estimate, project, Adam, history, PCA refresh.

    Returns the gradient actually applied (after projection).
    """
    step = state.step + 1
    g = estimate(losses, seed, step, state.v.size, cfg, dirs, projected=state.basis.shape[0])
    if cfg.subspace:
        g = project(g, state.basis)
    adam_update(state, g, cfg)
    state.step = step
    state.history[(step - 1) % cfg.tau] = state.v
    if cfg.subspace and step % cfg.tau == 0:           # refresh after every tau updates
        state.basis = subspace_basis(state.history, cfg.nu, cfg.subspace_cap)
    return g
