"""TrainConfig: every setting of one `zoodip train` run, its default and why (the CLI is generated from it)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from . import priors, prompts, zo
from .config import setting
from .plan import parse_duration
from .schedule import SCHEDULES

# Settings that may change between a run and its resume without changing the steps already taken.
RESUMABLE_CHANGES = {"steps", "save_every", "sample_every", "resume", "provider", "provider_options", "progress",
                     "schedule", "time_budget", "warmup_steps", "patience", "force"}
# Settings that shape the directions of every kind but gaussian (--directions jacobian).
JACOBIAN_SETTINGS = {"prior_rank", "prior_refresh", "prior_mix", "prior_prompts"}
VALIDATION_SETTINGS = {"val_every", "val_draws"}      # shape nothing when early_stop is off


@dataclass(frozen=True)
class TrainConfig:
    """One training run; defaults are the reference's (SD 1.5, method.md)."""

    token: str = setting(help="New placeholder token, e.g. sks (must not be in the vocabulary).", cli=True)
    init: str = setting(help="One existing token to start from, e.g. dog; words joined by + start from the "
                        "sum of their rows, e.g. dog+brown.", cli=True)
    init_candidates: str | None = setting(
        None, "Words to try adding to --init before step 1, comma-separated, e.g. brown,white,fluffy: the one "
        "that lowers the loss most on fixed draws is kept (UNet passes, at most init_draws x (words + 1); the "
        "fast schedule takes them off its steps). Recommended: words that may describe the subject beyond its "
        "class; on the toy world it took the fast schedule from 0.98x to 1.13x backprop TI [default: no search].",
        cli=True, metavar="WORDS")
    schedule: str = setting("fast", "Defaults for the settings left unset: fast, what the toy-world evidence "
                            "supports (docs/research.md); paper, the reference's (30,000 steps, lr 5e-3, "
                            "gaussian directions, no early stop).", cli=True, choices=tuple(SCHEDULES))
    steps: int | None = setting(None, "Training steps [default: the schedule's, or what fits --time-budget].",
                                cli=True)
    time_budget: str | None = setting(None, "Wall time for this call, e.g. 3h, 90m, 45s: the steps that fit "
                                      "after timing the first ones (--steps wins when given).", cli=True)
    lr: float | None = setting(None, "ZO-Adam learning rate [default: the schedule's].", cli=True)
    directions: str | None = setting(
        None, "Query directions [default: the schedule's]: gaussian, N(0, I) as the reference; jacobian, spread "
        "over the top prior_rank directions of the text encoder's J^T J, rebuilt every prior_refresh steps "
        "(text-encoder passes only).", cli=True, choices=("gaussian", "jacobian"))
    early_stop: bool | None = setting(None, "Keep the vector with the best loss on a fixed validation set and "
                                      "stop when it has not improved for `patience` checks [default: the "
                                      "schedule's].", cli=True)
    resolution: int | None = setting(None, "Training resolution in px [default: the model's native].", cli=True)
    templates: str = setting("object", "Prompt templates (diffusers' textual inversion lists); style for styles.",
                             cli=True, choices=tuple(prompts.TEMPLATES))
    captions: str | None = setting(None, "Per-image captions: JSON {image: caption} or `image<TAB>caption` "
                                   "lines, '{}' = the token (overrides --templates).", cli=True)
    seed: int = setting(0, "Seed of every random draw: step s derives from (seed, s), so resumes are exact.", cli=True)
    provider: str = setting("auto", "Execution provider: auto, cpu, cuda, dml, openvino, qnn, coreml.", cli=True)
    provider_options: tuple[tuple[str, str], ...] = setting(
        (), "Provider option KEY=VALUE, repeatable (e.g. device_type=CPU for openvino).", cli=True, metavar="KEY=VALUE",
        flag="--provider-option")
    resume: bool = setting(False, "Continue from OUT/checkpoint.npz.", cli=True)
    force: bool = setting(False, "Replace results in OUT that another run wrote (nothing is replaced "
                          "without it).", cli=True)
    # Method and run settings (--set NAME=VALUE).
    init_rounds: int = setting(1, "init_candidates: words the search adds at most (a round without a gain ends "
                               "it; 1 round beat 2 on the toy world).")
    init_draws: int = setting(16, "init_candidates: (image, t, noise) draws each candidate is scored on.")
    num_vectors: int = setting(1, "Vectors per token (sks, sks_1, ...); the reference trains one.")
    save_every: int = setting(500, "Checkpoint period in steps (reference save_steps); 0: only at the end.")
    queries: int = setting(2, "n: perturbations per step, n + 1 forward passes; best CLIP-I per pass in the paper.")
    mu: float | None = setting(None, "Perturbation size [default: what the model's quantization was validated "
                               "at, else the family's: SD 1.x 1e-3, SD 2.x / SDXL 1e-2].")
    t_range: tuple[int, int] | None = setting(None, "PUTS timestep range LO,HI: t < 500 carries almost no text "
                                              "signal [default: 500,900; SDXL 700,900]; 0,1000 = plain uniform.")
    tau: int = setting(128, "Subspace Gradient history length and refresh period.")
    nu: float = setting(1e-3, "Subspace Gradient keeps components explaining > 1 - nu of the variance.")
    subspace: bool = setting(True, "Subspace Gradient on (the paper's ablation: best with PUTS).")
    subspace_cap: float = setting(0.17, "Largest share of the dims Subspace Gradient may remove: the reference "
                                  "on SD (D >= 768), no lock-in at D = 128 (zo.ZOConfig).")
    prior_rank: int = setting(16, "jacobian: the top directions queries spread over evenly.")
    prior_refresh: int = setting(125, "jacobian: rebuild J^T J at the current vector every this many steps "
                                 "(<= tau; 0: at the start only).")
    prior_mix: float = setting(0.1, "jacobian: weight of every other direction (keeps them reachable).")
    prior_prompts: int = setting(4, "jacobian: templates J^T J is summed over ((d + 1) text-encoder passes each).")
    val_every: int = setting(100, "early_stop: steps between validation checks (val_draws base passes each).")
    val_draws: int = setting(8, "early_stop: (image, t, noise) draws of the validation set; with val_every 100 "
                             "they cost 2.7% of a 3-pass step's passes.")
    patience: int = setting(5, "early_stop: checks without a new best before the run stops.")
    large_resolution: bool = setting(False, "Allow --resolution above 2x the model's native size (memory and "
                                     "time grow with the pixels).")
    warmup_steps: int = setting(3, "Steps timed for the plan (the first is left out: one-off start costs).")
    latent: str = setting("sample", "x0 per step: a VAE posterior sample (reference) or its mean.",
                          choices=("sample", "mean"))
    # single: n+1 UNet calls; batch: one call of n+1. SD 1.5 replica, CPU: single peaks at 5.5 GB vs >= 8.6 GB
    # batched at 512 px (attention maps x3) and was no slower (256 px: 26.7 vs 30.4 s/step).
    unet_batch: str = setting("single", "UNet passes of a step one by one (least memory) or as one batch "
                              "(may be faster on GPUs/NPUs).", choices=("single", "batch"))
    sample_every: int = setting(0, "Sample grid period in steps; 0: off.")
    progress: bool = setting(True, "Show a progress bar.")

    def __post_init__(self):
        if self.t_range is not None:
            object.__setattr__(self, "t_range", tuple(int(t) for t in self.t_range))
            lo, hi = self.t_range
            if not 0 <= lo < hi <= 1000:
                raise ValueError(f"t_range {lo},{hi} must satisfy 0 <= LO < HI <= num_train_timesteps (1000)")
        object.__setattr__(self, "provider_options", tuple(tuple(p) for p in self.provider_options))
        for name in ("lr", "mu", "nu", "subspace_cap", "prior_mix"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.resolution is not None and self.resolution <= 0:
            raise ValueError(f"--resolution must be a positive number of pixels (e.g. 512), got {self.resolution}; "
                             "leave it out for the model's native size")
        zo.ZOConfig(queries=self.queries, mu=self.mu or 1.0, tau=self.tau, nu=self.nu,
                    subspace_cap=self.subspace_cap, lr=self.lr or 1.0)      # validates the optimizer fields
        self.init_words()                                        # ValueError names the fix
        for name in ("steps", "num_vectors", "val_every", "val_draws", "init_rounds", "init_draws"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if min(self.save_every, self.sample_every, self.patience, self.warmup_steps) < 0:
            raise ValueError("save_every, sample_every, patience and warmup_steps must be >= 0")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        if not self.token.strip() or " " in self.token:
            raise ValueError(f"--token must be one word such as 'sks', got {self.token!r}")
        prompts.templates(self.templates)
        priors.check(self)
        if self.latent not in ("sample", "mean"):
            raise ValueError(f"latent must be 'sample' or 'mean', got {self.latent!r}")
        if self.unet_batch not in ("batch", "single"):
            raise ValueError(f"unet_batch must be 'batch' or 'single', got {self.unet_batch!r}")

    @property
    def passes(self) -> int:
        """Forward passes per step (known before the schedule is resolved)."""
        return self.queries + 1

    def init_words(self) -> tuple[str, ...]:
        """--init-candidates as words, those already in --init left out: 'red, blue' -> ('red', 'blue')."""
        if self.init_candidates is None:
            return ()
        words = [w.strip() for w in str(self.init_candidates).split(",")]
        bad = [w for w in words if not w or len(w.split()) != 1 or "+" in w]
        if bad:
            raise ValueError(f"--init-candidates {self.init_candidates!r}: give single words separated by commas, "
                             f"e.g. red,blue,striped (not {', '.join(repr(w) for w in bad)})")
        if self.token in words:
            raise ValueError(f"--init-candidates names {self.token!r}, the token being learned: leave it out")
        used = self.init.split("+")
        return tuple(w for w in dict.fromkeys(words) if w not in used)

    def init_search_passes(self) -> int:
        """UNet passes an --init-candidates search spends at most: the start, then per round (init_rounds)
        every word not yet used, each on init_draws draws (init_search.py)."""
        if self.init_candidates is None:
            return 0
        n = len(self.init_words())
        return self.init_draws * (1 + sum(max(n - r, 0) for r in range(self.init_rounds)))

    @property
    def zo(self) -> zo.ZOConfig:
        if self.mu is None or self.lr is None:
            raise ValueError("this TrainConfig is not resolved yet (schedule.resolve fills mu, lr, steps, ...)")
        return zo.ZOConfig(queries=self.queries, mu=self.mu, tau=self.tau, nu=self.nu, subspace=self.subspace,
                           subspace_cap=self.subspace_cap, lr=self.lr)

    def as_dict(self) -> dict:
        """JSON-ready settings (tuples as lists), as config.json and the checkpoint record them."""
        return json.loads(json.dumps(asdict(self)))

    def trajectory(self) -> dict:
        """The settings a resumed run must share with its checkpoint (those that shape its steps)."""
        return trajectory(self.as_dict())


def trajectory(settings: dict) -> dict:
    """trajectory() of a recorded (resolved) settings dict; a key a checkpoint predates had its old behaviour."""
    out = {**DEFAULTS, **PREDATED, **settings}
    drop = (RESUMABLE_CHANGES | (JACOBIAN_SETTINGS if out["directions"] == "gaussian" else set())
            | (VALIDATION_SETTINGS if not out["early_stop"] else set()))
    return {k: v for k, v in out.items() if k in DEFAULTS and k not in drop}


DEFAULTS = TrainConfig(token="sks", init="dog").as_dict()
# What a checkpoint written before a setting existed did (settings are added with the old behaviour).
PREDATED = {"early_stop": False}
