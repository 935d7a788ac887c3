"""Continue finished toy-world zoodip runs past the budget, to see how many passes reach 90% of TI.

    python -m bench.toy.extend bench/results/toy_quality_3000.json ... --method zoodip --to 4500 6000 \
        --jobs 2 --out bench/results/toy_quality_extended.json

For every concept of every result file: copy WORK/<concept>/<method>/ (its checkpoint is at the last
eval step) to <method>_ext/, resume training to each --to step (resume is exact at the same thread
count, and a constant lr does not depend on the run's length, so this is the run a longer --steps
would have made; use --jobs > 1 after a bench.toy.quality --jobs > 1 run: one thread each), score like
method, and keep the concept's curve with the new points appended. Then pool everything like
bench.toy.pool: ratio to backprop TI at the last step with its interval, and passes to 90% of TI's
final on the pooled curve. Finished concepts are kept (<method>_ext.result.json), so a rerun resumes.
"""
from __future__ import annotations

import argparse
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import common
from . import method as toy_method, pool as toy_pool, quality as toy_quality
from .method import ZO_METHODS


def extend(spec: dict, method: str, to: list[int]) -> dict:
    """Train WORK/<method>_ext onward to each step of `to` and score there: {'curve': [...new points]}."""
    work = Path(spec["work"])
    src, dst = work / method, work / f"{method}_ext"
    if not dst.is_dir():
        shutil.copytree(src, dst)
    ev = toy_method.evaluator(spec, ZO_METHODS[method][0])
    curve, train_s, _ = toy_method.train_and_score(spec, method, ev, dst, to, resume=True)
    return {"method": method, "curve": curve, "train_seconds": round(train_s, 2)}


def extended_results(results: list[dict], method: str, to: list[int], jobs: int) -> list[dict]:
    """The result files with `method`'s curve and final replaced by the extended ones."""
    todo = [(ri, ci, spec) for ri, res in enumerate(results) for ci, spec in enumerate(res["concepts"])]

    def one(job):
        _, _, spec = job
        done = Path(spec["work"]) / f"{method}_ext.result.json"
        if done.is_file() and [p["step"] for p in json.loads(done.read_text())["curve"]] == to:
            return json.loads(done.read_text())
        args = ["--worker", str(Path(spec["work"]) / "concept.json"), "--method", method, "--to", *map(str, to)]
        res = common.run_isolated("bench.toy.extend", args, Path(spec["work"]) / f"{method}_ext.log",
                                  env=toy_quality.job_env(jobs))
        common.write_json(done, res)
        return res

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        done = list(pool.map(one, todo))
    out = json.loads(json.dumps(results))                     # deep copy
    for (ri, ci, _), ext in zip(todo, done):
        row = out[ri]["per_concept"][ci][method]
        row["curve"] = row["curve"] + ext["curve"]
        row["final"] = row["curve"][-1]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="*", type=Path, help="bench.toy.quality result JSON files")
    p.add_argument("--method", default="zoodip", choices=sorted(ZO_METHODS))
    p.add_argument("--to", type=int, nargs="+", required=True, help="steps to train on to and score at")
    p.add_argument("--jobs", type=int, default=1, help="concepts at once, one thread each")
    p.add_argument("--out", type=Path, help="pooled JSON (a .md table is written beside it)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)     # one concept.json, in its own process
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        common.write_json(a.result, extend(json.loads(a.worker.read_text()), a.method, a.to))
        return
    if not a.results or not a.out:
        p.error("give result JSON files and --out")
    results = [json.loads(f.read_text()) for f in a.results]
    last = max(max(s["eval_at"]) for r in results for s in r["concepts"])
    if a.to != sorted(a.to) or a.to[0] <= last:
        p.error(f"--to must be increasing steps past the runs' last eval step ({last})")
    pooled = toy_pool.pool(extended_results(results, a.method, a.to, a.jobs))
    pooled["extended"] = {"method": a.method, "to": a.to, "from": [str(f) for f in a.results]}
    toy_pool.write(pooled, a.out)
    print(toy_pool.table(pooled))


if __name__ == "__main__":
    main()
