"""Pictures and a table from a bench.toy.quality result: what people look at first.

    python -m bench.toy.report bench/results/toy_quality.json   # rewrites the .md/.png beside it

- FILE.md: one row per method (fidelities, passes, time, RSS, passes to 90% of backprop TI).
- FILE_samples.png: for a few concepts, the training images, then each method's 'a photo of sks' samples.
- FILE_curve.png: concept fidelity against forward passes (matplotlib, when installed).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from zo_runtime.image_io import load_rgb
from zo_runtime.io_utils import atomic_write, atomic_write_text

from .method import REPORTED, TI_METHODS, label
from .shared import GOAL_PASSES



def ordered(res: dict) -> list[str]:
    """Methods in the benchmark's order (JSON files come back with sorted keys)."""
    return [m for m in REPORTED if m in res["methods"]]


THUMB, SHOW, MAX_CONCEPTS = 64, 4, 4        # px per image (native), samples per method, concepts shown


def table(res: dict) -> str:
    cfg = res["config"]
    lines = [f"Toy world, {cfg['concepts']} held-out concepts (seed {cfg['seed']}), {cfg['steps']} steps, "
             f"{cfg['eval']['images_per_prompt']} images x {1 + cfg['eval']['backgrounds']} prompts per concept.", "",
             "| method | concept fidelity | shape / color / pattern | prompt fidelity | feature sim. | forward passes "
             "| passes to 90% of TI | train s | peak RSS GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for m in ordered(res):
        s = res["methods"][m]
        hit = s.get("passes_to_90pct_ti")
        passes = s["forward_passes"] if m not in TI_METHODS else f"{s['forward_passes']} + {s['forward_passes']} bwd"
        lines.append(f"| {label(m)} | {s['concept_fidelity']:.3f} | {s['shape_accuracy']:.2f} / "
                     f"{s['color_accuracy']:.2f} / {s['pattern_accuracy']:.2f} | {s['prompt_fidelity']:.3f} | "
                     f"{s['feature_similarity']:.3f} | {passes} | {'-' if hit is None else hit} | "
                     f"{s['train_seconds']:.0f} | {s['peak_rss_gb']:.2f} |")
    return "\n".join(lines) + "\n"


def _strip(images: list[np.ndarray]) -> Image.Image:
    row = Image.new("RGB", (THUMB * len(images), THUMB), "white")
    for i, im in enumerate(images):
        row.paste(Image.fromarray(im).resize((THUMB, THUMB)), (i * THUMB, 0))
    return row


def samples_figure(res: dict) -> Image.Image:
    """Columns: concepts (SHOW images each); rows: the training images, then each method's samples
    for 'a photo of a sks' (the concept in words / the init word for the two untrained rows)."""
    methods = ordered(res)
    label_w, head_h, gap = 210, 16, 10      # label_w: the longest label (~34 chars at ~6 px)
    concepts = res["concepts"][:MAX_CONCEPTS]
    block = SHOW * THUMB + gap
    fig = Image.new("RGB", (label_w + len(concepts) * block, head_h + (1 + len(methods)) * (THUMB + 4)), "white")
    draw = ImageDraw.Draw(fig)
    rows = [("training images", None)] + [(label(m), m) for m in methods]
    for r, (name, _) in enumerate(rows):
        draw.text((4, head_h + r * (THUMB + 4) + THUMB // 2 - 6), name, fill="black")
    for c, (spec, per_method) in enumerate(zip(concepts, res["per_concept"])):
        x = label_w + c * block
        draw.text((x + 2, 2), "{1} {2} {0}".format(*spec["concept"]), fill="black")
        for r, (_, m) in enumerate(rows):
            if m is None:
                images = [load_rgb(p, THUMB) for p in sorted(Path(spec["images"]).glob("*.png"))][:SHOW]
            else:
                images = list(np.load(per_method[m]["samples"])[0][:SHOW])      # prompt 0 = 'a photo of a {}'
            fig.paste(_strip(images), (x, head_h + r * (THUMB + 4)))
    return fig


def curve_figure(res: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, m in enumerate(ordered(res)):
        s = res["methods"][m]
        xs = [p.get("forward_passes", 0) for p in s["curve"]]
        ys = [p["concept_fidelity"] for p in s["curve"]]
        if len(xs) == 1:
            ax.axhline(ys[0], ls=":", lw=1, color="gray" if m == "init_only" else "green", label=label(m))
        else:   # past matplotlib's 10 colors, the line style tells methods apart
            ax.plot(xs, ys, marker="o", ls=("-", "--", "-.")[i // 10 % 3],
                    label=label(m) + (" (fwd only)" if m in TI_METHODS else ""))
    if "backprop_ti" in res["methods"]:
        ax.axhline(0.9 * res["methods"]["backprop_ti"]["concept_fidelity"], ls="--", lw=0.8, color="black",
                   label="90% of backprop TI (final)")
    return save_curve(fig, ax, path, f"toy world, {res['config']['concepts']} held-out concepts", "concept fidelity")


def save_curve(fig, ax, path: Path, title: str, ylabel: str) -> Path:
    """The common end of a fidelity-vs-passes figure: the pass goal, log x axis, labels, legend, atomic PNG."""
    import matplotlib.pyplot as plt

    ax.axvline(GOAL_PASSES, ls="--", lw=0.8, color="red", label=f"goal: {GOAL_PASSES:,} passes")
    ax.set_xscale("log")
    ax.set_xlabel("forward passes (backprop TI: forwards, each with a backward)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path


def write(res: dict, out: Path) -> None:
    out = Path(out)
    atomic_write_text(out.with_suffix(".md"), table(res))
    fig = samples_figure(res).quantize(colors=256)      # palette PNG: a third of the size, same look
    atomic_write(out.with_name(out.stem + "_samples.png"), lambda p: fig.save(p, format="PNG", optimize=True))
    curve_figure(res, out.with_name(out.stem + "_curve.png"))


if __name__ == "__main__":
    path = Path(sys.argv[1])
    write(json.loads(path.read_text()), path)
