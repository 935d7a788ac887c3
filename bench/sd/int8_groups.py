"""Where the ZO signal dies: int8 compute on one UNet node group at a time, gated against fp32.

    python -m bench.sd.int8_groups runs/toy-onnx --calib-images TOY_PHOTOS --out bench/results/int8_groups.json

Every configuration is `zoodip quantize --scheme w8-fast` with its own int8 plan (the rest of the UNet w8),
kept with --no-gate so a miss is measured, not fatal: output fidelity, the conditioning cosine and the ZO
finite-difference correlation with fp32 (32 unit directions, t in [500, 900)) at each mu of MUS. The first
row (empty plan) is w8 with fused attention (exact fp32). `--perturbation train` draws the directions as
`zoodip train` does (N(0, I_d): steps of mu sqrt(d)) instead of unit vectors (steps of mu). `--plans` adds combined plans (e.g. the w8-fast candidates).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from export import int8_compute as ic
from export.quantize import QuantizeConfig, quantize_model
from zo_runtime.io_utils import atomic_write_json
from zo_runtime.model_dir import ModelDir

from .. import common

MUS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# Which methods apply to a group: "block" is MatMulNBits, so MatMul groups only (SD 1.x's proj are 1x1 Convs).
MATMUL_GROUPS = ("text_kv", "attention", "feed_forward")


def single_group_plans() -> list[str]:
    plans = [""]
    for g in ic.GROUPS:
        methods = ("block", "dynamic", "static") if g in MATMUL_GROUPS else ("dynamic", "static")
        plans += [f"{g}={m}" for m in methods]
    return plans


def measure(model: Path, calib: Path, work: Path, plans: list[str], mus=MUS, directions: int = 32,
            perturbation: str = "unit") -> list[dict]:
    rows = []
    for plan in plans:
        name = re.sub(r"[^a-z0-9]+", "-", plan.lower()).strip("-") or "w8"
        cfg = QuantizeConfig(scheme="w8-fast", int8_plan=plan, calib_images=str(calib), gate=False, zo_mus=tuple(mus),
                             zo_directions=directions, zo_perturbation=perturbation)
        q = ModelDir.open(quantize_model(model, work / f"{name}-{perturbation}", cfg))
        g = q.manifest["gates"]
        rows.append({"plan": plan or "(none: w8)", "perturbation": perturbation, "unet_cosine": g["unet"]["cosine"], "unet_psnr_db": g["unet"]["psnr_db"],
                     "cond_cosine": g["unet"]["cond_cosine"], "cond_cosine_min": g["unet"]["cond_cosine_min"],
                     "zo_corr": {mu: z["corr"] for mu, z in g["zo"].items()},
                     "fd_rms_ratio": {mu: round(z["fd_rms_quant"] / max(z["fd_rms_fp32"], 1e-30), 4)
                                      for mu, z in g["zo"].items()},
                     "int8_nodes": q.manifest.get("int8_compute", {}).get("nodes", {}), "folder": str(q.root)})
        print(_row(rows[-1], mus), flush=True)
    return rows


def _row(r: dict, mus) -> str:
    zo = " | ".join(f"{r['zo_corr'][f'{mu:g}']:.3f}" for mu in mus)
    return f"| {r['plan']} | {r['unet_cosine']:.4f} | {r['cond_cosine']:.3f} ({r['cond_cosine_min']:.3f}) | {zo} |"


def table(rows: list[dict], mus=MUS) -> str:
    head = "| int8 compute on | UNet cos | cond cos (min) | " + " | ".join(f"ZO corr mu={mu:g}" for mu in mus) + " |"
    return "\n".join([head, "|" + "---|" * (3 + len(mus))] + [_row(r, mus) for r in rows])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="fp32 zoodip export (the trained toy model)")
    p.add_argument("--calib-images", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("runs/int8_groups"))
    p.add_argument("--plans", nargs="*", default=None, help="int8 plans to add after the single-group ones")
    p.add_argument("--only", nargs="*", default=None, help="these plans instead of the single-group ones")
    p.add_argument("--directions", type=int, default=32)
    p.add_argument("--perturbation", choices=["unit", "train"], default="unit",
                   help="gate 3's directions: unit vectors, or N(0, I_d) as zoodip train draws them")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    plans = (a.only if a.only is not None else single_group_plans()) + (a.plans or [])
    rows = measure(a.model, a.calib_images, a.work, plans, MUS, a.directions, a.perturbation)
    result = {"model": str(a.model), "calib_images": str(a.calib_images), "mus": list(MUS), "rows": rows,
              "perturbation": a.perturbation,
              "table": table(rows), "machine": common.machine_facts(),
              "command": "python -m bench.sd.int8_groups " + " ".join(sys.argv[1:] if argv is None else argv)}
    atomic_write_json(a.out, result)
    print(result["table"])
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
