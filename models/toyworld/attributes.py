"""Torch-free attribute classifier: reads shape, color, pattern and background of toy-world images (onnxruntime)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

from models.toyworld import world

CLASSIFIER_PATH = Path(__file__).with_name("classifier.onnx")
HEADS = {"shape": world.SHAPES, "color": world.COLOR_NAMES, "pattern": world.PATTERNS,
         "background": world.BACKGROUND_NAMES}
BATCH = 256  # rows per ORT call: bounded memory (256 x 3 x 64 x 64 floats = 12 MB)


def to_array(images: np.ndarray | Sequence[Image.Image] | Sequence[np.ndarray]) -> np.ndarray:
    """Normalize PIL images / uint8 HWC / float [0, 1] HWC arrays to (N, 64, 64, 3) uint8."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    arrs = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images]
    if not arrs:
        return np.zeros((0, world.SIZE, world.SIZE, 3), np.uint8)
    out = np.stack(arrs)
    if out.dtype != np.uint8:  # float images in [0, 1], as diffusers' output_type="np" returns them
        out = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    if out.shape[1:] != (world.SIZE, world.SIZE, 3):
        raise ValueError(f"images must be {world.SIZE}x{world.SIZE} RGB, got {out.shape[1:]}; resize them first")
    return out


class AttributeClassifier:
    """Wraps classifier.onnx: input 'images' (N, 3, 64, 64) float32 in [0, 1]."""

    def __init__(self, path: str | Path = CLASSIFIER_PATH):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path} not found; train it with `python -m models.toyworld.train_classifier`")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2  # the dev machine has 2 cores shared by everyone
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def _run(self, images) -> list[np.ndarray]:
        arr = to_array(images)
        x = arr.transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # (N, 3, 64, 64)
        parts = [self.session.run(None, {"images": x[i:i + BATCH]}) for i in range(0, len(x), BATCH)]
        if not parts:
            return [np.zeros((0, len(v))) for v in HEADS.values()] + [np.zeros((0, 1))]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]

    def predict(self, images) -> list[dict[str, str]]:
        """One dict per image: {'shape': 'star', 'color': 'red', 'pattern': ..., 'background': ...}."""
        outs = self._run(images)
        idx = [o.argmax(1) for o in outs[:4]]
        return [{name: HEADS[name][int(idx[k][i])] for k, name in enumerate(HEADS)} for i in range(len(idx[0]))]

    def features(self, images) -> np.ndarray:
        """(N, 128) L2-normalized penultimate features, for cosine image similarity."""
        f = self._run(images)[4]
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-8)

    def similarity(self, images_a, images_b) -> float:
        """Mean cosine between every image of a and every image of b."""
        return float((self.features(images_a) @ self.features(images_b).T).mean())


def attribute_accuracy(preds: list[dict[str, str]], wanted: list[dict[str, str]]) -> dict[str, float]:
    """Share of images whose predicted attribute equals the wanted one, per attribute present in `wanted`."""
    if len(preds) != len(wanted):
        raise ValueError(f"{len(preds)} predictions for {len(wanted)} targets; pass one target per image")
    keys = [k for k in HEADS if wanted and k in wanted[0]]
    return {k: float(np.mean([p[k] == w[k] for p, w in zip(preds, wanted)])) for k in keys}
