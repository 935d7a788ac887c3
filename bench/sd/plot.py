"""PNG memory bars and the README's markdown tables, generated from bench.sd.memory / bench.sd.speed JSON.

    python -m bench.sd.plot bench/results/memory_512.json bench/results/memory_256.json \
        --speed bench/results/speed.json --png bench/results/memory.png --table bench/results/table.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from zo_runtime.io_utils import atomic_write, atomic_write_text

from .shared import GOAL_RSS_RATIO, GOAL_STEP_SLACK, N_QUERIES

SCHEME_ORDER = ("fp32", "fp16", "w8", "w8a8", "w4")


def load(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing: run `python -m bench.sd.memory --out {p}` (or bench.sd.speed) first")
    return json.loads(p.read_text())


def _schemes(mem: dict) -> list[str]:
    """Scheme keys ("w8", "w8 unet-batch=single", ...) in SCHEME_ORDER, variants after their scheme."""
    order = {s: i for i, s in enumerate(SCHEME_ORDER)}
    return sorted(mem.get("schemes", {}), key=lambda k: (order.get(k.split()[0], len(order)), k))


def _fmt(x, nd=2, suffix="") -> str:
    return "–" if x is None else f"{x:.{nd}f}{suffix}"


def _model_name(mem: dict) -> str:
    base = Path(mem.get("config", {}).get("base", "model")).name
    return {"sd15": "SD 1.5 replica", "sd21": "SD 2.1 replica"}.get(base, base)


def memory_rows(mem: dict) -> list[tuple[str, dict]]:
    """(label, result) rows: torch_ti first, then zoodip per scheme (the default marked)."""
    rows = [("PyTorch TI (fp32, backprop)", mem["torch_ti"])] if "torch_ti" in mem else []
    for s in _schemes(mem):
        star = " (default)" if s == mem.get("config", {}).get("default_scheme") else ""   # zoodip's default, not a fallback
        gate = " [gates failed]" if mem["schemes"][s].get("gates_passed") is False else ""
        rows.append((f"zoodip {s}{star}{gate}", mem["schemes"][s]))
    return rows


def memory_table(mems: list[dict]) -> str:
    """One row per contender and resolution: peak RSS, ratio vs TI, step time, passes, overhead share."""
    head = ("| method | px | peak RSS (GiB) | TI / method | step wall (s) | step CPU (s) | forward passes / step "
            "| outside session.run |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for mem in mems:
        ti = mem.get("torch_ti", {}).get("peak_rss_gb")
        for label, r in memory_rows(mem):
            ratio = ti / r["peak_rss_gb"] if ti and r.get("peak_rss_gb") else None
            passes = r.get("forward_passes_per_step")
            if r.get("backward_passes_per_step"):
                passes = f"{passes} + {r['backward_passes_per_step']} backward"
            share = r.get("outside_session_run_share")
            lines.append(f"| {label} | {mem['resolution']} | {_fmt(r.get('peak_rss_gb'))} | {_fmt(ratio, 1, 'x')} "
                         f"| {_fmt(r.get('step_seconds'), 1)} | {_fmt(r.get('step_cpu_seconds'), 1)} | {passes} | {_fmt(None if share is None else 100 * share, 1, '%')} |")
    return "\n".join(lines)


def speed_table(speed: dict) -> str:
    """UNet / text-encoder forward seconds per scheme, batch 1 and n+1, per resolution, with file sizes."""
    res = [str(r) for r in speed["config"]["resolutions"]]
    bs = [str(b) for b in speed["config"]["batches"]]
    cols = [f"UNet {r} px b{b} (s)" for r in res for b in bs] + [f"text enc. b{b} (s)" for b in bs]
    lines = ["| scheme | UNet MB | " + " | ".join(cols) + " | peak RSS, largest shape (GiB) |", "|---|---|" + "---|" * (len(cols) + 1)]
    schemes = speed["schemes"]
    for s in [x for x in SCHEME_ORDER if x in schemes] + [x for x in schemes if x not in SCHEME_ORDER]:
        r = schemes[s]
        cells = [_fmt(r["unet"].get(px, {}).get(b, {}).get("median")) for px in res for b in bs]
        cells += [_fmt(r["text_encoder"].get(b, {}).get("median"), 3) for b in bs]
        lines.append(f"| {s} | {_fmt(r.get('unet_mb'), 0)} | " + " | ".join(cells) + f" | {_fmt(r.get('peak_rss_gb'))} |")
    return "\n".join(lines)


def _step_over_unet(r: dict) -> float | None:
    """A zoodip step over the UNet seconds of its own passes, measured in the same process."""
    if r.get("step_over_unet_seconds"):
        return r["step_over_unet_seconds"]
    calls, secs = r.get("session_calls", {}).get("unet"), r.get("session_seconds_total", {}).get("unet")
    mean = r.get("step_stats", {}).get("mean")
    steps = len(r.get("losses") or [])
    if calls and secs and mean and steps:
        return round(mean / (secs / steps), 4)          # all steps' UNet time (warm-up included): approximate
    return None


def goals(mems: list[dict], speed: dict | None) -> list[str]:
    """The issue's goals, each with the measured value and met / not met."""
    out = []
    for mem in mems:
        summ, zo = mem.get("summary", {}), mem.get("zoodip", {})
        px = mem.get("resolution")
        if px == 512 and "default_rss_ratio" in summ and zo:
            ok = "met" if summ["default_rss_ratio"] >= GOAL_RSS_RATIO else "NOT met"
            out.append(f"- Peak RSS at 512 px: PyTorch TI {mem['torch_ti']['peak_rss_gb']:.2f} GiB vs zoodip "
                       f"{mem['default_scheme']} {zo['peak_rss_gb']:.2f} GiB = "
                       f"{summ['default_rss_ratio']:.1f}x (goal >= {GOAL_RSS_RATIO:.0f}x): {ok}.")
        ratio = _step_over_unet(zo) if zo else None
        if ratio:     # the issue sets the step goal at 512 px; other sizes are checked against the same bound
            within = ratio <= 1 + GOAL_STEP_SLACK
            ok = ("met" if within else "NOT met") if px == 512 else \
                f"{'within' if within else 'over'} the bound (a check: the goal is set at 512 px)"
            out.append(f"- zoodip step ({mem.get('default_scheme')}, {px} px) = {ratio:.3f} x the UNet time of its "
                       f"{zo['forward_passes_per_step']} passes, same process (goal <= {1 + GOAL_STEP_SLACK:.2f}, "
                       f"text encoder included in the step): {ok}.")
        if zo.get("outside_session_run_share") is not None:
            share = 100 * zo["outside_session_run_share"]
            out.append(f"- Share of a step outside session.run ({px} px): {share:.2f}% (goal < 5%): "
                       f"{'met' if share < 5 else 'NOT met'}.")
    if speed:
        for scheme, r in speed["schemes"].items():
            unet = r["unet"].get("512", {})
            b1, bn = unet.get("1", {}).get("median"), unet.get(str(N_QUERIES + 1), {}).get("median")
            if b1 and bn:
                out.append(f"- {scheme} UNet at 512 px: one batch-{N_QUERIES + 1} call {bn:.2f} s vs "
                           f"{N_QUERIES + 1} batch-1 calls {(N_QUERIES + 1) * b1:.2f} s.")
    return out


def plot_memory(mems: list[dict], png: str | Path) -> Path:
    """Horizontal peak-RSS bars per resolution, TI in grey, zoodip schemes in colour, the 5x line dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(mems), figsize=(6.2 * len(mems), 3.6), squeeze=False)
    for ax, mem in zip(axes[0], mems):
        rows = memory_rows(mem)
        labels = [label for label, _ in rows][::-1]
        vals = [r.get("peak_rss_gb") or 0.0 for _, r in rows][::-1]
        colors = ["#888888" if lab.startswith("PyTorch") else "#1f77b4" for lab in labels]
        bars = ax.barh(labels, vals, color=colors)
        for bar, v in zip(bars, vals):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.2f}", va="center", fontsize=8)
        ti = mem.get("torch_ti", {}).get("peak_rss_gb")
        if ti:
            ax.axvline(ti / GOAL_RSS_RATIO, ls="--", color="#d62728", lw=1,
                       label=f"goal: PyTorch TI / {GOAL_RSS_RATIO:.0f}")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("peak RSS (GiB), one process each")
        ax.set_title(f"Training peak RSS, {_model_name(mem)}, {mem['resolution']} px", fontsize=10)
        ax.set_xlim(0, max(vals + [1.0]) * 1.18)
    fig.tight_layout()
    out = atomic_write(png, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return out


def plot_timeline(mem: dict, png: str | Path) -> Path:
    """RSS over time of each contender's process (set-up, then training steps) at one resolution."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for label, r in memory_rows(mem):
        tl = r.get("rss_timeline") or []
        if tl:
            ax.plot([p[0] for p in tl], [p[1] for p in tl], label=label, lw=1.4,
                    color="#888888" if label.startswith("PyTorch") else None)
    ax.set_xlabel("seconds since the process started its run")
    ax.set_ylabel("RSS (GiB)")
    ax.set_title(f"RSS over a short run (set-up + a few steps), {_model_name(mem)}, {mem['resolution']} px",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = atomic_write(png, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return out


def render(mems: list[dict], speed: dict | None) -> str:
    """The markdown block for the README: goals, memory table, speed table, the measurement note."""
    parts = ["### Memory and step time (one fresh process per method)", "", memory_table(mems), ""] if mems else []
    if speed:
        parts += ["### Forward time per scheme (median seconds, 2 cores)", "", speed_table(speed), ""]
    g = goals(mems, speed)
    if g:
        parts += ["### Goals", "", *g, ""]
    m = mems[0]["machine"] if mems else speed["machine"]
    parts.append(f"Machine: {m['cpu_model']}, {m['usable_cores']} cores, {m['mem_total_gib']} GiB; "
                 f"onnxruntime {m['versions'].get('onnxruntime')}, torch {m['versions'].get('torch')}. "
                 f"Note: {(mems[0] if mems else speed)['note']}.")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("memory", nargs="*", help="bench.sd.memory JSON files (one per resolution)")
    p.add_argument("--speed", default=None, help="bench.sd.speed JSON")
    p.add_argument("--png", default=None, help="memory bar chart to write")
    p.add_argument("--timeline-png", default=None, help="RSS-over-time plot of the first memory JSON")
    p.add_argument("--table", default=None, help="markdown file to write (also printed)")
    a = p.parse_args(argv)
    mems = sorted((load(m) for m in a.memory), key=lambda m: -m["resolution"])
    speed = load(a.speed) if a.speed else None
    if not mems and not speed:
        p.error("give at least one memory JSON or --speed")
    if a.png and mems:
        print(f"wrote {plot_memory(mems, a.png)}")
    if a.timeline_png and mems:
        print(f"wrote {plot_timeline(mems[0], a.timeline_png)}")
    text = render(mems, speed)
    if a.table:
        atomic_write_text(a.table, text)
    print(text)


if __name__ == "__main__":
    main()
