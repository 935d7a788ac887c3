"""Is --time-budget respected? Wall time of whole `zoodip train --time-budget B` commands on the toy model.

    python -m bench.toy.budget --model runs/decide/models/w8 --images runs/decide/seed21-steps3000/c0-*/images \
        --budgets 60 120 240 --out bench/results/toy_budget.json

Each budget runs in its own process (the command a user types, from start to exit, imports included), with
the default (fast) schedule. Reported: wall / budget, the steps the plan chose and the step it stopped at.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .. import common


def one(model: Path, images: Path, budget: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="zoodip-budget-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-c", "from zoodip.cli import main; main()", "train", str(model), "--images",
               str(images), "--token", "sks", "--init", "circle", "--out", str(out), "--time-budget", f"{budget}s",
               "--set", "progress=false"]
        proc = common.run_measured(cmd, Path(tmp) / "log", env={**os.environ, "ZOODIP_THREADS": str(threads)})
        if proc["returncode"]:
            raise RuntimeError(f"{' '.join(cmd)} failed: {(Path(tmp) / 'log').read_text()[-2000:]}")
        plan = json.loads((out / "config.json").read_text())["plan"]
        timing = json.loads((out / "timing.json").read_text())
    return {"budget_s": budget, "wall_s": round(proc["wall_seconds"], 2), "ratio": round(proc["wall_seconds"] / budget, 3),
            "planned_steps": plan["steps"], "last_step": timing["last_step"], "stopped": timing["stopped"],
            "plan_seconds_per_step": plan["seconds_per_step"], "measured_seconds_per_step": round(timing["step_seconds"], 4)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a toy-model folder (bench.toy.quality's models/w8)")
    p.add_argument("--images", type=Path, required=True, help="a concept's training photos")
    p.add_argument("--budgets", type=int, nargs="+", default=[60, 120, 240])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    runs = [one(a.model, a.images, b, a.threads) for b in a.budgets]
    worst = max(abs(r["ratio"] - 1) for r in runs)
    common.write_json(a.out, {"runs": runs, "worst_deviation": round(worst, 3), "goal": "within 10% of the budget",
                              "met": worst <= 0.10, "machine": common.machine_facts()})
    for r in runs:
        print(f"budget {r['budget_s']} s: wall {r['wall_s']} s ({r['ratio']:.3f}x), {r['last_step']} of "
              f"{r['planned_steps']} planned steps")


if __name__ == "__main__":
    main()
