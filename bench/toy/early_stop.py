"""Does the validation loss of --early-stop track concept fidelity, and how many passes would it save?

    python -m bench.toy.early_stop bench/results/toy_decide_seed21.json ... --method zoodip_jsub_lr5e3 \
        --jobs 2 --out bench/results/toy_early_stop.json

For every concept of the given bench.toy.quality results: train METHOD again with early stopping on and
no patience (it never stops), in stages of --every steps (resume is exact), keeping the vector and the
validation loss after each stage. Score the concept fidelity (bench.toy.eval) every --score-every
steps, and at the best-validation vector each --patience would have stopped with. Reported per run
and pooled: Spearman rank correlation of validation loss and fidelity over the scored checkpoints
(negative = lower loss, higher fidelity), and for each patience the passes saved and the fidelity of
the early-stopped vector against the full run's last vector (paired bootstrap interval).
"""
from __future__ import annotations

import argparse
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import common
from . import method as toy_method, quality as toy_quality
from .pool import ratio_interval
from .shared import TOKEN


def spearman(a, b) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):                          # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def simulate(val: list[tuple[int, float]], patience: int) -> tuple[int, int]:
    """(stop step, best step) of early stopping with `patience` on a validation curve [(step, loss)]."""
    best_step, best, since = val[0][0], val[0][1], 0
    for step, loss in val[1:]:
        if loss < best:
            best_step, best, since = step, loss, 0
        else:
            since += 1
        if since >= patience:
            return step, best_step
    return val[-1][0], best_step


def trace(spec: dict, method: str, every: int) -> tuple[list, dict]:
    """Train in stages of `every` steps with validation on: [(step, val_loss)] and {step: (k, d) vector}."""
    from zo_runtime.embeds import load_learned_embeds
    from zo_runtime.train import LAST_EMBEDS, train

    folder = Path(spec["work"]) / f"{method}_es"
    shutil.rmtree(folder, ignore_errors=True)
    base = replace(toy_method.zo_config(spec, method), early_stop=True, patience=0, val_every=every)
    vectors = {}
    for i, step in enumerate(range(every, max(spec["eval_at"]) + 1, every)):
        train(spec["models"][toy_method.ZO_METHODS[method][0]], spec["images"], folder,
              replace(base, steps=step, resume=i > 0))
        vectors[step] = load_learned_embeds(folder / LAST_EMBEDS)[1]
    vectors[0] = _v0(spec, method)                          # validated at step 0: a candidate too
    rows = [json.loads(r) for r in (folder / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r], vectors


def _v0(spec: dict, method: str) -> np.ndarray:
    """(1, d) the init word's row: where every run starts (validated at step 0)."""
    from zo_runtime.model_dir import ModelDir
    from zo_runtime.tokenizer import ClipTokenizer

    model = ModelDir.open(spec["models"][toy_method.ZO_METHODS[method][0]])
    tok = ClipTokenizer(model.tokenizer_dir, pad_token=model.manifest["pad_token"])
    return np.asarray(model.token_table()[tok.token_id(tok.tokenize(spec["init"])[0])], np.float32)[None]


def measure(spec: dict, method: str, every: int, score_every: int, patiences: list[int]) -> dict:
    """One concept: the validation curve, fidelity at the scored checkpoints, and each patience's outcome."""
    val, vectors = trace(spec, method, every)
    ev = toy_method.evaluator(spec, toy_method.ZO_METHODS[method][0])
    last = max(vectors)
    stops = {p: simulate(val, p) for p in patiences}
    want = sorted({s for s in vectors if s % score_every == 0} | {last} | {b for _, b in stops.values() if b})
    fidelity = {}
    for step in want:
        ev.set_token(TOKEN, vectors[step])
        fidelity[step] = ev.score(TOKEN)[0]["concept_fidelity"]
    loss = dict(val)
    scored = sorted(s for s in fidelity if s % score_every == 0)
    return {"concept": spec["concept"], "val": val, "fidelity": {str(k): v for k, v in fidelity.items()},
            "spearman": spearman([loss[s] for s in scored], [fidelity[s] for s in scored]),
            "last_step": last, "patience": {str(p): {"stop": st, "best": b, "fidelity": fidelity.get(b, 0.0)}
                                            for p, (st, b) in stops.items()}}


def summarize(runs: list[dict], patiences: list[int]) -> dict:
    full = np.array([r["fidelity"][str(r["last_step"])] for r in runs])
    out = {"runs": len(runs), "spearman_mean": round(float(np.mean([r["spearman"] for r in runs])), 3),
           "full_fidelity": round(float(full.mean()), 4), "patience": {}}
    for p in patiences:
        es = np.array([r["patience"][str(p)]["fidelity"] for r in runs])
        saved = np.mean([1 - r["patience"][str(p)]["stop"] / r["last_step"] for r in runs])
        ratio, lo, hi = ratio_interval(es, full) if full.mean() > 0 else (0.0, 0.0, 0.0)
        out["patience"][str(p)] = {"fidelity": round(float(es.mean()), 4), "passes_saved": round(float(saved), 3),
                                   "ratio_to_full": round(ratio, 3), "ratio_ci95": [round(lo, 3), round(hi, 3)]}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="*", type=Path, help="bench.toy.quality result JSON files (their concepts)")
    p.add_argument("--method", default="zoodip_jsub_lr5e3", choices=sorted(toy_method.ZO_METHODS))
    p.add_argument("--every", type=int, default=100, help="validation period (the trainer's val_every)")
    p.add_argument("--score-every", type=int, default=300, help="steps between fidelity scores")
    p.add_argument("--patience", type=int, nargs="+", default=[3, 5, 10])
    p.add_argument("--jobs", type=int, default=1, help="concepts at once, one thread each")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)      # one concept.json, in its own process
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker.read_text())
        common.write_json(a.result, measure(spec, a.method, a.every, a.score_every, a.patience))
        return
    if not a.results or not a.out:
        p.error("give result JSON files and --out")
    specs = [s for f in a.results for s in json.loads(f.read_text())["concepts"]]

    def one(spec):
        done = Path(spec["work"]) / f"{a.method}_es.result.json"
        if not done.is_file():
            args = ["--worker", str(Path(spec["work"]) / "concept.json"), "--method", a.method, "--every",
                    str(a.every), "--score-every", str(a.score_every), "--patience", *map(str, a.patience)]
            common.write_json(done, common.run_isolated("bench.toy.early_stop", args, done.with_suffix(".log"),
                                                         env=toy_quality.job_env(a.jobs)))
        return json.loads(done.read_text())

    with ThreadPoolExecutor(max_workers=a.jobs) as ex:
        runs = list(ex.map(one, specs))
    out = {"method": a.method, "every": a.every, "score_every": a.score_every, "from": [str(f) for f in a.results],
           "summary": summarize(runs, a.patience), "runs": runs, "machine": common.machine_facts()}
    common.write_json(a.out, out)
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
