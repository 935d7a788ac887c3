"""Scoring a learned token in the toy world: torch-free generation (onnxruntime) + the attribute classifier.

The DreamBooth protocol's metrics have toy analogues that need no downloaded model:
  concept_fidelity   share of images whose shape, color and pattern all match the concept (CLIP-I/DINO analogue)
  prompt_fidelity    share of background prompts whose image shows the asked background (CLIP-T analogue)
  feature_similarity mean cosine of classifier features, generated vs training images
Every method is scored on the same prompts, seeds and initial noise, so differences are paired.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.toyworld import world
from models.toyworld.attributes import AttributeClassifier
from zo_runtime.generate import GenerateConfig, Generator

PHOTO_PROMPT = "a photo of a {}"                   # the TI "does it draw the subject" prompt
BACKGROUND_PROMPT = "a {} on a {} background"      # the toy captions' own form: recontextualization


@dataclass(frozen=True)
class ToyEvalConfig:
    images_per_prompt: int = 8       # 8 x 4 prompts = 32 images: a 1/32 fidelity resolution per concept
    backgrounds: int = 3             # background prompts; + the photo prompt = 4 prompts (the minimum)
    steps: int = 25                  # DDIM steps of the model's own quality bar (MODEL_CARD.md)
    guidance: float = 5.0            # CFG scale the toy model was validated at
    seed: int = 1000                 # image i of every prompt starts from seed + i, for every method


def eval_backgrounds(concept: tuple[str, str, str], train_scenes: list, count: int, seed: int) -> list[str]:
    """`count` background words the training photos did not show (allowed ones first; seeded order)."""
    shown = {s.background for s in train_scenes}
    allowed = world.allowed_backgrounds(concept[1])
    fresh = [b for b in allowed if b not in shown]
    rng = np.random.default_rng(seed)
    fresh = [fresh[i] for i in rng.permutation(len(fresh))] if fresh else []
    rest = [b for b in allowed if b not in fresh]
    return (fresh + rest)[:count]


def prompts_for(subject: str, backgrounds: list[str]) -> list[tuple[str, str | None]]:
    """[(prompt, asked background or None)] with `subject` as the token or words."""
    return [(PHOTO_PROMPT.format(subject), None)] + [(BACKGROUND_PROMPT.format(subject, b), b) for b in backgrounds]


class ToyEvaluator:
    """Opens the generator and the classifier once; scores any number of tokens of one concept."""

    def __init__(self, model_dir: str | Path, concept: tuple[str, str, str], train_images: list,
                 backgrounds: list[str], cfg: ToyEvalConfig = ToyEvalConfig()):
        self.cfg, self.concept, self.backgrounds = cfg, concept, backgrounds
        self.gen = Generator(model_dir, provider="cpu")
        self.clf = AttributeClassifier()
        self.train_features = self.clf.features(train_images)            # (n_train, 128)
        self.gcfg = GenerateConfig(n=cfg.images_per_prompt, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed,
                                   provider="cpu", progress=False)

    def set_token(self, token: str, vectors: np.ndarray) -> None:
        self.gen.set_token(token, vectors)

    def score(self, subject: str) -> tuple[dict, np.ndarray]:
        """Metrics for prompts naming `subject` (a learned token or words) and the (P, n, H, W, 3) images."""
        prompts = prompts_for(subject, self.backgrounds)
        images = np.stack([self.gen.sample(p, self.gcfg) for p, _ in prompts])   # (P, n, 64, 64, 3)
        flat = images.reshape(-1, *images.shape[2:])
        preds = self.clf.predict(flat)
        shape, color, pattern = self.concept
        hits = {k: np.array([p[k] == want for p in preds]) for k, want in
                (("shape", shape), ("color", color), ("pattern", pattern))}
        asked = [b for _, b in prompts for _ in range(self.cfg.images_per_prompt)]
        bg = [p["background"] == b for p, b in zip(preds, asked) if b is not None]
        feats = self.clf.features(flat)
        metrics = {
            "concept_fidelity": float(np.mean(hits["shape"] & hits["color"] & hits["pattern"])),
            "prompt_fidelity": float(np.mean(bg)),
            "feature_similarity": float((feats @ self.train_features.T).mean()),
            **{f"{k}_accuracy": float(v.mean()) for k, v in hits.items()},
        }
        return {k: round(v, 4) for k, v in metrics.items()}, images
