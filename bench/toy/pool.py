"""Pool several bench.toy.quality results (seeds, concept draws) into one verdict with a confidence interval.

    python -m bench.toy.pool bench/results/toy_quality_3000.json bench/results/toy_quality_3000_seed2.json \
        --out bench/results/toy_quality_pooled.json

One 4-concept mean moves by ~0.1 from draw to draw, so a single draw cannot say whether a method is at
90% of backprop TI. Every (draw, concept) pair is one unit; for each method that ran on every unit of
a draw, the pooled mean of its final concept fidelity, and its ratio to backprop TI's with a paired
bootstrap 95% interval (units resampled with replacement; a unit keeps both methods' scores, so the
concept's difficulty cancels). Writes FILE.json, FILE.md and FILE_curve.png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from zo_runtime.io_utils import atomic_write_text

from .. import common
from .method import REPORTED, TI_METHODS, is_zo, label

REFERENCE = "backprop_ti"
RESAMPLES = 10_000     # bootstrap draws: the interval's ends move by < 0.01 between seeds at this count


def units(results: list[dict]) -> list[dict]:
    """[{'draw': seed, 'concept': name, method: final concept fidelity, ...}] over every file's concepts; files
    on the same draw add their methods to its units (a candidate screened later pairs with earlier runs)."""
    out: dict[tuple, dict] = {}
    for res in results:
        for spec, row in zip(res["concepts"], res["per_concept"]):
            key = (res["config"]["seed"], " ".join(spec["concept"]))
            unit = out.setdefault(key, {"draw": key[0], "concept": key[1], "prompt": {}, "curves": {}})
            unit.update({m: r["final"]["concept_fidelity"] for m, r in row.items()})
            unit["prompt"].update({m: r["final"]["prompt_fidelity"] for m, r in row.items()
                                   if "prompt_fidelity" in r["final"]})
            unit["curves"].update({m: [[p["forward_passes"], p["concept_fidelity"]] for p in r["curve"]]
                                   for m, r in row.items()})
    return list(out.values())


def curve_matrix(curves: list[list]) -> tuple[list, np.ndarray] | None:
    """(eval passes, (units, points) fidelities) of [[passes, fidelity], ...] curves, or None when the units'
    eval points differ."""
    passes = [p for p, _ in curves[0]]
    if any([p for p, _ in c] != passes for c in curves):
        return None
    return passes, np.array([[f for _, f in c] for c in curves])


def pooled_curve(rows: list[dict], method: str) -> list[list[float]] | None:
    """[[passes, mean fidelity]] over the units, or None when their eval points differ."""
    m = curve_matrix([r["curves"][method] for r in rows if method in r])
    return m and [[p, round(float(f), 4)] for p, f in zip(m[0], m[1].mean(axis=0))]


def resample(n: int, seed: int = 0) -> np.ndarray:
    """(RESAMPLES, n) unit indices of a paired bootstrap: both methods of a unit are drawn together."""
    return np.random.default_rng(seed).integers(0, n, (RESAMPLES, n))


def ratio_interval(ours: np.ndarray, ref: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """(mean(ours) / mean(ref), 2.5%, 97.5%) with paired bootstrap resampling of the units."""
    idx = resample(len(ours), seed)
    num, den = ours[idx].mean(axis=1), ref[idx].mean(axis=1)
    boot = num[den > 0] / den[den > 0]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(ours.mean() / ref.mean()), float(lo), float(hi)


def cluster_ratio_interval(ours: np.ndarray, ref: np.ndarray, groups: list[str], seed: int = 0) -> tuple[float, float]:
    """(2.5%, 97.5%) of mean(ours) / mean(ref) when whole groups are resampled: draws repeat held-out concepts
    (with new photos), so runs of one concept are not independent; resampling concepts is the cautious interval."""
    groups = np.asarray(groups)
    names = np.unique(groups)
    members = [np.flatnonzero(groups == n) for n in names]
    rng, boot = np.random.default_rng(seed), []
    for _ in range(RESAMPLES):
        idx = np.concatenate([members[k] for k in rng.integers(0, len(names), len(names))])
        if ref[idx].mean() > 0:
            boot.append(ours[idx].mean() / ref[idx].mean())
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(lo), float(hi)


def diff_interval(ours: np.ndarray, ref: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """(mean(ours - ref), 2.5%, 97.5%) with paired bootstrap resampling of the units."""
    d = ours - ref
    lo, hi = np.percentile(d[resample(len(d), seed)].mean(axis=1), [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def ratio_curve(both: list[dict], method: str, reference: str) -> list[list[float]] | None:
    """[[passes, ratio, 2.5%, 97.5%]]: the method's fidelity at each of its eval points over the reference's final
    one, paired on the same units (the moonshot: TI's level at half the passes); None when eval points differ."""
    m = curve_matrix([r["curves"][method] for r in both])
    if m is None:
        return None
    ref = np.array([r[reference] for r in both])
    return [[p, *(round(x, 3) for x in ratio_interval(m[1][:, i], ref))] for i, p in enumerate(m[0])]


def prompt_summary(rows: list[dict], method: str, reference: str) -> dict:
    """Prompt fidelity (the token must not swallow the prompt): the mean, and the paired difference to the
    reference's on the same units with its 95% interval."""
    mine = [r["prompt"][method] for r in rows if method in r.get("prompt", {})]
    if not mine:
        return {}
    out = {"prompt_fidelity": round(float(np.mean(mine)), 4)}
    both = [r for r in rows if method in r.get("prompt", {}) and reference in r.get("prompt", {})]
    if both and method != reference:
        d, lo, hi = diff_interval(*(np.array([r["prompt"][k] for r in both]) for k in (method, reference)))
        out.update(prompt_minus_ti=round(d, 4), prompt_minus_ti_ci95=[round(lo, 4), round(hi, 4)])
    return out


def pool(results: list[dict], reference: str = REFERENCE) -> dict:
    """Per method: units, pooled mean, and (when the reference ran on the same units) ratio and interval.

    reference: the backprop TI setting every ratio is taken against (the strongest one measured)."""
    rows = units(results)
    methods = [m for m in REPORTED if any(m in r for r in rows)]
    out = {}
    for m in methods:
        both = [r for r in rows if m in r and reference in r]
        mine = np.array([r[m] for r in rows if m in r])
        s = {"units": int(mine.size), "concept_fidelity": round(float(mine.mean()), 4)}
        if both and m != reference:
            ours, ref = (np.array([r[k] for r in both]) for k in (m, reference))
            ratio, lo, hi = ratio_interval(ours, ref)
            s.update(paired_units=len(both), reference_fidelity=round(float(ref.mean()), 4),
                     ratio_to_ti=round(ratio, 3), ratio_ci95=[round(lo, 3), round(hi, 3)],
                     wins=int(np.sum(ours > ref)), ties=int(np.sum(ours == ref)), losses=int(np.sum(ours < ref)))
        if both and m != reference and is_zo(m):
            s["ratio_curve"] = ratio_curve(both, m, reference)
        s.update(prompt_summary(rows, m, reference))
        s["curve"] = pooled_curve(rows, m)
        out[m] = s
    for m, s in out.items():            # passes to 90% of TI's final on the same runs, on the pooled curve
        if "reference_fidelity" in s and is_zo(m):
            target = 0.9 * s["reference_fidelity"]
            s["passes_to_90pct_ti"] = next((p for p, f in s["curve"] or [] if f >= target), None)
    return {"draws": sorted({r["config"]["seed"] for r in results}),
            "steps": sorted({r["config"]["steps"] for r in results}),
            "reference": reference, "units": rows, "methods": out}


def table(pooled: dict) -> str:
    ext = pooled.get("extended")
    steps = f"{ext['method']} continued to {ext['to'][-1]} steps" if ext else \
        f"{'/'.join(map(str, pooled['steps']))} steps"
    ref = label(pooled.get("reference", REFERENCE))
    lines = [f"Pooled over draws {pooled['draws']} ({len(pooled['units'])} concept runs), {steps}; "
             f"ratio = mean fidelity / {ref}'s on the same runs, 95% paired bootstrap interval.", "",
             "| method | runs | concept fidelity | TI on the same runs | ratio to TI | 95% interval "
             "| wins / ties / losses | passes to 90% of TI | ratio at half the passes | "
             "prompt fidelity (minus TI's, 95% interval) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m, s in pooled["methods"].items():
        if "ratio_to_ti" in s:
            lo, hi = s["ratio_ci95"]
            lines.append(f"| {label(m)} | {s['paired_units']} | {s['concept_fidelity']:.3f} | "
                         f"{s['reference_fidelity']:.3f} | {s['ratio_to_ti']:.2f} | {lo:.2f}-{hi:.2f} | "
                         f"{s['wins']} / {s['ties']} / {s['losses']} | {s.get('passes_to_90pct_ti') or '-'} | "
                         f"{_half_cell(s)} | {_prompt_cell(s)} |")
        else:
            lines.append(f"| {label(m)} | {s['units']} | {s['concept_fidelity']:.3f} | - | - | - | - | - | - | "
                         f"{_prompt_cell(s)} |")
    return "\n".join(lines) + "\n"


def _half_cell(s: dict) -> str:
    """The ratio (and interval) at the eval point with half the final passes, if there is one."""
    pts = s.get("ratio_curve") or []
    half = [r for r in pts if r[0] * 2 == pts[-1][0]]
    return f"{half[0][1]:.2f} ({half[0][2]:.2f}-{half[0][3]:.2f}) at {half[0][0]}" if half else "-"


def _prompt_cell(s: dict) -> str:
    if "prompt_fidelity" not in s:
        return "-"
    if "prompt_minus_ti" not in s:
        return f"{s['prompt_fidelity']:.3f}"
    lo, hi = s["prompt_minus_ti_ci95"]
    return f"{s['prompt_fidelity']:.3f} ({s['prompt_minus_ti']:+.3f}, {lo:+.3f} to {hi:+.3f})"


def curve_figure(pooled: dict, path: Path, methods: tuple[str, ...] | None = None) -> Path | None:
    """Pooled concept fidelity against forward passes, with TI's final level, its 90% and the pass goal.

    methods: default every method with a curve over as many units as the reference (no one-draw variants).
    """
    reference = pooled.get("reference", REFERENCE)
    full = pooled["methods"].get(reference, {}).get("units")
    methods = methods or tuple(m for m, s in pooled["methods"].items()
                               if s.get("units") == full and len(s.get("curve") or []) > 1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .report import save_curve

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in methods:
        s = pooled["methods"].get(m)
        if s and s["curve"]:
            xs, ys = zip(*s["curve"])
            fwd = " (fwd only)" if m in TI_METHODS else ""
            ax.plot(xs, ys, marker="o", label=f"{label(m)}{fwd}, {s['units']} runs")
    if reference in pooled["methods"]:
        ti = pooled["methods"][reference]["concept_fidelity"]
        ax.axhline(ti, ls=":", lw=0.8, color="black", label=f"{label(reference)}, final")
        ax.axhline(0.9 * ti, ls="--", lw=0.8, color="black", label="90% of it")
    return save_curve(fig, ax, path, f"toy world, pooled over draws {pooled['draws']}",
                      "concept fidelity (mean over runs)")


def write(pooled: dict, out: Path) -> None:
    """FILE.json, FILE.md and FILE_curve.png."""
    common.write_json(out, pooled)
    atomic_write_text(out.with_suffix(".md"), table(pooled))
    curve_figure(pooled, out.with_name(out.stem + "_curve.png"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="bench.toy.quality result JSON files")
    p.add_argument("--out", type=Path, required=True, help="pooled JSON (a .md table is written beside it)")
    p.add_argument("--reference", default=REFERENCE, choices=sorted(TI_METHODS),
                   help="the backprop TI setting ratios are taken against")
    a = p.parse_args(argv)
    missing = [str(f) for f in a.results if not f.is_file()]
    if missing:
        raise SystemExit(f"missing result file(s): {', '.join(missing)}; run bench.toy.quality first")
    pooled = pool([json.loads(f.read_text()) for f in a.results], a.reference)
    write(pooled, a.out)
    print(table(pooled))


if __name__ == "__main__":
    main()
