"""The plan a default `zoodip train` prints on an SD-size model, and a short run that checks its arithmetic.

    python -m bench.sd.plan_check runs/sd15-w8 --images DIR --short-steps 20 --refresh 10 \
        --out bench/results/plan_check_sd15_w8.json

A: the default command (fast schedule, native resolution): its plan line, read from its output after the
   timed first steps; the process is then stopped (the plan is what a user sees before the bulk).
B: a short run of --short-steps steps with the Jacobian directions rebuilt every --refresh steps, so the
   refreshes the plan amortizes happen inside it: the plan's time for the steps after the timed ones
   against the measured time of those steps (the issue's check: within 15%).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import common
from .shared import DEFAULT_IMAGES, default_photos


def _cmd(model: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", "from zoodip.cli import main; main()", "train", str(model), "--images", str(images),
            "--token", "sks", "--init", "dog", "--out", str(out), "--set", "progress=false", *extra]


def default_plan(model: Path, images: Path, timeout: float) -> dict:
    """A: run the default command until it prints its plan line, then stop it."""
    with tempfile.TemporaryDirectory(prefix="zoodip-plan-") as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        proc = subprocess.Popen(_cmd(model, images, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = ""
        try:
            for text in proc.stdout:
                if text.startswith("plan: "):
                    line = text.strip()
                    break
                if time.perf_counter() - t0 > timeout:
                    break
        finally:
            proc.kill()
            proc.wait()
        plan = json.loads((out / "config.json").read_text())["plan"] if line else None
    return {"plan_line": line, "plan": plan, "seconds_to_plan": round(time.perf_counter() - t0, 1)}


def short_run(model: Path, images: Path, steps: int, refresh: int, extra: tuple[str, ...] = ()) -> dict:
    """B: a short run; the plan's estimate for its steps after the timed ones against their measured time."""
    with tempfile.TemporaryDirectory(prefix="zoodip-plan-") as tmp:
        out = Path(tmp) / "run"
        cmd = _cmd(model, images, out, "--steps", str(steps), "--set", f"prior_refresh={refresh}", *extra)
        t0 = time.time()
        proc = common.run_measured(cmd, Path(tmp) / "log")
        if proc["returncode"]:
            raise RuntimeError(f"{' '.join(cmd)} failed: {(Path(tmp) / 'log').read_text()[-2000:]}")
        plan = json.loads((out / "config.json").read_text())["plan"]
        rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    done = plan["done"]
    # measured: the log's seconds of every step after the timed ones (a step's seconds include the refresh of
    # the directions it starts with; the plan amortizes those refreshes over every step)
    after = [r for r in rows if r["step"] > done]
    stepping = sum(r["seconds"] for r in after)
    estimate = plan["seconds_per_step"] * len(after)
    return {"steps": steps, "refresh_every": refresh, "extra": list(extra), "timed_steps": done, "plan": plan,
            "measured_step_seconds_sum": round(stepping, 2), "wall_seconds": proc["wall_seconds"],
            "plan_estimate_seconds": round(estimate, 2), "peak_rss_gb": proc["peak_rss_gb_wait4"], "started": t0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="training photos [default: procedural ones]")
    p.add_argument("--short-steps", type=int, default=20, help="0: the default plan only")
    p.add_argument("--refresh", type=int, default=10)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--no-default", action="store_true", help="the short run only")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="NAME=VALUE",
                   help="a trainer setting of the short run, repeatable (e.g. prior_prompts=1: cheaper refreshes)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    images = default_photos() if a.images == DEFAULT_IMAGES else a.images
    res = {"model": str(a.model), "threads": os.environ.get("ZOODIP_THREADS", "all"),
           "machine": common.machine_facts()}
    if not a.no_default:
        res["default"] = default_plan(a.model, images, a.timeout)
        common.write_json(a.out, res)                 # kept if the short run is stopped
        print(res["default"]["plan_line"], flush=True)
    if a.short_steps:
        res["short"] = short_run(a.model, images, a.short_steps, a.refresh,
                                 tuple(x for kv in a.extra for x in ("--set", kv)))
    common.write_json(a.out, res)
    if a.short_steps:
        print(json.dumps({k: v for k, v in res["short"].items() if k != "plan"}, indent=1))


if __name__ == "__main__":
    main()
