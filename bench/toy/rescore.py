"""Score a method's final tokens from bench.toy.quality runs on another scheme's model than the one it trained on.

    python -m bench.toy.rescore bench/results/toy_fast_seed21.json bench/results/toy_fast_seed22.json \\
        --method zoodip_jsub_lr5e3_fast --scheme w8 --reference zoodip_jsub_lr5e3 \\
        --out bench/results/toy_fast_drawn_w8.json

A token trained on w8-fast is scored by bench.toy.quality with w8-fast drawing the images. This draws them with
`--scheme` instead (same prompts, seeds and classifier), so a loss can be put on the training or on the drawing.
Needs the runs' work folders (their `learned_embeds.safetensors`); the reference's scores come from the files.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from zo_runtime.embeds import load_learned_embeds

from .. import common
from .method import TOKEN, evaluator
from .pool import ratio_interval


def rescore(files: list[Path], method: str, scheme: str, reference: str) -> dict:
    rows = []
    for f in files:
        res = json.loads(f.read_text())
        for spec, per in zip(res["concepts"], res["per_concept"]):
            vectors = load_learned_embeds(Path(spec["work"]) / method / "learned_embeds.safetensors")[1]
            ev = evaluator(spec, scheme)
            ev.set_token(TOKEN, vectors)
            metrics, _ = ev.score(TOKEN)
            rows.append({"draw": spec["seed"], "concept": " ".join(spec["concept"]),
                         f"{method}@{scheme}": metrics["concept_fidelity"],
                         method: per[method]["final"]["concept_fidelity"],
                         reference: per[reference]["final"]["concept_fidelity"]})
            print(rows[-1], flush=True)
    ours = np.array([r[f"{method}@{scheme}"] for r in rows])
    ref = np.array([r[reference] for r in rows])
    ratio, lo, hi = ratio_interval(ours, ref)
    return {"what": f"{method}'s final tokens drawn with the {scheme} model, against {reference}",
            "method": method, "scheme": scheme, "reference": reference, "runs": len(rows),
            "concept_fidelity": round(float(ours.mean()), 4), "reference_fidelity": round(float(ref.mean()), 4),
            "ratio": round(ratio, 3), "ratio_ci95": [round(lo, 3), round(hi, 3)], "per_run": rows,
            "files": [str(f) for f in files]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="bench.toy.quality result files")
    p.add_argument("--method", required=True)
    p.add_argument("--scheme", required=True, help="the model that draws: fp32, w8, w8-fast, ...")
    p.add_argument("--reference", required=True, help="a method of the same files to take the ratio against")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    res = rescore(a.results, a.method, a.scheme, a.reference)
    res.update(command="python -m bench.toy.rescore " + " ".join(sys.argv[1:] if argv is None else argv),
               machine=common.machine_facts())
    common.write_json(a.out, res)
    print(f"{a.method} drawn with {a.scheme} / {a.reference}: {res['ratio']} "
          f"(95% {res['ratio_ci95'][0]}-{res['ratio_ci95'][1]}) over {res['runs']} runs")


if __name__ == "__main__":
    main()
