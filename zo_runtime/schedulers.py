"""NumPy samplers matching diffusers' DDIM, Euler, Euler ancestral and DPM-Solver++ 2M (SD defaults).

Each scheduler works by step index i (0..N-1), not by timestep lookup:
    x = noise * s.init_noise_sigma
    for i, t in enumerate(s.timesteps):
        out = unet(s.scale_model_input(x, i), t, cond)
        x = s.step(out, i, x, rng)
Timestep spacing, steps_offset and set_alpha_to_one come from the model's scheduler_config.json as
diffusers' `from_config` would read them (a key that is absent takes the target class's default).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .model_dir import alphas_cumprod

NAMES = ("ddim", "euler", "euler-a", "dpm++2m")
SPACINGS = ("leading", "trailing", "linspace")
# diffusers' class defaults for timestep_spacing, used when scheduler_config.json does not say.
DEFAULT_SPACING = {"ddim": "leading", "euler": "linspace", "euler-a": "linspace", "dpm++2m": "linspace"}


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule and sampling conventions of one model."""

    num_train_timesteps: int = 1000       # SD 1.x/2.x
    beta_start: float = 0.00085           # SD's scaled_linear schedule
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"      # SD 2.x 768 px models: v_prediction
    steps_offset: int = 1                 # SD configs: leading timesteps start at 1, not 0
    set_alpha_to_one: bool = False        # SD configs: DDIM's last step lands on alpha_cumprod[0]
    timestep_spacing: str | None = None   # None: the default of the chosen scheduler class

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported (epsilon, v_prediction)")
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ValueError(f"beta schedule {self.beta_schedule!r} is not supported (scaled_linear, linear)")
        if self.timestep_spacing not in (None, *SPACINGS):
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r} is not one of {SPACINGS}")

    @classmethod
    def from_config(cls, config: dict, manifest: dict | None = None) -> "NoiseSchedule":
        """From a diffusers scheduler_config.json dict; manifest values (if given) take precedence."""
        merged = {**config, **{k: v for k, v in (manifest or {}).items() if k in cls.__dataclass_fields__}}
        return cls(**{k: merged[k] for k in cls.__dataclass_fields__ if k in merged and merged[k] is not None})

    @classmethod
    def from_model(cls, model) -> "NoiseSchedule":
        """From a ModelDir: scheduler/scheduler_config.json for conventions, manifest for the schedule."""
        path = Path(model.root) / "scheduler" / "scheduler_config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
        return cls.from_config(config, model.manifest)

    def alphas_cumprod(self) -> np.ndarray:
        """(T,) float64 cumulative product of alphas."""
        return alphas_cumprod(self.beta_schedule, self.beta_start, self.beta_end, self.num_train_timesteps)


def _spaced(schedule: NoiseSchedule, spacing: str, n: int, extra: int = 0) -> np.ndarray:
    """Descending float timesteps for n steps, as diffusers computes them (DPM uses n + 1 then drops one)."""
    T, m = schedule.num_train_timesteps, n + extra
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, m)[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, m) * (T // m)).round()[::-1] + schedule.steps_offset
    else:  # trailing
        ts = np.arange(T, 0, -T / n).round() - 1
    return ts[:n].astype(np.float64)


class Scheduler:
    """Base: holds timesteps (what the UNet is fed) and alphas_cumprod; subclasses define step()."""

    name = ""

    def __init__(self, schedule: NoiseSchedule, num_steps: int):
        if num_steps < 1 or num_steps > schedule.num_train_timesteps:
            raise ValueError(f"steps must be in 1..{schedule.num_train_timesteps}, got {num_steps}")
        self.schedule = schedule
        self.num_steps = num_steps
        self.spacing = schedule.timestep_spacing or DEFAULT_SPACING[self.name]
        self.alphas_cumprod = schedule.alphas_cumprod()
        self.v_pred = schedule.prediction_type == "v_prediction"
        self.init_noise_sigma = 1.0

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray,
             rng: np.random.Generator | None = None, noise: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError


class DDIM(Scheduler):
    """Deterministic DDIM (eta = 0)."""

    name = "ddim"

    def __init__(self, schedule: NoiseSchedule, num_steps: int):
        super().__init__(schedule, num_steps)
        T = schedule.num_train_timesteps
        if self.spacing == "linspace":
            self.timesteps = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
        else:
            self.timesteps = _spaced(schedule, self.spacing, num_steps).astype(np.int64)
        self.final_alpha = 1.0 if schedule.set_alpha_to_one else float(self.alphas_cumprod[0])

    def step(self, model_output, i, sample, rng=None, noise=None):
        t = int(self.timesteps[i])
        prev = t - self.schedule.num_train_timesteps // self.num_steps   # diffusers' rule for every spacing
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha
        if self.v_pred:
            x0 = a_t ** 0.5 * sample - (1 - a_t) ** 0.5 * model_output
            eps = a_t ** 0.5 * model_output + (1 - a_t) ** 0.5 * sample
        else:
            x0 = (sample - (1 - a_t) ** 0.5 * model_output) / a_t ** 0.5
            eps = model_output
        return (a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps).astype(np.float32)


class _Sigmas(Scheduler):
    """Shared by the k-diffusion-style samplers: sigma = sqrt((1 - a) / a) interpolated at float timesteps."""

    def __init__(self, schedule: NoiseSchedule, num_steps: int, extra: int = 0):
        super().__init__(schedule, num_steps)
        ts = _spaced(schedule, self.spacing, num_steps, extra)
        if extra:       # DPM-Solver rounds to int timesteps before interpolating
            ts = ts.round().astype(np.int64).astype(np.float64)
        ac = self.alphas_cumprod
        full = ((1 - ac) / ac) ** 0.5
        self.timesteps = ts
        self.sigmas = np.append(np.interp(ts, np.arange(len(full)), full), 0.0)   # (N + 1,), last = 0

    def x0(self, out: np.ndarray, sigma: float, sample: np.ndarray) -> np.ndarray:
        """Predicted clean latent in the sigma (variance-exploding) parametrization."""
        if self.v_pred:
            return out * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
        return sample - sigma * out


class Euler(_Sigmas):
    name = "euler"

    def __init__(self, schedule: NoiseSchedule, num_steps: int):
        super().__init__(schedule, num_steps)
        smax = float(self.sigmas.max())
        self.init_noise_sigma = smax if self.spacing in ("linspace", "trailing") else (smax ** 2 + 1) ** 0.5

    def scale_model_input(self, sample, i):
        return (sample / (self.sigmas[i] ** 2 + 1) ** 0.5).astype(np.float32)

    def step(self, model_output, i, sample, rng=None, noise=None):
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        d = (sample - self.x0(model_output, s, sample)) / s
        return (sample + d * (s_next - s)).astype(np.float32)


class EulerAncestral(Euler):
    """Euler with fresh noise each step; pass `noise` (parity tests) or a seeded `rng`."""

    name = "euler-a"

    def step(self, model_output, i, sample, rng=None, noise=None):
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        s_up = (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5
        s_down = (s_next ** 2 - s_up ** 2) ** 0.5
        d = (sample - self.x0(model_output, s, sample)) / s
        if noise is None:
            if rng is None:
                raise ValueError("euler-a needs an rng (or noise) for its ancestral noise")
            noise = rng.standard_normal(sample.shape, dtype=np.float32)
        return (sample + d * (s_down - s) + noise * s_up).astype(np.float32)


class DPMSolverPP2M(_Sigmas):
    """DPM-Solver++ (2M, midpoint), lower-order first and final steps as diffusers' SD defaults."""

    name = "dpm++2m"

    def __init__(self, schedule: NoiseSchedule, num_steps: int):
        super().__init__(schedule, num_steps, extra=1)
        self.prev_x0: np.ndarray | None = None

    def step(self, model_output, i, sample, rng=None, noise=None):
        if i == 0:
            self.prev_x0 = None                            # a new sampling run
        s0, s_t = self.sigmas[i], self.sigmas[i + 1]       # sigma = sqrt((1 - a) / a); the last one is 0
        a_s0, a_t = 1 / (s0 ** 2 + 1) ** 0.5, 1 / (s_t ** 2 + 1) ** 0.5
        if self.v_pred:
            x0 = a_s0 * sample - s0 * a_s0 * model_output
        else:
            x0 = (sample - s0 * a_s0 * model_output) / a_s0
        # lambda = log(alpha / sigma_vp) = -log(sigma), so exp(-h) = s_t / s0 (0 on the final step: no log(0)).
        decay = s_t / s0
        out = (s_t * a_t) / (s0 * a_s0) * sample + a_t * (1 - decay) * x0
        # Second order except on the first step and on the last (final_sigmas_type "zero" makes it first order).
        if self.prev_x0 is not None and i < self.num_steps - 1:
            h, h0 = np.log(s0 / s_t), np.log(self.sigmas[i - 1] / s0)
            out = out + 0.5 * a_t * (1 - decay) * (x0 - self.prev_x0) * (h / h0)
        self.prev_x0 = x0
        return out.astype(np.float32)


CLASSES = {c.name: c for c in (DDIM, Euler, EulerAncestral, DPMSolverPP2M)}


def make_scheduler(name: str, schedule: NoiseSchedule, num_steps: int) -> Scheduler:
    """A fresh scheduler by CLI name (ddim, euler, euler-a, dpm++2m)."""
    if name not in CLASSES:
        raise ValueError(f"unknown scheduler {name!r}: choose one of {', '.join(NAMES)}")
    return CLASSES[name](schedule, num_steps)
