"""Held-out-concept personalization benchmark on the toy world: zoodip vs backprop TI, floors and ablations.

    python -m bench.toy.quality --concepts 4 --seed 0 --steps 2000 --out bench/results/toy_quality.json

For each of K held-out concepts (seeded draw): 5 training images, then every method trains (if it
trains) in its own process and is scored at several steps on 4 prompts x 8 images by the attribute
classifier (bench.toy.eval). Finished (concept, method) results are kept under --work, so an
interrupted run resumes where it stopped. Writes FILE.json, a PNG figure and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from models.toyworld import world

from .. import common
from .eval import ToyEvalConfig, eval_backgrounds
from .method import METHODS
from .shared import PIPELINE

IMAGES_PER_CONCEPT = 5          # the (and DreamBooth's) 3-5 photos, at the top
CALIB_IMAGES = 16               # procedural images of training triples for w8 calibration and gates
# zoodip settings of this benchmark: the paper schedule's except lr (docs/research.md has the lr sweep).
DEFAULT_ZO = {"lr": 2e-2}


def _cli(*args) -> list[str]:
    return [sys.executable, "-c", "from zoodip.cli import main; main()", *map(str, args)]


def prepare_models(work: Path, log: Path) -> dict[str, str]:
    """fp32 export and w8 quantization of the shipped toy pipeline (reused when already complete)."""
    models = (work / "models").resolve()    # a symlinked models folder is reused as itself
    calib = models / "calib"
    if not calib.is_dir():
        images, _ = world.make_dataset(CALIB_IMAGES, seed=12345, triples=world.training_triples())
        from PIL import Image
        calib.mkdir(parents=True)
        for i, img in enumerate(images):
            Image.fromarray(img).save(calib / f"{i:02d}.png")
    for cmd in (_cli("export", PIPELINE, models / "fp32"),
                _cli("quantize", models / "fp32", models / "w8", "--scheme", "w8", "--calib-images", calib)):
        if common.run_measured(cmd, log)["returncode"]:
            raise RuntimeError(f"{' '.join(cmd[3:])} failed; see {log}")
    return {"fp32": str(models / "fp32"), "w8": str(models / "w8")}


def concepts(k: int, seed: int) -> list[tuple[str, str, str]]:
    held = world.held_out_triples()
    if not 1 <= k <= len(held):
        raise ValueError(f"--concepts must be in 1..{len(held)} (the held-out triples), got {k}")
    return [held[i] for i in np.random.default_rng(seed).permutation(len(held))[:k]]   # K=1 is a prefix of K=4


def write_concept(work: Path, i: int, concept, args, models: dict) -> Path:
    """WORK/c<i>-<shape>-<color>-<pattern>/{images/, concept.json}: everything a method run needs."""
    folder = work / f"c{i}-{'-'.join(concept)}"
    img_seed = args.seed * 1000 + i
    scenes = world.concept_scenes(concept, IMAGES_PER_CONCEPT, img_seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for j, img in enumerate(world.make_concept_images(concept, IMAGES_PER_CONCEPT, img_seed)):
        img.save(folder / "images" / f"{j:02d}.png")
    steps = args.steps
    eval_at = sorted({max(1, round(steps * f)) for f in (0.125, 0.25, 0.5, 1.0)})
    spec = {"concept": list(concept), "init": concept[0], "images": str(folder / "images"), "work": str(folder),
            "models": models, "pipeline": str(PIPELINE), "seed": args.seed, "eval_at": eval_at,
            "backgrounds": eval_backgrounds(concept, scenes, ToyEvalConfig.backgrounds, img_seed),
            "train_backgrounds": [s.background for s in scenes], "zo": {**DEFAULT_ZO, **args.zo},
            "ti": args.ti, "eval": args.eval}
    path = folder / "concept.json"
    old = json.loads(path.read_text()) if path.is_file() else None
    if old != spec:                       # new settings: earlier method results no longer apply
        for f in folder.glob("*.result.json"):
            f.unlink()
        common.write_json(path, spec)
    return path


def job_env(jobs: int) -> dict | None:
    """Side by side (jobs > 1), each process gets one thread: a toy step is no faster on two (DEVELOPERS.md)."""
    return {**os.environ, "ZOODIP_THREADS": "1", "OMP_NUM_THREADS": "1"} if jobs > 1 else None


def run_method(spec_path: Path, method: str, log: Path, jobs: int = 1) -> dict:
    """A method's result for one concept, computed once (the .result.json file is the resume point)."""
    done = spec_path.with_name(f"{method}.result.json")
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(spec_path.parent / method, ignore_errors=True)     # a killed run's partial training
    res = common.run_isolated("bench.toy.method", [method, "--concept", str(spec_path)], log, env=job_env(jobs))
    common.write_json(done, res)
    return res


METRICS = ("concept_fidelity", "prompt_fidelity", "feature_similarity", "shape_accuracy", "color_accuracy",
           "pattern_accuracy")


def summarize(results: list[dict[str, dict]], methods: list[str]) -> dict:
    """Per method: metrics averaged over concepts, the mean fidelity curve, cost; passes to 90% of TI."""
    out = {}
    for m in methods:
        rows = [r[m] for r in results]
        curve = [{"step": pts[0]["step"], "forward_passes": pts[0]["forward_passes"],
                  **{k: round(float(np.mean([p[k] for p in pts])), 4) for k in METRICS}}
                 for pts in zip(*(r["curve"] for r in rows))]
        out[m] = {**{k: round(float(np.mean([r["final"][k] for r in rows])), 4) for k in METRICS},
                  "curve": curve, "forward_passes": curve[-1]["forward_passes"],
                  "train_seconds": round(float(np.mean([r["train_seconds"] for r in rows])), 1),
                  "wall_seconds": round(float(np.mean([r["wall_seconds"] for r in rows])), 1),
                  "peak_rss_gb": max(r["peak_rss_gb"] for r in rows)}
    if "backprop_ti" in out:
        target = 0.9 * out["backprop_ti"]["concept_fidelity"]
        for m, s in out.items():
            hit = next((p for p in s["curve"] if p["concept_fidelity"] >= target), None)
            s["passes_to_90pct_ti"] = None if hit is None or m in ("init_only", "oracle_prompt") \
                else hit["forward_passes"]
    return out


def parse_overrides(items: list[str]) -> dict:
    """['lr=0.01', 't_range=[500,900]'] -> {'lr': 0.01, 't_range': [500, 900]} (values as JSON)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--zo/--ti/--eval expect KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concepts", type=int, default=4, help="held-out concepts to draw")
    p.add_argument("--seed", type=int, default=0, help="seed of the concept draw, images and training")
    p.add_argument("--steps", type=int, default=2000, help="training steps of every method that trains")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)}")
    p.add_argument("--zo", action="append", default=[], metavar="KEY=VALUE",
                   help="zoodip TrainConfig override for all zoodip methods, e.g. --zo lr=0.01")
    p.add_argument("--ti", action="append", default=[], metavar="KEY=VALUE", help="backprop TI override (lr, t_range)")
    p.add_argument("--eval", action="append", default=[], metavar="KEY=VALUE",
                   help="scoring override (images_per_prompt, steps, guidance): smaller for smoke runs")
    p.add_argument("--jobs", type=int, default=1, help="(concept, method) processes at once, one thread each")
    p.add_argument("--work", type=Path, default=Path("runs/toy_quality"), help="models, images, per-method results")
    p.add_argument("--out", type=Path, required=True, help="result JSON (figure and table are written beside it)")
    a = p.parse_args(argv)
    a.zo, a.ti, a.eval = parse_overrides(a.zo), parse_overrides(a.ti), parse_overrides(a.eval)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if a.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {a.jobs}")
    run_all(a, methods)


def run_all(a, methods: list[str]) -> dict:
    from . import report

    work = a.work / f"seed{a.seed}-steps{a.steps}"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    models = prepare_models(a.work, log)
    picked = concepts(a.concepts, a.seed)
    specs = [write_concept(work, i, c, a, models) for i, c in enumerate(picked)]
    bar = tqdm(total=len(specs) * len(methods), desc="toy quality", unit="run")

    def one(job):
        spec, m = job
        res = run_method(spec, m, spec.with_name(f"{m}.log"), a.jobs)
        bar.set_postfix_str(f"{spec.parent.name} {m}")
        bar.update(1)
        return res

    jobs = [(spec, m) for spec in specs for m in methods]
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:      # each job is its own process; threads just wait
        done = list(pool.map(one, jobs))
    bar.close()
    results = [dict(zip(methods, done[i:i + len(methods)])) for i in range(0, len(done), len(methods))]
    out = {"config": {"concepts": a.concepts, "seed": a.seed, "steps": a.steps, "methods": methods,
                      "zo": {**DEFAULT_ZO, **a.zo}, "ti": a.ti, "images_per_concept": IMAGES_PER_CONCEPT,
                      "eval": vars(ToyEvalConfig(**a.eval))},
           "concepts": [json.loads(s.read_text()) for s in specs],
           "per_concept": results,
           "methods": summarize(results, methods), "machine": common.machine_facts()}
    common.write_json(a.out, out)
    report.write(out, a.out)
    print(report.table(out))
    return out


if __name__ == "__main__":
    main()
