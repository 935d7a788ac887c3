"""The ZOODiP optimizer core in NumPy: seeded perturbations, RGE/SPSA, PUTS, Subspace Gradient, ZO-Adam.

Pure functions of (vector, seed, step, config). Every random draw comes from a local
np.random.Generator keyed by (seed, step, stream), so nothing random is stored and a resumed
run repeats an uninterrupted one exactly. Vectors are flattened: D = num_vectors * d.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Stream ids keep the data draws and the perturbation directions independent.
_DATA, _DIRECTION, _SWEEP = 0, 1, 2
DIRECTIONS = ("gaussian", "orthogonal", "vocab", "jacobian", "guided")


@dataclass(frozen=True)
class ZOConfig:
    """Optimizer settings; defaults are the reference's (SD 1.5)."""

    queries: int = 2                 # n: CLIP-I peaked at n=2 in the paper's ablation (n+1 passes per step)
    mu: float = 1e-3                 # perturbation size; SD 2.x/SDXL use 1e-2
    estimator: str = "rge"           # rge: one-sided, n+1 passes; spsa: two-sided, 2n passes (scored worse)
    tau: int = 128                   # subspace: history length and refresh period
    nu: float = 1e-3                 # subspace: keep components explaining > 1 - nu of the variance
    subspace: bool = True            # Subspace Gradient on (paper's ablation: best with PUTS)
    # At most this share of the D dims is projected out. A tau=128 history removes <= 127 of SD 1.5's
    # 768 dims (16.5%), so 0.17 leaves the reference unchanged there; on a D=128 model the uncapped rule
    # froze 121 of 128 dims after the first refresh and halved toy-world concept fidelity.
    subspace_cap: float = 0.17
    lr: float = 5e-3                 # paper's learning rate (reference script: 1e-2)
    # constant: the reference. cosine: lr * (f + (1 - f)(1 + cos(pi t / T)) / 2) over T = horizon steps,
    # f = lr_final: ZO-Adam moves every coordinate each step, mostly along noise, so a late, smaller lr
    # shrinks the random walk around the solution that a constant lr keeps up to the end.
    lr_schedule: str = "constant"
    lr_final: float = 0.1
    horizon: int = 0                 # T of the schedule (the run's steps); unused when constant
    # The returned vector: 0 = the last iterate (reference); a > 0 = the bias-corrected EMA of the iterates
    # with decay a (0.998: about the last 500 steps), which averages out the walk the noisy steps leave.
    average: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # Adam defaults, as in the reference ZOAdam
    # coordinate: Adam's per-coordinate second moment (reference). global: one second moment, the mean of
    # g^2 over the D coordinates, so the step keeps the estimate's direction (a direction prior's shape
    # survives instead of every coordinate being rescaled to a step of ~lr).
    normalize: str = "coordinate"
    # Large on purpose: damps steps where the ZO second moment is tiny. On the toy world sqrt(s) ~ 4e-4 < eps,
    # so ZO-Adam acts as momentum SGD with lr / ~1.4e-3: the estimate's scale (n, a prior) sets the step.
    eps: float = 1e-3
    # gaussian: z ~ N(0, I) (the reference). orthogonal: sweeps of a seeded random orthonormal basis
    # scaled to |z|^2 = D, so D/n consecutive steps probe every direction once (lower-variance sums).
    # vocab: z ~ N(0, S), S the token table's covariance (see prior_sqrt), so queries favour the
    # directions in which words differ. jacobian: S = the text encoder's J^T J at v0 (priors.py).
    # guided: see guide_share.
    directions: str = "gaussian"
    # guided: z = sqrt(1 - s) eps + sqrt(s D) eta u, u = the unit Adam momentum (guided ES, Maheswaranathan
    # et al. 2019): a share s of each query's energy probes the direction the run is already moving in.
    guide_share: float = 0.5

    def __post_init__(self):
        if self.queries < 1:
            raise ValueError(f"queries must be >= 1, got {self.queries}")
        if not self.mu > 0:
            raise ValueError(f"mu must be > 0, got {self.mu}")
        if self.estimator not in ("rge", "spsa"):
            raise ValueError(f"estimator must be 'rge' or 'spsa', got {self.estimator!r}")
        if self.tau < 2:
            raise ValueError(f"tau must be >= 2 (PCA needs a history), got {self.tau}")
        if not 0 < self.nu < 1:
            raise ValueError(f"nu must be in (0, 1), got {self.nu}")
        if not 0 <= self.subspace_cap <= 1:
            raise ValueError(f"subspace_cap must be in [0, 1], got {self.subspace_cap}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.average < 1:
            raise ValueError(f"average must be in [0, 1) (an EMA decay; 0: last iterate), got {self.average}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not 0 <= self.lr_final <= 1:
            raise ValueError(f"lr_final must be in [0, 1] (a share of lr), got {self.lr_final}")
        if self.lr_schedule != "constant" and self.horizon < 1:
            raise ValueError(f"a {self.lr_schedule} lr schedule needs horizon >= 1 (the run's steps)")
        if self.directions not in DIRECTIONS:
            raise ValueError(f"directions must be one of {', '.join(DIRECTIONS)}, got {self.directions!r}")
        if not 0 <= self.guide_share < 1:
            raise ValueError(f"guide_share must be in [0, 1) (a share of each query's energy), got {self.guide_share}")
        if self.normalize not in ("coordinate", "global"):
            raise ValueError(f"normalize must be 'coordinate' or 'global', got {self.normalize!r}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")

    @property
    def passes(self) -> int:
        """Forward passes per step."""
        return self.queries + 1 if self.estimator == "rge" else 2 * self.queries


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The generator for a step's data draws (image, flip, prompt, t, noise)."""
    return np.random.default_rng([seed, step, _DATA])


def direction(seed: int, step: int, i: int, size: int, cfg: ZOConfig | None = None,
              prior: np.ndarray | None = None, guide: np.ndarray | None = None) -> np.ndarray:
    """(D,) direction z_i of query i of a step, regenerated from its seed whenever needed.

    gaussian: z ~ N(0, I_D). orthogonal: row k mod D of sweep k // D's orthonormal basis times sqrt(D),
    k = (step - 1) * n + i counting queries from the start of the run. vocab/jacobian: the gaussian draw
    mapped by the (d, d) symmetric square root `prior` of the covariance, vector by vector (D = k d).
    guided: sqrt(1 - s) eps + sqrt(s D) eta guide/|guide|, `guide` the (D,) Adam momentum before the
    step's update, so E[z z^T] = (1 - s) I + s D u u^T (trace D, like the others).
    """
    if cfg is None or cfg.directions in ("gaussian", "vocab", "jacobian"):
        z = np.random.default_rng([seed, step, _DIRECTION, i]).standard_normal(size, dtype=np.float32)
        if cfg is None or cfg.directions == "gaussian":
            return z
        if prior is None:
            raise ValueError(f"directions={cfg.directions!r} needs the prior matrix (see zo_runtime.priors)")
        return (z.reshape(-1, prior.shape[0]) @ prior).ravel()      # prior is symmetric: z A^T = z A
    if cfg.directions == "guided":
        rng = np.random.default_rng([seed, step, _DIRECTION, i])
        eps, eta = rng.standard_normal(size, dtype=np.float32), rng.standard_normal()
        norm = float(np.linalg.norm(guide)) if guide is not None else 0.0
        if norm == 0:                                   # step 1: no momentum yet
            return eps
        s = cfg.guide_share
        return np.sqrt(1 - s, dtype=np.float32) * eps + np.float32(np.sqrt(s * size) * eta / norm) * guide
    k = (step - 1) * cfg.queries + i
    return _sweep_basis(seed, k // size, size)[k % size] * np.float32(np.sqrt(size))


@lru_cache(maxsize=2)
def _sweep_basis(seed: int, sweep: int, size: int) -> np.ndarray:
    """(D, D) random orthonormal rows (QR of a seeded Gaussian matrix; D=768: ~0.1 s per D/n steps)."""
    a = np.random.default_rng([seed, sweep, _SWEEP]).standard_normal((size, size))
    q, r = np.linalg.qr(a)
    return np.ascontiguousarray((q * np.sign(np.diag(r))).T, dtype=np.float32)   # sign fix: Haar-distributed


def prior_sqrt(rows: np.ndarray, mix: float, power: float = 1.0) -> np.ndarray:
    """(d, d) symmetric A with A A = S = (1 - mix) C + mix I, C the (N, d) rows' covariance scaled to trace d.

    E|A z|^2 = d like a plain gaussian, so mu and the estimator's scale keep their meaning; mix > 0
    keeps every direction reachable (a concept may need one no word uses).
    """
    if not 0 <= mix <= 1:
        raise ValueError(f"prior mix must be in [0, 1], got {mix}")
    rows = np.asarray(rows)                              # may be a memory-mapped (V, d) table
    d, chunks = rows.shape[1], range(0, len(rows), 4096)  # float64 4096-row slices, never a (V, d) copy
    mean = np.zeros(d)
    for i in chunks:
        mean += np.asarray(rows[i:i + 4096], np.float64).sum(axis=0) / len(rows)
    cov = np.zeros((d, d))
    for i in chunks:
        c = np.asarray(rows[i:i + 4096], np.float64) - mean
        cov += c.T @ c / max(len(rows) - 1, 1)
    return prior_from_moment(cov, mix, power)


def prior_from_moment(moment: np.ndarray, mix: float, power: float = 1.0, rank: int = 0) -> np.ndarray:
    """(d, d) symmetric A with A A = S^power scaled to trace d, S = (1 - mix) M + mix I, M the (d, d) PSD
    `moment` scaled to trace d. power -1 with M = J^T J: z ~ N(0, S^-1), so E[g] = S^-1 grad, a
    Gauss-Newton step through the text encoder (flat directions of J get the queries, stiff ones few).

    rank k > 0: A A = P_k + mix (I - P_k), P_k the projector on M's top-k eigen-directions: every one of
    them equally (no ill-conditioning from M's spread), trace k + mix (d - k), the span estimate() divides by.
    """
    if not 0 <= mix <= 1:
        raise ValueError(f"prior mix must be in [0, 1], got {mix}")
    if rank > 0:
        _, v = np.linalg.eigh(moment)
        w = np.full(moment.shape[0], mix)
        w[-rank:] = 1.0                                   # eigh sorts ascending: the last k are the top k
        return ((v * np.sqrt(w)) @ v.T).astype(np.float32)
    if power != 1 and mix == 0:
        raise ValueError("a prior power other than 1 needs prior mix > 0 (M is singular)")
    d = moment.shape[0]
    moment = moment * (d / np.trace(moment) if np.trace(moment) > 0 else 0.0)
    w, v = np.linalg.eigh((1 - mix) * moment + mix * np.eye(d))
    if power == 1:                                        # trace is d already
        w = np.clip(w, 0, None)
    else:
        w = np.clip(w, mix, None) ** power
        w *= d / w.sum()
    return ((v * np.sqrt(w)) @ v.T).astype(np.float32)


def sample_timestep(rng: np.random.Generator, lo: int, hi: int) -> int:
    """PUTS: one t ~ Uniform{lo, ..., hi-1} shared by every pass of the step."""
    return int(rng.integers(lo, hi))


def query_points(v: np.ndarray, seed: int, step: int, cfg: ZOConfig, out: np.ndarray | None = None,
                 prior: np.ndarray | None = None, guide: np.ndarray | None = None) -> np.ndarray:
    """(P, D) points to evaluate: rge [v, v+mu z_1..n]; spsa [v+mu z_1, v-mu z_1, ...]."""
    out = np.empty((cfg.passes, v.size), np.float32) if out is None else out
    if cfg.estimator == "rge":
        out[0] = v
        for i in range(cfg.queries):
            np.multiply(direction(seed, step, i, v.size, cfg, prior, guide), cfg.mu, out=out[i + 1])
            out[i + 1] += v
    else:
        for i in range(cfg.queries):
            z = direction(seed, step, i, v.size, cfg, prior, guide) * np.float32(cfg.mu)
            out[2 * i] = v + z
            out[2 * i + 1] = v - z
    return out


def estimate(losses: np.ndarray, seed: int, step: int, size: int, cfg: ZOConfig, projected: int = 0,
             prior: np.ndarray | None = None, guide: np.ndarray | None = None) -> np.ndarray:
    """g = sum_i g_i z_i / (n sqrt((D' + n - 1) / n)), D' = D - projected dims (reference ZOAdam)."""
    losses = np.asarray(losses, dtype=np.float64)
    n = cfg.queries
    if cfg.estimator == "rge":
        coeffs = (losses[1:] - losses[0]) / cfg.mu               # (n,) directional derivatives
    else:
        coeffs = (losses[0::2] - losses[1::2]) / (2 * cfg.mu)
    g = np.zeros(size, np.float64)
    for i, c in enumerate(coeffs):
        g += c * direction(seed, step, i, size, cfg, prior, guide)
    # span: E|z|^2, the dims the queries spread over (D; a rank-k prior: k + mix (D - k) per vector), of
    # which the subspace projection takes its share projected / D
    span = size - projected if prior is None else \
        round(float(np.sum(prior * prior)) * size / prior.shape[0], 3) * (1 - projected / size)
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
    avg: np.ndarray | None = None   # (D,) EMA of v, not bias-corrected (ZOConfig.average > 0)

    @classmethod
    def start(cls, v: np.ndarray, cfg: ZOConfig) -> "ZOState":
        v = np.asarray(v, np.float32).ravel().copy()
        z = np.zeros_like(v)
        return cls(v, z, z.copy(), np.zeros((cfg.tau, v.size), np.float32), np.zeros((0, v.size), np.float32),
                   avg=z.copy())

    def arrays(self) -> dict[str, np.ndarray]:
        return {"v": self.v, "m": self.m, "s": self.s, "history": self.history, "basis": self.basis,
                "step": np.int64(self.step), "avg": self.avg if self.avg is not None else np.zeros_like(self.v)}

    @classmethod
    def from_arrays(cls, a) -> "ZOState":
        v, m, s, history, basis = (np.array(a[k], np.float32) for k in ("v", "m", "s", "history", "basis"))
        keys = a.files if hasattr(a, "files") else a                      # an open .npz or a dict
        avg = np.array(a["avg"], np.float32) if "avg" in keys else np.zeros_like(v)   # older checkpoints: none
        return cls(v, m, s, history, basis, step=int(a["step"]), avg=avg)


def result(state: ZOState, cfg: ZOConfig) -> np.ndarray:
    """(D,) the vector a run returns: the last iterate, or the bias-corrected EMA (cfg.average)."""
    if cfg.average == 0 or state.step == 0:
        return state.v
    return (state.avg / (1 - cfg.average ** state.step)).astype(np.float32)


def lr_at(cfg: ZOConfig, step: int) -> float:
    """Learning rate of update `step` (1-based); steps past the horizon keep the final rate."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    frac = min(step - 1, cfg.horizon) / cfg.horizon
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + np.cos(np.pi * frac)))


def adam_update(state: ZOState, g: np.ndarray, cfg: ZOConfig) -> None:
    """ZO-Adam with bias correction, no weight decay; updates state.v/m/s in place."""
    b1, b2 = cfg.betas
    t = state.step + 1
    state.m *= b1
    state.m += (1 - b1) * g
    state.s *= b2
    state.s += (1 - b2) * (g * g if cfg.normalize == "coordinate" else np.mean(g * g, dtype=np.float64))
    m_hat = state.m / (1 - b1 ** t)
    s_hat = state.s / (1 - b2 ** t)
    state.v -= (lr_at(cfg, t) * m_hat / (np.sqrt(s_hat) + cfg.eps)).astype(np.float32)


def update(state: ZOState, losses: np.ndarray, seed: int, cfg: ZOConfig, prior: np.ndarray | None = None) -> np.ndarray:
    """One optimizer step from the step's losses: estimate, project, Adam, history, PCA refresh.

    Returns the gradient actually applied (after projection). `prior`: see direction (vocab only).
    """
    step = state.step + 1
    g = estimate(losses, seed, step, state.v.size, cfg, projected=state.basis.shape[0], prior=prior,
                 guide=state.m if cfg.directions == "guided" else None)
    if cfg.subspace:
        g = project(g, state.basis)
    adam_update(state, g, cfg)
    if cfg.average:
        state.avg *= cfg.average
        state.avg += (1 - cfg.average) * state.v
    state.step = step
    state.history[(step - 1) % cfg.tau] = state.v
    if cfg.subspace and step % cfg.tau == 0:           # refresh after every tau updates
        state.basis = subspace_basis(state.history, cfg.nu, cfg.subspace_cap)
    return g
