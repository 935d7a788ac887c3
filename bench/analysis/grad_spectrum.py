"""How many directions does the true TI gradient use on the toy world? (torch, bench side only)

    python -m bench.analysis.grad_spectrum --concept runs/ttq/base/seed1-steps3000/c3-circle-orange-solid \
        --init circle --draws 150 --out bench/results/toy_grad_spectrum.json [--vector learned_embeds.safetensors ...]

At v (the init row, or a trained vector) it takes the exact gradient of zoodip's loss (PUTS t in
[500, 900), random template, image, flip and noise) for `draws` data draws, G (N, d), and reports:
the share of E|g|^2 in the mean gradient; how many eigen-directions of E[g g^T] hold 50/80/90/95%;
how much of a held-out half's energy the first half's top-k directions hold; and the share of the
energy in the top-k directions of two priors a forward-only run could use (zo_runtime.priors): the
token rows' covariance (vocab) and the text encoder's finite-difference J^T J (jacobian). An isotropic
draw's top-k holds k/d.
"""
from __future__ import annotations

import argparse
import random
from dataclasses import replace
from pathlib import Path

import numpy as np

from models.toyworld import world
from zo_runtime.prompts import OBJECT_TEMPLATES

from .. import common, torch_ti
from ..toy.shared import PIPELINE
from ..toy.ti import row_optimizer, token_ids

KS = (4, 8, 16, 32, 64)


def gradients(parts, latents, vec, v: np.ndarray, draws: int, seed: int = 0) -> np.ndarray:
    """(draws, d) exact gradients of the PUTS loss at v, one data draw each."""
    import torch

    gen, rng, sch, out = torch.Generator().manual_seed(seed), random.Random(seed), parts.scheduler, []
    for _ in range(draws):
        vec.data[:] = torch.tensor(v)[None]
        ids = token_ids(parts, rng.choice(OBJECT_TEMPLATES).format("sks"))
        i = int(torch.randint(0, latents.shape[0], (1,), generator=gen))
        x0 = latents[i:i + 1].flip(3) if torch.rand(1, generator=gen) < 0.5 else latents[i:i + 1]
        noise, t = torch.randn(x0.shape, generator=gen), torch.randint(500, 900, (1,), generator=gen)
        pred = parts.unet(sch.add_noise(x0, noise, t), t, parts.text_encoder(ids)[0]).sample
        target = sch.get_velocity(x0, noise, t) if sch.config.prediction_type == "v_prediction" else noise
        vec.grad = None
        torch.nn.functional.mse_loss(pred, target).backward()
        out.append(vec.grad[0].numpy().copy())
    return np.stack(out)


def top_share(basis: np.ndarray, m: np.ndarray) -> dict[str, float]:
    """{k: share of tr(M) inside the first k columns of `basis` (orthonormal, best first)}."""
    return {str(k): round(float(np.trace(basis[:, :k].T @ m @ basis[:, :k]) / np.trace(m)), 3) for k in KS}


def eig_desc(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w, v = np.linalg.eigh(m)
    return w[::-1], v[:, ::-1]


def jacobian_moment(parts, vec, v: np.ndarray, h: float = 1e-2) -> np.ndarray:
    """J^T J of the text encoder at v for 'a photo of a sks', finite differences like priors.jacobian_moment."""
    import torch

    ids = token_ids(parts, "a photo of a sks")
    with torch.no_grad():
        def enc(x):
            vec.data[:] = torch.tensor(x)[None]
            return parts.text_encoder(ids)[0].numpy().ravel().astype(np.float64)
        c0 = enc(v)
        jac = np.stack([(enc(v + h * e) - c0) / h for e in np.eye(v.size, dtype=np.float32)], axis=1)
    return jac.T @ jac


def analyse(concept: Path, init: str, draws: int, vector: str | None) -> dict:
    import torch

    torch.set_num_threads(1)
    tcfg = replace(torch_ti.TorchTIConfig(), resolution=64, init=init, steps=1, warmup=0)
    parts = torch_ti.load(PIPELINE, tcfg)
    latents = torch_ti.encode_images(parts, concept / "images", tcfg)
    vec, _ = row_optimizer(parts, tcfg)
    v = vec.detach()[0].numpy().copy()
    if vector:
        from zo_runtime.embeds import load_learned_embeds
        v = np.asarray(load_learned_embeds(vector)[1], np.float32).ravel()
    g = gradients(parts, latents, vec, v, draws).astype(np.float64)
    m = g.T @ g / len(g)
    w, basis = eig_desc(m)
    cum = np.cumsum(w) / w.sum()
    half = len(g) // 2
    emb = parts.text_encoder.get_input_embeddings().weight.detach().numpy()
    rows = emb[[parts.tokenizer.convert_tokens_to_ids(t + "</w>") for t in world.vocabulary()]]
    return {"concept": concept.name, "init": init, "vector": vector, "draws": draws, "d": int(v.size),
            "vector_norm": round(float(np.linalg.norm(v)), 3),
            "mean_gradient_share": round(float(g.mean(0) @ g.mean(0) / np.mean((g * g).sum(1))), 3),
            "dims_for_energy": {str(q): int(np.searchsorted(cum, q)) + 1 for q in (0.5, 0.8, 0.9, 0.95)},
            "effective_dim": round(float(w.sum() ** 2 / (w ** 2).sum()), 2),
            "held_out_share": top_share(eig_desc(g[:half].T @ g[:half])[1], g[half:].T @ g[half:]),
            "vocab_prior_share": top_share(eig_desc(np.cov(rows.T))[1], m),
            "jacobian_prior_share": top_share(eig_desc(jacobian_moment(parts, vec, v))[1], m),
            "isotropic_share": {str(k): round(k / v.size, 3) for k in KS}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concept", type=Path, required=True, help="a bench.toy.quality concept folder (has images/)")
    p.add_argument("--init", required=True, help="the init word (the concept's shape)")
    p.add_argument("--draws", type=int, default=150)
    p.add_argument("--vector", action="append", default=[],
                   help="also analyse at this learned_embeds file (repeatable); the init row always comes first")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if not (a.concept / "images").is_dir():
        raise SystemExit(f"{a.concept}/images is missing: point --concept at a bench.toy.quality concept folder")
    res = {"results": [analyse(a.concept, a.init, a.draws, v) for v in [None, *a.vector]],
           "machine": common.machine_facts()}
    common.write_json(a.out, res)
    for r in res["results"]:
        print(r)


if __name__ == "__main__":
    main()
