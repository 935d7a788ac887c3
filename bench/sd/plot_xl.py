"""SDXL figure and tables from the JSON results: training peak RSS against resolution (PyTorch TI, zoodip w8) with
the machine's memory, and the replica / export / quantize stages.

    python -m bench.sd.plot_xl --ti bench/results/sdxl_torch_ti.json \\
        --zoodip bench/results/sdxl_zoodip_512.json bench/results/sdxl_zoodip_1024.json \\
        --stages bench/results/sdxl_memory_full.json --png bench/results/sdxl_memory.png \\
        --table bench/results/sdxl_table.md

TI resolutions that did not fit under the run's RLIMIT_DATA are drawn as hollow markers at their measured lower
bound (resident weights + what autograd keeps for backward, from a forward-only run), with an arrow up.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from zo_runtime.io_utils import atomic_write, atomic_write_text

GOAL_ZOODIP_1024_GB = 4.5    # issue #18: one zoodip w8 step at 1024 px
GOAL_STAGE_GB = 20.0         # issue #18: export and quantize peak RSS


def _load(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing: run the benchmark that writes it first (see docs/sdxl.md)")
    return json.loads(p.read_text())


def _fmt(x, nd=2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def ti_points(ti: dict) -> list[dict]:
    """Per resolution: px, fits, peak (measured) or bound (lower bound), step seconds, the run's limit."""
    out = []
    for px, e in sorted(ti.get("resolutions", {}).items(), key=lambda kv: int(kv[0])):
        s = e.get("saved_only") or {}
        out.append({"px": int(px), "fits": bool(e.get("fits")), "peak": e.get("peak_rss_gb") if e.get("fits") else None,
                    "bound": s.get("lower_bound_step_peak_gb") if s.get("fits") else None,
                    "step": e.get("step_seconds"), "cpu": e.get("step_cpu_seconds"),
                    "limit": e.get("needs_more_than_gb") or (e.get("process") or {}).get("data_limit_gb"),
                    "needs_more": e.get("needs_more_than_gb"), "error": e.get("error"),
                    "machine_low": e.get("machine_low"), "saved_gb": s.get("saved_tensor_gb"),
                    "weights_rss": s.get("loaded_rss_gb")})
    return out


def ti_estimate(points: list[dict]) -> tuple[float, float] | None:
    """(c, b) of peak = c + b * px^2, fit to the resolutions that fit (resident weights plus activations that
    grow with the latent's area; CPU SDPA keeps attention linear in tokens); None with fewer than 2 points."""
    fit = [(p["px"] ** 2, p["peak"]) for p in points if p["fits"]]
    if len(fit) < 2:
        return None
    n = len(fit)
    mx, my = sum(x for x, _ in fit) / n, sum(y for _, y in fit) / n
    b = sum((x - mx) * (y - my) for x, y in fit) / sum((x - mx) ** 2 for x, _ in fit)
    return my - b * mx, b


def estimated_peak(points: list[dict], px: int) -> float | None:
    cb = ti_estimate(points)
    return None if cb is None else round(cb[0] + cb[1] * px * px, 1)


def zoodip_points(runs: list[dict]) -> list[dict]:
    out = []
    for r in runs:
        px = r.get("config", {}).get("resolution")
        out.append({"px": int(px), "peak": r.get("peak_rss_gb"), "training_peak": r.get("peak_rss_training_gb"),
                    "step": r.get("step_seconds"), "cpu": r.get("step_cpu_seconds"),
                    "unet": r.get("unet_seconds_per_step"), "passes": r.get("forward_passes_per_step"),
                    "scheme": r.get("scheme") or "fp32", "torch": r.get("torch_imported")})
    return sorted(out, key=lambda p: p["px"])


def training_table(ti: dict, zoodip: list[dict]) -> str:
    lines = ["| method | px | peak RSS (GiB) | step wall (s) | step CPU (s) | passes / step | note |",
             "|---|---|---|---|---|---|---|"]
    for p in zoodip_points(zoodip):
        goal = ""
        if p["px"] == 1024:
            goal = f"goal <= {GOAL_ZOODIP_1024_GB} GiB: {'met' if p['peak'] <= GOAL_ZOODIP_1024_GB else 'NOT met'}"
        lines.append(f"| zoodip {p['scheme']} | {p['px']} | {_fmt(p['peak'])} | {_fmt(p['step'], 1)} | "
                     f"{_fmt(p['cpu'], 1)} | {p['passes']} forward | {goal} |")
    points = ti_points(ti)
    for p in points:
        if p["fits"]:
            lines.append(f"| PyTorch TI (fp32) | {p['px']} | {_fmt(p['peak'])} | {_fmt(p['step'], 1)} | "
                         f"{_fmt(p['cpu'], 1)} | 1 forward + 1 backward | fits under the {p['limit']} GiB limit |")
        else:
            why = (f"needs more than {p['needs_more']} GiB (allocation failed)" if p["needs_more"]
                   else f"not measured ({p['error'] or 'stopped'})")
            bound = (f"; >= {p['bound']:.1f} GiB = {p['weights_rss']:.1f} resident + {p['saved_gb']:.1f} kept "
                     "for backward" if p["bound"] is not None else "")
            est = estimated_peak(points, p["px"])
            bound += f"; ~{est:.1f} GiB estimated from the fitting resolutions (c + b px^2)" if est else ""
            lines.append(f"| PyTorch TI (fp32) | {p['px']} | > {p['needs_more'] or p['limit']} | – | – | "
                         f"1 forward + 1 backward | {why}{bound} |")
    return "\n".join(lines)


def stage_table(stages: dict) -> str:
    lines = ["| stage | peak RSS (GiB) | wall (min) | CPU user (min) | goal |", "|---|---|---|---|---|"]
    names = {"replica": "replica (`zoodip replica sdxl`)", "export": "export (`zoodip export`)",
             "parity": "export parity vs torch (bench)", "quantize_w8": "quantize w8 with gates (`zoodip quantize`)"}
    for key, label in names.items():
        r = stages.get("stages", {}).get(key)
        if not r or r.get("reused"):
            continue
        goal = ""
        if key in ("export", "quantize_w8"):
            goal = f"<= {GOAL_STAGE_GB:.0f} GiB: {'met' if r['peak_rss_gb'] <= GOAL_STAGE_GB else 'NOT met'}"
        lines.append(f"| {label} | {_fmt(r['peak_rss_gb'])} | {_fmt(r['wall_seconds'] / 60, 1)} | "
                     f"{_fmt(r.get('user_seconds', 0) / 60, 1)} | {goal} |")
    return "\n".join(lines)


def plot(ti: dict, zoodip: list[dict], png: str | Path, machine_gib: float | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machine_gib = machine_gib or ti.get("machine", {}).get("mem_total_gib")
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    tp = ti_points(ti)
    estimate = {p["px"]: estimated_peak(tp, p["px"]) for p in tp}      # fit once per resolution
    fit = [p for p in tp if p["fits"]]
    ax.plot([p["px"] for p in fit], [p["peak"] for p in fit], "o-", color="#555555", label="PyTorch TI fp32 (measured)")
    # a step that failed to allocate under the limit needs more than the limit, whatever the forward-only count says
    bounds = [{**p, "bound": max(p["bound"] or 0, p["needs_more"] or 0)} for p in tp
              if not p["fits"] and (p["bound"] is not None or p["needs_more"])]
    if bounds:
        ax.plot([p["px"] for p in bounds], [p["bound"] for p in bounds], "o", mfc="none", color="#555555", ms=8,
                label="PyTorch TI: did not fit; measured lower bound")
        for p in bounds:
            ax.annotate("", xy=(p["px"], p["bound"] * 1.12), xytext=(p["px"], p["bound"]),
                        arrowprops=dict(arrowstyle="->", color="#555555"))
            ax.text(p["px"], p["bound"], f"  > {p['bound']:.1f}", va="center", fontsize=8)
        est = [(p["px"], estimate[p["px"]]) for p in bounds if estimate[p["px"]]]
        if est:
            ax.plot([x for x, _ in est], [y for _, y in est], "x", color="#555555", ms=7,
                    label="PyTorch TI: estimate (c + b px^2 fit to the measured points)")
            for x, y in est:
                ax.text(x, y, f"  ~{y:.1f}", va="center", fontsize=8)
    for p in fit:
        ax.text(p["px"], p["peak"], f"  {p['peak']:.1f}", va="center", fontsize=8)
    zp = zoodip_points(zoodip)
    ax.plot([p["px"] for p in zp], [p["peak"] for p in zp], "s-", color="#1f77b4", label="zoodip w8 (measured)")
    for p in zp:
        ax.text(p["px"], p["peak"], f"  {p['peak']:.2f}", va="bottom", fontsize=8, color="#1f77b4")
    if machine_gib:
        ax.axhline(machine_gib, color="#d62728", lw=1.2, label=f"this machine's memory ({machine_gib:.1f} GiB)")
    limits = {p["limit"] for p in tp if p["limit"]}
    for lim in limits:
        ax.axhline(lim, color="#d62728", lw=0.8, ls=":", label=f"TI runs' RLIMIT_DATA ({lim:g} GiB)")
    ax.axhline(GOAL_ZOODIP_1024_GB, color="#1f77b4", lw=0.8, ls="--", label=f"goal, zoodip at 1024 px ({GOAL_ZOODIP_1024_GB} GiB)")
    pxs = sorted({p["px"] for p in tp} | {p["px"] for p in zp})
    ax.set_xticks(pxs)
    ax.set_xlabel("training resolution (px)")
    ax.set_ylabel("peak RSS (GiB), one process each")
    top = max([machine_gib or 0] + [p["bound"] or 0 for p in tp] + [p["peak"] or 0 for p in tp]
              + [e or 0 for e in estimate.values()]) * 1.2
    ax.set_ylim(0, top)
    ax.set_title("SDXL replica: one training step, peak RSS", fontsize=10)
    ax.legend(fontsize=7.5, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return Path(png)


def render(ti: dict, zoodip: list[dict], stages: dict | None) -> str:
    parts = ["### Training step, SDXL replica", "", training_table(ti, zoodip)]
    if stages:
        parts += ["", "### Replica, export and quantization, SDXL replica", "", stage_table(stages)]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ti", required=True, help="bench.sd.torch_ti_xl --sweep output")
    p.add_argument("--zoodip", nargs="+", required=True, help="bench.sd.zoodip_train --result files")
    p.add_argument("--stages", help="bench.sd.sdxl_memory output")
    p.add_argument("--png")
    p.add_argument("--table")
    a = p.parse_args(argv)
    ti, zoodip = _load(a.ti), [_load(z) for z in a.zoodip]
    stages = _load(a.stages) if a.stages else None
    md = render(ti, zoodip, stages)
    print(md)
    if a.table:
        atomic_write_text(a.table, md)
    if a.png:
        print(f"wrote {plot(ti, zoodip, a.png)}")


if __name__ == "__main__":
    main()
