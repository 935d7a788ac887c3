"""Where a run's unset settings come from: the schedule (fast | paper), the model family and its manifest.

TrainConfig leaves steps, lr, directions, early_stop, mu and t_range unset (None) unless the user gives
them; `resolve` fills them once the model is known, so config.json and the checkpoint hold the values
the run really used.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

# The settings each schedule picks. paper: the reference's (method.md); fast: what the toy-world
# evidence supports, confirmed on draws no earlier tuning looked at (docs/schedule.md: seeds 21 and 22,
# 8 concept runs: 0.97x backprop TI, 1.27x the same schedule with Gaussian directions).
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


def validated_mus(manifest: dict) -> list[float] | None:
    """The mus the quantization's ZO gate held at (manifest "zo_validated_mus"; older folders: from their gate
    results); None when the model was never gated (fp32, or quantized with the gates off)."""
    if "zo_validated_mus" in manifest:
        return [float(m) for m in manifest["zo_validated_mus"]]
    gates = manifest.get("gates") or {}
    if not gates.get("zo"):
        return None
    floor = (gates.get("thresholds") or {}).get("zo_corr_min", 0.0)
    return sorted(float(mu) for mu, g in gates["zo"].items() if g.get("corr", 0.0) >= floor)


def mu_warning(manifest: dict, mu: float) -> str | None:
    """Why training at `mu` is outside what the model's quantization validated (None: inside, or never gated).

    The bar is the mu the quantization recorded for training (w8-fast's "train_defaults"), else the smallest
    validated one: rounding noise in a finite difference shrinks as mu grows, so a larger mu is covered, and on
    the toy world w8-fast below its recorded mu lost 28% of its fidelity though its gate held there.
    """
    validated, scheme = validated_mus(manifest), manifest.get("scheme")
    if validated is None or scheme in (None, "fp32"):
        return None
    if not validated:
        return (f"this {scheme} model passed its ZO gate at no mu: its finite differences may be rounding noise; "
                "quantize again with --scheme w8")
    bar = float((manifest.get("train_defaults") or {}).get("mu") or min(validated))
    if mu >= bar * (1 - 1e-9):
        return None
    corr = ((manifest.get("gates") or {}).get("zo") or {}).get(f"{mu:g}", {}).get("corr")
    seen = f" (ZO correlation {corr:.2f} there)" if corr is not None else ""
    return (f"mu {mu:g} is below the mu this {scheme} model's quantization validated for training, {bar:g}{seen}: "
            f"its rounding may drown the finite differences; train with --set mu={bar:g} (or leave mu unset), or "
            "on a --scheme w8 model")


def resolve(cfg, manifest: dict):
    """cfg with every unset setting filled from its schedule, the model family and the model's manifest.

    steps: the schedule's, less the whole steps an --init-candidates search may spend (same passes in all).
    mu: the one the model's quantization validated for training (manifest "train_defaults", w8-fast), else
    the family's. Warns (with the fix) when the mu used is below what the model's ZO gate validated.
    """
    base = defaults(cfg.schedule, manifest.get("family", "sd1"))
    base.update({k: v for k, v in (manifest.get("train_defaults") or {}).items() if k in ("mu", "lr")})
    filled = {k: v for k, v in base.items() if getattr(cfg, k) is None}
    if "steps" in filled:                   # the schedule's passes include an init search's (init_search.py)
        filled["steps"] = max(1, filled["steps"] - math.ceil(cfg.init_search_passes() / cfg.passes))
    out = dataclasses.replace(cfg, **filled)
    why = mu_warning(manifest, out.mu)
    if why:
        warnings.warn(why, stacklevel=2)
    return out
