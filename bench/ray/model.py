"""A model of one subject's step time on W workers, checked on the toy model and used to predict SD 1.5.

    python -m bench.ray.model --scaling bench/results/ray_scaling.json --out bench/results/ray_model.json

    one process:  T_1(P) = t_drv + t_te(P) + P t_pass
    W workers:    T_W(P) = t_drv + t_msg + t_te(P) + ceil(P / W) t_pass

P = n + 1 passes; t_pass one UNet pass; t_te(P) the text encoder on the step's P rows (every worker runs it
on all P: the batch one process runs, hence the same floats); t_msg the per-step messaging round trip
(measured on loopback); t_drv the driver's own work (query points, ZO update, log). Toy parts come from
bench.ray.scaling; SD 1.5 parts (w8, 512 px, 2 threads on 2 cores) from bench/results/speed_current.json,
measured by bench.sd.speed on this machine on 2026-11-29, not again here. train-many runs one subject per
worker, each at one-process speed: throughput W / (steps T_1(3) + t_open).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .. import common

SPEED = Path("bench/results/speed_current.json")
LAN_RTT = 0.5e-3        # s: added to the loopback round trip for a real network (an assumption, not measured)
SD_D, TOY_D = 768, 128  # vector sizes: the driver's ZO update scales with D


def step_time(parts: dict, P: int, W: int | None) -> float:
    """T_W(P), or T_1(P) of one process when W is None."""
    te = parts["te"](P)
    if W is None:
        return parts["drv"] + te + P * parts["pass"]
    return parts["drv"] + parts["msg"] + te + math.ceil(P / W) * parts["pass"]


def linear(points: dict[int, float]):
    """t_te(P) through the measured (P, seconds) points: least squares a + b P."""
    xs, ys = list(points), list(points.values())
    n, sx, sy = len(xs), sum(xs), sum(ys)
    b = (n * sum(x * y for x, y in zip(xs, ys)) - sx * sy) / (n * sum(x * x for x in xs) - sx * sx)
    a = (sy - b * sx) / n
    return lambda P: a + b * P, {"a": round(a, 5), "b": round(b, 5)}


def toy_parts(scaling: dict, basis: str) -> dict:
    """The toy model's parts on one basis: "cpu" (CPU seconds: dedicated cores) or "wall" (under the load)."""
    comp = scaling["components_1_thread"]
    te, fit = linear({int(k): v[basis] for k, v in comp["text_encoder"].items()})
    t_pass = comp["unet_pass"][basis]
    measured = scaling["one_subject"]["n2"]["cpu_path" if basis == "cpu" else "wall"]["median"]["process_1t"]
    drv = max(0.0, measured - te(3) - 3 * t_pass)
    msg = scaling["messaging_seconds"]["W2_P3"]["median"]
    return {"pass": t_pass, "te": te, "te_fit": fit, "drv": drv, "msg": msg}


def sd_parts(speed: dict, toy: dict) -> dict:
    w8 = speed["schemes"]["w8"]
    te, fit = linear({int(k): v["median"] for k, v in w8["text_encoder"].items()})
    return {"pass": w8["unet"]["512"]["1"]["median"], "te": te, "te_fit": fit, "drv": toy["drv"] * SD_D / TOY_D,
            "msg": toy["msg"] + LAN_RTT, "open": w8["unet_load_s"] + w8["text_encoder_load_s"]}


def check_toy(scaling: dict, parts: dict, basis: str) -> dict:
    """The model against the measured toy step times (W = 1, 2 workers), on one basis."""
    out = {}
    for key, run in scaling["one_subject"].items():
        P, got = run["passes"], run["cpu_path" if basis == "cpu" else "wall"]["median"]
        out[key] = {f"W{w}": {"measured": got[f"ray_w{w}"], "model": round(step_time(parts, P, w), 5)}
                    for w in (1, 2)}
        out[key]["one_process"] = {"measured": got["process_1t"], "model": round(step_time(parts, P, None), 5)}
    return out


def predict(parts: dict, workers=(1, 3, 9, 33)) -> dict:
    """Step seconds, speedup over one process at the same threads, and efficiency, for n = 2, 8 and W - 1."""
    rows = []
    for W in workers:
        for n in sorted({2, 8} | ({W - 1} if W > 3 else set())):    # n = W - 1: a pass per worker
            P = n + 1
            t, one = step_time(parts, P, W), step_time(parts, P, None)
            rows.append({"workers": W, "queries": n, "passes": P, "step_seconds": round(t, 3),
                         "one_process_seconds": round(one, 3), "speedup": round(one / t, 2),
                         "efficiency": round(one / t / W, 2), "idle_workers": max(0, W - P)})
    return {"rows": rows}


def many(parts: dict, steps: int = 3000, workers=(1, 3, 9, 33)) -> list[dict]:
    """train-many at SD scale: subjects per day at W workers (fast schedule: 3000 steps, n = 2)."""
    subject = steps * step_time(parts, 3, None) + parts["open"]
    return [{"workers": W, "hours_per_subject": round(subject / 3600, 2),
             "subjects_per_day": round(W * 86400 / subject, 2)} for W in workers]


def table(pred: dict) -> str:
    lines = ["| W | n | passes | step (s) | one process (s) | speedup | efficiency |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in pred["rows"]:
        lines.append(f"| {r['workers']} | {r['queries']} | {r['passes']} | {r['step_seconds']} | "
                     f"{r['one_process_seconds']} | {r['speedup']}x | {r['efficiency']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scaling", type=Path, default=Path("bench/results/ray_scaling.json"))
    p.add_argument("--speed", type=Path, default=SPEED)
    p.add_argument("--out", type=Path, default=Path("bench/results/ray_model.json"))
    args = p.parse_args(argv)
    scaling, speed = json.loads(args.scaling.read_text()), json.loads(args.speed.read_text())
    toy, toy_wall = toy_parts(scaling, "cpu"), toy_parts(scaling, "wall")
    sd = sd_parts(speed, toy)
    clean = lambda d: {k: (round(v, 5) if isinstance(v, float) else v) for k, v in d.items() if k != "te"}
    result = {"formula": {"one_process": "t_drv + t_te(P) + P t_pass",
                          "workers": "t_drv + t_msg + t_te(P) + ceil(P / W) t_pass"},
              "toy": {"parts_cpu": clean(toy), "check_cpu": check_toy(scaling, toy, "cpu"),
                      "parts_wall": clean(toy_wall), "check_wall": check_toy(scaling, toy_wall, "wall"),
                      "predict_cpu": predict(toy, (1, 2, 3, 9))},
              "sd15_w8_512": {"parts": clean(sd), "sources": {"speed": str(args.speed), "lan_rtt_assumed": LAN_RTT},
                              "predict": predict(sd), "train_many": many(sd)}}
    common.write_json(args.out, result)
    print(table(result["sd15_w8_512"]["predict"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
