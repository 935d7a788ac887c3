"""Where does a trained token's displacement go, and which part carries the concept? (torch, bench side)

    python -m bench.analysis.split runs/ttq/base/seed1-steps3000 --method zoodip \
        --out bench/results/toy_split_seed1.json

For every concept folder of a bench.toy.quality work dir with a finished METHOD run: v0 is the init
word's row, v the trained vector, dv = v - v0. The text encoder's J^T J at v0 (finite differences,
bench.analysis.grad_spectrum.jacobian_moment) splits R^d into its top half of eigen-directions (stiff: the
encoder's output moves most) and its bottom half (flat). Reported: the share of |dv|^2 in the top 16 and
in the flat half, and the concept fidelity (bench.toy.eval, same prompts and seeds as the benchmark) of
v, of v0 + the stiff part of dv, of v0 + the flat part, and of v0. It tells whether a direction prior
that favours either half (zo_runtime.priors) can find the solution.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import common, torch_ti
from ..toy import method as toy_method
from ..toy.shared import PIPELINE, TOKEN
from ..toy.ti import row_optimizer
from .grad_spectrum import eig_desc, jacobian_moment


def init_row_and_moment(init: str) -> tuple[np.ndarray, np.ndarray]:
    """(d,) the init word's row and the (d, d) J^T J of the text encoder there."""
    import torch

    torch.set_num_threads(1)
    cfg = replace(torch_ti.TorchTIConfig(), resolution=64, init=init, steps=1, warmup=0)
    parts = torch_ti.load(PIPELINE, cfg)
    vec, _ = row_optimizer(parts, cfg)
    v0 = vec.detach()[0].numpy().copy()
    return v0, jacobian_moment(parts, vec, v0)


def split(v0: np.ndarray, v: np.ndarray, moment: np.ndarray) -> dict[str, np.ndarray | float]:
    """dv = v - v0 split along the eigen-directions of `moment`: stiff (top half) and flat parts."""
    _, basis = eig_desc(moment)                                   # (d, d) columns, largest first
    dv = (v - v0).astype(np.float64)
    coef = basis.T @ dv
    half = len(dv) // 2
    stiff = basis[:, :half] @ coef[:half]
    energy = coef ** 2 / max(float(coef @ coef), 1e-30)
    return {"stiff": stiff, "flat": dv - stiff, "top16_share": float(energy[:16].sum()),
            "flat_share": float(energy[half:].sum())}


def analyse(concept: Path, method: str) -> dict | None:
    spec = json.loads((concept / "concept.json").read_text())
    path = concept / method / "learned_embeds.safetensors"
    if not path.is_file():
        return None
    from zo_runtime.embeds import load_learned_embeds

    v = np.asarray(load_learned_embeds(path)[1], np.float64).ravel()
    v0, moment = init_row_and_moment(spec["init"])
    parts = split(v0, v, moment)
    ev = toy_method.evaluator(spec, toy_method.ZO_METHODS[method][0])
    scores = {}
    for name, x in (("trained", v), ("v0_plus_stiff", v0 + parts["stiff"]), ("v0_plus_flat", v0 + parts["flat"]),
                    ("v0", v0)):
        ev.set_token(TOKEN, x.astype(np.float32)[None])
        scores[name] = ev.score(TOKEN)[0]["concept_fidelity"]
    return {"concept": concept.name, "method": method, "norm_v0": round(float(np.linalg.norm(v0)), 3),
            "norm_dv": round(float(np.linalg.norm(v - v0)), 3), "top16_share": round(parts["top16_share"], 3),
            "flat_share": round(parts["flat_share"], 3), "concept_fidelity": scores}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path, help="a bench.toy.quality draw folder (seedS-stepsN/ with concept folders)")
    p.add_argument("--method", default="zoodip")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    concepts = sorted(c for c in a.work.glob("c*") if (c / "concept.json").is_file())
    if not concepts:
        raise SystemExit(f"{a.work} holds no concept folders: point it at a bench.toy.quality seedS-stepsN folder")
    rows = [r for r in (analyse(c, a.method) for c in concepts) if r]
    for r in rows:
        print(r)
    common.write_json(a.out, {"work": str(a.work), "method": a.method, "rows": rows,
                              "machine": common.machine_facts()})


if __name__ == "__main__":
    main()
