"""One method on one toy-world concept, in its own process (so its peak RSS is its own).

    python -m bench.toy.method METHOD --concept WORK/concept.json --result OUT.json

concept.json (written by bench.toy.quality) names the concept, its training images, the models,
the eval steps and the zoodip settings. Trains, scores the token at each eval step (a fidelity
curve against forward passes) and saves the final samples for the figure.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from models.toyworld import world
from models.toyworld.attributes import to_array
from zo_runtime import init_search
from zo_runtime.image_io import load_rgb

from .. import common
from .eval import ToyEvalConfig, ToyEvaluator
from .shared import TOKEN

# The default (fast) schedule's settings: the refreshed Jacobian top-16 subspace at the paper's lr.
JSUB = {"directions": "jacobian", "prior_rank": 16, "prior_refresh": 125}
FAST_SCHEDULE = {**JSUB, "lr": 5e-3}
# zoodip runs: (scheme, the trainer's settings overridden, label); ablations change one thing each.
ZO_METHODS = {
    "zoodip": ("w8", {}, "zoodip (w8, ZO)"),
    "zoodip_fp32": ("fp32", {}, "zoodip fp32 (ZO)"),
    "no_subspace": ("w8", {"subspace": False}, "zoodip, no subspace"),
    "uniform_t": ("w8", {"t_range": (0, 1000)}, "zoodip, uniform t"),
    # the paper's rule as is (see zo.ZOConfig.subspace_cap)
    "subspace_uncapped": ("w8", {"subspace_cap": 1.0}, "zoodip, subspace uncapped"),
    # queries equally in the top 16 of J^T J's 128 directions (86-91% of the gradient's energy) + 10% of the
    # rest, J^T J rebuilt at the current v every 125 steps (4 templates x 129 text-encoder passes, no UNet)
    "zoodip_jsub": ("w8", JSUB,
                    "zoodip, jacobian top-16 subspace, refreshed"),
    "zoodip_jsub0": ("w8", {"directions": "jacobian", "prior_rank": 16, "prior_refresh": 0},
                     "zoodip, jacobian top-16 subspace at v0"),
    # the candidates for the fast schedule's defaults, at the paper's lr (the benchmark's 2e-2 did not carry
    # over to a held-out world: issue #20)
    "zoodip_lr5e3": ("w8", {"lr": 5e-3}, "zoodip, lr 5e-3"),
    "zoodip_jsub_lr5e3": ("w8", FAST_SCHEDULE,
                          "zoodip, jacobian top-16 subspace, refreshed, lr 5e-3"),
    # the fast schedule trained at 32 px (below 64, the nearest size the toy model's VAE x UNet factor of 32 allows),
    # scored at 64 px: does a 4x cheaper training pass keep the concept? (SD 1.5: 256 px for 512)
    "zoodip_jsub_lr5e3_r32": ("w8", {**FAST_SCHEDULE, "resolution": 32},
                              "zoodip, jacobian subspace, lr 5e-3, trained at 32 px"),
    "zoodip_q4": ("w8", {"queries": 4, "unet_batch": "batch"}, "zoodip, 4 queries batched"),   # 5 passes, 1 call
    "zoodip_q8": ("w8", {"queries": 8, "unet_batch": "batch"}, "zoodip, 8 queries batched"),   # 9 passes, 1 call
    "zoodip_q1": ("w8", {"queries": 1}, "zoodip, 1 query"),     # 2 passes a step, more data draws per pass
    "zoodip_lr5e2": ("w8", {"lr": 0.05}, "zoodip, lr 5e-2"),    # 2.5x the benchmark's lr
    # int8-compute UNet at the mu its quantization validated (the toy w8-fast manifest's train_defaults.mu);
    # WORK/models/w8-fast is made by `python -m bench.sd.fast_pass toy-model WORK/models`
    "zoodip_fast": ("w8-fast", {"mu": 3e-3}, "zoodip, w8-fast (int8 compute), mu 3e-3"),
    # the default schedule on w8-fast, each paired with zoodip_jsub_lr5e3 (w8, mu 1e-3): at the first mu its gate
    # passed (3e-3, correlation 0.96), at the largest (1e-2, 0.996); and w8 at 3e-3: what the larger mu costs alone
    "zoodip_jsub_lr5e3_fast": ("w8-fast", {**FAST_SCHEDULE, "mu": 3e-3},
                               "zoodip, jacobian subspace, lr 5e-3, w8-fast (int8 compute), mu 3e-3"),
    "zoodip_jsub_lr5e3_fast_mu1e2": ("w8-fast", {**FAST_SCHEDULE, "mu": 1e-2},
                                     "zoodip, jacobian subspace, lr 5e-3, w8-fast (int8 compute), mu 1e-2"),
    # issue #20's candidate: half the subspace rank (the exact gradient's 90% lies in 3-6 directions,
    # docs/research.md), so each query covers half the span at the same passes; lost its screen (0.83x rank 16)
    "zoodip_jsub8_lr5e3": ("w8", {**FAST_SCHEDULE, "prior_rank": 8},
                           "zoodip, jacobian top-8 subspace, refreshed, lr 5e-3"),
    # issue #20's candidate: the default schedule from a searched start (--init-candidates, zo_runtime/init_search.py:
    # the shape word plus up to 2 of the world's words, kept by a fixed 16-draw loss), its passes from the same budget
    "zoodip_jsub_lr5e3_init": ("w8", FAST_SCHEDULE, "zoodip, jacobian subspace, lr 5e-3, searched init"),
    # ... and two variants of it: half the lr (a searched start is nearer, the walk's noise then costs more) and
    # one round (a second word was wrong on 1 of 8 screening runs)
    "zoodip_jsub_lr25e4_init": ("w8", {**FAST_SCHEDULE, "lr": 2.5e-3},
                                "zoodip, jacobian subspace, lr 2.5e-3, searched init"),
    "zoodip_jsub_lr5e3_init1": ("w8", FAST_SCHEDULE, "zoodip, jacobian subspace, lr 5e-3, searched init, 1 word"),
    # the same search when the user's words miss: the concept's own color and pattern are not candidates
    "zoodip_jsub_lr5e3_init1_blind": ("w8", FAST_SCHEDULE,
                                      "zoodip, jacobian subspace, lr 5e-3, searched init, 1 word, no right words"),
    "zoodip_jsub_lr5e3_mu3e3": ("w8", {**FAST_SCHEDULE, "mu": 3e-3}, "zoodip, jacobian subspace, lr 5e-3, mu 3e-3"),
    # n queries batched in one call, lr scaled so the drift per pass matches n = 2 at lr 2e-2 (an estimate's
    # signal grows as sqrt(n); ZO-Adam here is momentum SGD: sqrt(s) ~ 4e-4 < eps 1e-3); at equal drift the
    # walk's variance per pass is 2 (n + 1) / (3 n) of n = 2's: 0.75 at n = 8, 0.71 at n = 16
    "zoodip_q8_eq": ("w8", {"queries": 8, "unet_batch": "batch", "lr": 0.03},
                     "zoodip, 8 queries batched, lr 3e-2, same passes"),
    "zoodip_q16_eq": ("w8", {"queries": 16, "unet_batch": "batch", "lr": 0.04},
                      "zoodip, 16 queries batched, lr 4e-2, same passes"),
}
# Methods that first search their init (--init-candidates: every word of the toy world; init_rounds as given); its
# worst-case passes come off the training steps, so every eval point is at the same forward passes as zoodip's.
INIT_SEARCH = {"zoodip_jsub_lr5e3_init": {"init_rounds": 2, "init_draws": 16},
               "zoodip_jsub_lr25e4_init": {"init_rounds": 2, "init_draws": 16},
               "zoodip_jsub_lr5e3_init1": {"init_rounds": 1, "init_draws": 16},
               "zoodip_jsub_lr5e3_init1_blind": {"init_rounds": 1, "init_draws": 16}}
BLIND = {"zoodip_jsub_lr5e3_init1_blind"}      # candidates leave out the concept's own words
# Scored at the same forward passes as zoodip (3 a step) rather than the same steps: eval_at * 3 / passes.
PASS_BUDGET = {"zoodip_q8_eq", "zoodip_q16_eq"}
# Backprop TI settings (ToyTIConfig overrides, label): the reference and the variants that make it stronger.
# Its cost per step is 3 forward-equivalents per sample (a backward ~ 2 forwards).
TI_METHODS = {
    "backprop_ti": ({}, "backprop TI (torch)"),
    # the diffusers script's batch 4, for 1,500 steps (as the independent held-out world's TI): 18,000 fwd-equiv.
    "ti_b4": ({"batch": 4, "steps": 1500}, "backprop TI, batch 4, 1,500 steps"),
    "ti_lr2e2": ({"lr": 2e-2}, "backprop TI, lr 2e-2"),
    "ti_puts": ({"t_range": (500, 900)}, "backprop TI, t in [500, 900)"),
    "ti_b4_lr2e2": ({"batch": 4, "steps": 1500, "lr": 2e-2}, "backprop TI, batch 4, 1,500 steps, lr 2e-2"),
    "ti_searched_init1": ({}, "backprop TI from the one-word searched start"),
}
# TI methods that start where a zoodip method's init search ended (its result on the same concept):
# does TI gain as much from the searched start as ZO does?
TI_START_FROM = {"ti_searched_init1": "zoodip_jsub_lr5e3_init1"}
OTHER_LABELS = {"init_only": "init word only", "oracle_prompt": "concept in words"}
METHODS = (*ZO_METHODS, *TI_METHODS, *OTHER_LABELS)
# Methods whose options left the trainer (measured as no better; docs/research.md has their numbers and the
# commit that ran them): kept by name so tables of earlier result files keep their labels.
RETIRED = {
    "zoodip_vocab": "zoodip, vocab directions", "zoodip_jac": "zoodip, jacobian directions",
    "zoodip_gn": "zoodip, Gauss-Newton directions", "zoodip_gn_half": "zoodip, half Gauss-Newton directions",
    "zoodip_guided": "zoodip, momentum-guided directions", "zoodip_global": "zoodip, global Adam normalisation",
    "zoodip_jac_global": "zoodip, jacobian directions + global normalisation, lr 5e-3",
    "zoodip_cosine": "zoodip, cosine lr", "zoodip_avg": "zoodip, averaged iterates",
}


REPORTED = (*METHODS, *RETIRED)        # the order of methods in tables and figures


def is_zo(method: str) -> bool:
    """Whether a method (also a retired one, in an earlier result file) trained with ZO."""
    return method in ZO_METHODS or method in RETIRED


def label(method: str) -> str:
    """The name tables and figures show."""
    if method in ZO_METHODS:
        return ZO_METHODS[method][2]
    if method in TI_METHODS:
        return TI_METHODS[method][1]
    return RETIRED.get(method) or OTHER_LABELS.get(method, method)




def zo_config(spec: dict, method: str):
    """The TrainConfig of a zoodip method on a concept: the benchmark's settings plus the method's overrides."""
    from zo_runtime.train import TrainConfig

    zo_cfg = {**spec["zo"], **ZO_METHODS[method][1]}
    if method in INIT_SEARCH:
        words = [w for w in world.WORDS if method not in BLIND or w not in spec["concept"]]
        zo_cfg.update(INIT_SEARCH[method], init_candidates=",".join(words))
    # the paper schedule underneath: a method states what it changes (plain zoodip stays gaussian, no early stop)
    return TrainConfig(token=TOKEN, init=spec["init"], progress=False, save_every=0, seed=spec["seed"],
                       **{"schedule": "paper", **zo_cfg})


def eval_steps(spec: dict, method: str) -> list[int]:
    """The steps to score at: the benchmark's eval_at, or for PASS_BUDGET methods the steps that spend
    the same forward passes as zoodip's eval_at at 3 passes a step."""
    if method not in PASS_BUDGET:
        return list(spec["eval_at"])
    return [max(1, round(s * 3 / zo_config(spec, method).passes)) for s in spec["eval_at"]]


def train_and_score(spec: dict, method: str, ev: ToyEvaluator, folder: Path, steps: list[int],
                    resume: bool) -> tuple[list, float, np.ndarray]:
    """Train `method` in `folder` up to each of `steps` (resume is exact), scoring after each stage.

    resume: continue the folder's checkpoint from the first stage on (else start it). Returns the curve,
    the training seconds and the last stage's samples.
    """
    from zo_runtime.train import train
    from zo_runtime.embeds import load_learned_embeds

    base = zo_config(spec, method)
    curve, train_s, images = [], 0.0, None
    for i, step in enumerate(steps):
        t0 = time.perf_counter()
        path = train(model_folder(spec, ZO_METHODS[method][0]), spec["images"], folder,
                     replace(base, steps=step, resume=resume or i > 0))
        train_s += time.perf_counter() - t0
        ev.set_token(TOKEN, load_learned_embeds(path)[1])
        metrics, images = ev.score(TOKEN)
        curve.append({"step": step, "forward_passes": step * base.passes, **metrics})
    return curve, train_s, images


def _zo_curve(spec: dict, method: str, ev: ToyEvaluator, work: Path) -> tuple[list, dict]:
    """Train in stages up to each eval step and score after each stage."""
    cfg = zo_config(spec, method)
    passes, budget = cfg.passes, cfg.init_search_passes()
    spent = -(-budget // passes)                # an init search: charged as the whole steps its worst case takes
    curve, train_s, images = train_and_score(spec, method, ev, work / method,
                                             [s - spent for s in eval_steps(spec, method)], resume=False)
    found = work / method / init_search.RESULT
    search = {**json.loads(found.read_text()), "budget": budget} if found.is_file() else None
    for row in curve:
        row["forward_passes"] += spent * passes
    return curve, {"train_seconds": round(train_s, 2), "passes_per_step": passes,
                   "images": images, "config": {**spec["zo"], **ZO_METHODS[method][1]}, "init_search": search}


def model_folder(spec: dict, scheme: str) -> str:
    """The concept's model of `scheme`: prepare_models' fp32/w8, or a sibling folder named after the scheme."""
    return spec["models"].get(scheme) or str(Path(spec["models"]["fp32"]).parent / scheme)


def evaluator(spec: dict, scheme: str) -> ToyEvaluator:
    """The concept's scorer on the `scheme` model, with its training images as the feature reference."""
    train_images = to_array([load_rgb(p, 64) for p in sorted(Path(spec["images"]).glob("*.png"))])
    return ToyEvaluator(model_folder(spec, scheme), tuple(spec["concept"]), list(train_images), spec["backgrounds"],
                        ToyEvalConfig(**spec.get("eval", {})))


def ti_start(spec: dict, method: str) -> str:
    """TI's init: the concept's, or for TI_START_FROM methods the start that zoodip method's search found (its
    result file on the same concept)."""
    if method not in TI_START_FROM:
        return spec["init"]
    found = Path(spec["work"]) / f"{TI_START_FROM[method]}.result.json"
    if not found.is_file():
        raise FileNotFoundError(f"{method} starts from {found}: run {TI_START_FROM[method]} on this concept first")
    return json.loads(found.read_text())["init_search"]["init"]


def _ti_curve(spec: dict, ev: ToyEvaluator, method: str) -> tuple[list, dict]:
    from .ti import ToyTIConfig, train_ti

    cfg = ToyTIConfig(**{"steps": max(spec["eval_at"]), "seed": spec["seed"], **spec.get("ti", {}),
                         **TI_METHODS[method][0]})
    curve, last = [], {}

    def on_eval(step, vector):
        ev.set_token(TOKEN, vector)
        metrics, last["images"] = ev.score(TOKEN)
        # One forward + one backward per sample; backward ~ 2 forwards: 3 forward-equivalents per sample.
        curve.append({"step": step, "forward_passes": step * cfg.batch, "forward_equivalents": 3 * step * cfg.batch,
                      **metrics})

    info = train_ti(spec["pipeline"], spec["images"], ti_start(spec, method), cfg, spec["eval_at"], on_eval)
    return curve, {**info, "images": last["images"],
                   "config": {"lr": cfg.lr, "t_range": list(cfg.t_range), "batch": cfg.batch},
                   "init": ti_start(spec, method)}


def run(method: str, spec: dict) -> dict:
    """Train (if the method trains) and score; returns the method's result (images saved beside it)."""
    work = Path(spec["work"])
    scheme = ZO_METHODS[method][0] if method in ZO_METHODS else "fp32"
    with common.RssSampler() as rss:
        rss.mark("start")
        ev = evaluator(spec, scheme)
        t0 = time.perf_counter()
        if method in ZO_METHODS:
            curve, info = _zo_curve(spec, method, ev, work)
        elif method in TI_METHODS:
            curve, info = _ti_curve(spec, ev, method)
        else:
            # init_only: the initializer word (the floor); oracle_prompt: the concept said in words.
            subject = spec["init"] if method == "init_only" else "{1} {2} {0}".format(*spec["concept"])
            metrics, images = ev.score(subject)
            curve, info = [{"step": 0, "forward_passes": 0, **metrics}], {"train_seconds": 0.0, "images": images,
                                                                         "subject": subject}
        wall = time.perf_counter() - t0
    images = info.pop("images")
    np.save(work / f"{method}_samples.npy", images)                      # (P, n, 64, 64, 3) uint8
    return {"method": method, "scheme": scheme, "curve": curve, "final": curve[-1], **info,
            "wall_seconds": round(wall, 2), "peak_rss_gb": common.gib(common.peak_rss_bytes()),
            "samples": str(work / f"{method}_samples.npy")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("method", choices=METHODS)
    p.add_argument("--concept", required=True, help="concept.json written by bench.toy.quality")
    p.add_argument("--result", required=True)
    a = p.parse_args(argv)
    spec = json.loads(Path(a.concept).read_text())
    common.write_json(a.result, run(a.method, spec))


if __name__ == "__main__":
    main()
