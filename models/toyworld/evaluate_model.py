"""Measure the toy model's quality bar: generate with diffusers (DDIM 25 steps, guidance 5), score with the classifier.

python -m models.toyworld.evaluate_model [--pipeline models/toyworld/pipeline] [--prompts 96] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models.toyworld import world
from models.toyworld.attributes import AttributeClassifier, attribute_accuracy

PIPELINE_DIR = Path(__file__).with_name("pipeline")
BAR = {"shape": 0.85, "color": 0.90, "pattern": 0.75, "background": 0.90}  # issue 6, training triples


@dataclass(frozen=True)
class EvalConfig:
    prompts: int = 96  # (triple, background) prompts per split: +-3% standard error at 90%
    images_per_prompt: int = 2  # different seeds per prompt, so jitter/noise variety counts
    steps: int = 25  # DDIM steps, from issue 6
    guidance: float = 5.0  # classifier-free guidance scale, from issue 6
    batch: int = 32  # prompts per pipeline call (x2 for CFG): bounded memory on a shared machine
    seed: int = 1234  # draws prompts and the noise


def load_pipeline(folder: str | Path = PIPELINE_DIR):
    """StableDiffusionPipeline in fp32 with a DDIM scheduler built from the shipped scheduler config."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{folder} has no model_index.json; train with `python -m models.toyworld.train_model`")
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw_prompts(triples: list[tuple[str, str, str]], n: int, seed: int) -> list[dict[str, str]]:
    """n attribute sets (shape, color, pattern, background) cycling through `triples` in seeded order."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(triples))
    out = []
    for i in range(n):
        s, c, p = triples[int(order[i % len(triples)])]
        bgs = world.allowed_backgrounds(c)
        out.append({"shape": s, "color": c, "pattern": p, "background": bgs[int(rng.integers(len(bgs)))]})
    return out


def generate(pipe, prompts: list[str], seed: int, cfg: EvalConfig) -> np.ndarray:
    """(len(prompts), 64, 64, 3) float images in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    outs = []
    for i in range(0, len(prompts), cfg.batch):
        res = pipe(prompt=prompts[i:i + cfg.batch], num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                   generator=gen, output_type="np")
        outs.append(res.images)
    return np.concatenate(outs)


def score_split(pipe, clf: AttributeClassifier, triples, cfg: EvalConfig) -> tuple[dict[str, float], np.ndarray]:
    """Per-attribute accuracy of generated images for prompts drawn from `triples`, and the images."""
    wanted = draw_prompts(triples, cfg.prompts, cfg.seed) * cfg.images_per_prompt
    texts = [world.prompt(w["shape"], w["color"], w["pattern"], w["background"]) for w in wanted]
    images = generate(pipe, texts, cfg.seed, cfg)
    acc = attribute_accuracy(clf.predict(images), wanted)
    acc["all_four"] = float(np.mean([p == w for p, w in zip(clf.predict(images), wanted)]))
    return acc, images


def evaluate(pipe, clf: AttributeClassifier, cfg: EvalConfig) -> dict:
    """Scores on training and held-out triples; 'passes_bar' applies to training triples only."""
    t0 = time.time()
    train_acc, _ = score_split(pipe, clf, world.training_triples(), cfg)
    held_acc, _ = score_split(pipe, clf, world.held_out_triples(), cfg)
    passes = all(train_acc[k] >= v for k, v in BAR.items())
    return {"training_triples": train_acc, "held_out_triples": held_acc, "bar": BAR, "passes_bar": passes,
            "config": asdict(cfg), "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", type=Path, default=PIPELINE_DIR)
    ap.add_argument("--prompts", type=int, default=EvalConfig.prompts)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = EvalConfig(prompts=args.prompts)
    report = evaluate(load_pipeline(args.pipeline), AttributeClassifier(), cfg)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
