"""Where a run's unset settings come from: the schedule (fast | paper), the model family and its manifest.

TrainConfig leaves steps, lr, directions, early_stop, mu and t_range unset (None) unless the user gives
them; `resolve` fills them once the model is known, so config.json and the checkpoint hold the values
the run really used.
"""
from __future__ import annotations

import dataclasses
import warnings

# The settings each schedule picks. paper: the reference's (method.md); fast: what the toy-world
# evidence supports (docs/research.md: decided on draws no earlier tuning looked at).
SCHEDULES = {
    "fast": {"steps": 3000, "lr": 5e-3, "directions": "jacobian", "early_stop": False},
    "paper": {"steps": 30000, "lr": 5e-3, "directions": "gaussian", "early_stop": False},
}
# Per model family (manifest "family"): the reference's mu and PUTS range, and where the paper's schedule
# differs (SD 2.1: lr 1e-2; SDXL: 20,000 iterations).
FAMILIES = {
    "sd1": {"mu": 1e-3, "t_range": (500, 900)},
    "sd2": {"mu": 1e-2, "t_range": (500, 900), "paper": {"lr": 1e-2}},
    "sdxl": {"mu": 1e-2, "t_range": (700, 900), "paper": {"steps": 20000},
             "fast": {"directions": "gaussian"}},      # Jacobian directions are built for one text encoder
}


def defaults(schedule: str, family: str) -> dict:
    """The settings `schedule` gives a model of `family` (unknown families: SD 1.x's)."""
    fam = FAMILIES.get(family, FAMILIES["sd1"])
    return {**SCHEDULES[schedule], "mu": fam["mu"], "t_range": fam["t_range"], **fam.get(schedule, {})}


def validated_mus(manifest: dict) -> dict[float, float]:
    """{mu: ZO correlation} of the quantization gate, for the mus where it held (empty: not quantized)."""
    gates = manifest.get("gates") or {}
    floor = (gates.get("thresholds") or {}).get("zo_corr_min", 0.0)
    return {float(mu): g["corr"] for mu, g in (gates.get("zo") or {}).items() if g.get("corr", 0.0) >= floor}


def resolve(cfg, manifest: dict):
    """cfg with every unset setting filled from its schedule, the model family and the model's manifest.

    mu: the one the model's quantization recorded for training (manifest "training"), else the family's.
    Warns (with the fix) when the mu used is not one the model's ZO gate was validated at.
    """
    base = defaults(cfg.schedule, manifest.get("family", "sd1"))
    base.update({k: v for k, v in (manifest.get("training") or {}).items() if k in ("mu", "lr")})
    filled = {k: v for k, v in base.items() if getattr(cfg, k) is None}
    out = dataclasses.replace(cfg, **filled)
    checked = validated_mus(manifest)
    if manifest.get("scheme", "fp32") != "fp32" and out.mu not in checked:
        at = ", ".join(f"mu {m:g} (correlation {c:.2f})" for m, c in sorted(checked.items())) or "no mu"
        warnings.warn(f"this {manifest.get('scheme')} model's ZO gate held at {at}, not at the mu {out.mu:g} this "
                      f"run uses: train with --set mu=<one of those>, or quantize again and check the gate at "
                      f"{out.mu:g}", stacklevel=2)
    return out
