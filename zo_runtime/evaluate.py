"""DreamBooth-protocol evaluation of a learned token: generate K images per prompt, score CLIP-I, CLIP-T, DINO.

Metrics run as ONNX models (written by `zoodip export-metrics`) on onnxruntime, preprocessing in numpy + Pillow.
The scoring step is a plug-in (`Scorer`): the toy world passes its own classifier-based scorer.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from . import image_io as im
from .assets import DREAMBOOTH_PROMPTS
from .generate import GenerateConfig, Generator
from .io_utils import atomic_write_json
from .session import OnnxModel
from .tokenizer import EOS, ClipTokenizer

# DreamBooth's prompt lists, shipped with zoodip (zo_runtime/assets); --prompts-file overrides.
DEFAULT_PROMPTS_FILE = DREAMBOOTH_PROMPTS
LIVE_CLASSES = ("dog", "cat")        # DreamBooth's live subjects are its dogs and cats
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
THUMB = 128                          # contact-sheet cell size in pixels


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of one `zoodip evaluate` run (defaults: the DreamBooth / ZOODiP protocol)."""

    per_prompt: int = 5              # K images per prompt (protocol: 5)
    num_prompts: int = 25            # the whole 25-prompt list; fewer for a quick look
    steps: int = 50                  # protocol: 50 steps
    guidance: float = 7.5            # protocol: 7.5
    scheduler: str = "ddim"          # deterministic, matched to diffusers
    seed: int = 0                    # prompt p, image i uses seed + p * K + i
    kind: str = "auto"               # object | live | auto (live for LIVE_CLASSES)
    class_word: str | None = None    # None: looked up by the subject folder name in the prompts file
    prompts_file: str | None = None  # None: DEFAULT_PROMPTS_FILE
    provider: str = "auto"
    provider_options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.per_prompt < 1 or self.num_prompts < 1:
            raise ValueError("-k and --prompts must be >= 1")
        if self.kind not in ("auto", "object", "live"):
            raise ValueError(f"--kind must be auto, object or live, got {self.kind!r}")
        GenerateConfig(n=self.per_prompt, steps=self.steps, guidance=self.guidance, scheduler=self.scheduler)


def parse_prompts_file(path: str | Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """DreamBooth's prompts_and_classes.txt -> ({subject: class}, {"object": [...], "live": [...]}).

    Templates keep `{0}` (unique token) and `{1}` (class word), as in the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --prompts-file (DreamBooth's prompts_and_classes.txt)")
    text = path.read_text(encoding="utf-8")
    classes = dict(re.findall(r"^([\w-]+),([^,\n]+)$", text, flags=re.M))
    classes.pop("subject_name", None)
    lists = {}
    for kind, header in (("object", "Object Prompts"), ("live", "Live Subject Prompts")):
        start = text.find(header)
        if start < 0:
            raise ValueError(f"{path}: section {header!r} not found; is this DreamBooth's prompts_and_classes.txt?")
        block = text[start:text.index("]", start)]
        lists[kind] = re.findall(r"'([^']*)'\.format", block)
        if not lists[kind]:
            raise ValueError(f"{path}: no prompts found under {header!r}")
    return classes, lists


def ti_prompt(template: str, token: str) -> str:
    """'a {0} {1} in the jungle' -> 'a sks in the jungle' (class word left out, as in TI)."""
    return " ".join(template.format(token, "").split())


def class_prompt(template: str, class_word: str) -> str:
    """The text CLIP-T compares against: the placeholder said as its class ('a dog in the jungle')."""
    return " ".join(template.format("", class_word).split())


# ---- numpy preprocessing and the metric formulas ---------------------------------------------------------

def preprocess(images: list[np.ndarray], resize: int, crop: int, mean, std) -> np.ndarray:
    """(H, W, 3) uint8 images -> (B, 3, crop, crop) float32: shortest side -> resize (bicubic), center crop,
    scale to [0, 1], normalize (as CLIPImageProcessor / torchvision's eval transform)."""
    out = []
    for image in images:
        pil = Image.fromarray(np.asarray(image, np.uint8))
        w, h = pil.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(resize * long / short)
        size = (resize, new_long) if w <= h else (new_long, resize)
        pil = pil.resize(size, Image.Resampling.BICUBIC)
        x = np.asarray(pil, np.float32)
        top, left = (x.shape[0] - crop) // 2, (x.shape[1] - crop) // 2
        out.append(x[top:top + crop, left:left + crop])
    x = np.stack(out) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over all pairs (i, j) of cos(a_i, b_j): CLIP-I and DINO (generated vs real), CLIP-T (vs one text)."""
    return float((normalize(a) @ normalize(b).T).mean())


class Scorer(Protocol):
    """The plug-in metric step: embed the real photos once, then score each prompt's generated images."""

    names: tuple[str, ...]

    def set_reference(self, real: list[np.ndarray]) -> None: ...

    def score(self, generated: list[np.ndarray], text: str) -> dict[str, float]: ...


class DreamBoothScorer:
    """CLIP-I, CLIP-T and DINO with the ONNX models of `zoodip export-metrics`."""

    names = ("clip_i", "clip_t", "dino")

    def __init__(self, metrics_dir: str | Path, provider: str = "auto", provider_options: dict | None = None):
        root = Path(metrics_dir)
        if not (root / "manifest.json").is_file():
            raise FileNotFoundError(f"{root} holds no metric models: run `zoodip export-metrics {root}` first")
        self.clip_cfg = json.loads((root / "clip" / "preprocess.json").read_text())
        self.dino_cfg = json.loads((root / "dino" / "preprocess.json").read_text())
        self.clip_image = OnnxModel(root / "clip" / "image.onnx", provider, provider_options)
        self.clip_text = OnnxModel(root / "clip" / "text.onnx", provider, provider_options)
        self.dino = OnnxModel(root / "dino" / "model.onnx", provider, provider_options)
        self.tokenizer = ClipTokenizer(root / "clip" / "tokenizer", pad_token=EOS,
                                       max_length=int(self.clip_cfg.get("max_length", 77)))
        self.real_clip = self.real_dino = None

    def embed_clip(self, images: list[np.ndarray]) -> np.ndarray:
        c = self.clip_cfg
        return self.clip_image.run({"pixel_values": preprocess(images, c["resize"], c["crop"], c["mean"], c["std"])})[0]

    def embed_dino(self, images: list[np.ndarray]) -> np.ndarray:
        c = self.dino_cfg
        return self.dino.run({"pixel_values": preprocess(images, c["resize"], c["crop"], c["mean"], c["std"])})[0]

    def embed_text(self, texts: list[str]) -> np.ndarray:
        return self.clip_text.run({"input_ids": self.tokenizer(texts)})[0]

    def set_reference(self, real: list[np.ndarray]) -> None:
        self.real_clip, self.real_dino = self.embed_clip(real), self.embed_dino(real)

    def score(self, generated: list[np.ndarray], text: str) -> dict[str, float]:
        if self.real_clip is None:
            raise ValueError("call set_reference(real_photos) before score()")
        g = self.embed_clip(generated)
        return {"clip_i": mean_cosine(g, self.real_clip), "clip_t": mean_cosine(g, self.embed_text([text])),
                "dino": mean_cosine(self.embed_dino(generated), self.real_dino)}


def load_scorer(spec: str, metrics_dir, provider: str = "auto", options: dict | None = None) -> Scorer:
    """'package.module:factory' -> factory(metrics_dir, provider, options), e.g. the toy world's classifier."""
    import importlib
    module, sep, attr = spec.partition(":")
    if not sep:
        raise ValueError(f"--scorer {spec!r} must look like package.module:factory")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--scorer {spec!r} cannot be loaded ({err})") from err
    scorer = factory(metrics_dir, provider, options)
    if not all(hasattr(scorer, a) for a in ("names", "set_reference", "score")):
        raise TypeError(f"--scorer {spec!r} returned {type(scorer).__name__}, which lacks names/set_reference/score")
    return scorer


def read_templates(path: str | Path) -> list[str]:
    """One prompt template per line ({0} = token, {1} = class word); blank lines and # comments skipped."""
    lines = [x.strip() for x in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [x for x in lines if x and not x.startswith("#")]
    if not lines or not all("{0}" in x for x in lines):
        raise ValueError(f"{path}: every template needs {{0}} where the learned token goes")
    return lines


# ---- the stage -------------------------------------------------------------------------------------------

def load_photos(folder: str | Path) -> list[np.ndarray]:
    """All images of a subject folder as (H, W, 3) uint8, sorted by name; ValueError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of subject photos")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTS)})")
    return [im.load_rgb(p) for p in files]


def subject_prompts(subject_dir: Path, cfg: EvaluateConfig) -> tuple[str, str, list[str]]:
    """(class word, kind, templates) for a subject folder from the prompts file and the config."""
    classes, lists = parse_prompts_file(cfg.prompts_file or DEFAULT_PROMPTS_FILE)
    word = cfg.class_word or classes.get(subject_dir.name)
    if not word:
        raise ValueError(f"no class known for subject {subject_dir.name!r}: pass --class-word (e.g. dog, backpack)")
    kind = cfg.kind if cfg.kind != "auto" else ("live" if word in LIVE_CLASSES else "object")
    return word, kind, lists[kind][:cfg.num_prompts]


def _prompt_images(gen: Generator, prompt: str, cfg: EvaluateConfig, p: int, folder: Path,
                   source: dict) -> list[np.ndarray]:
    """K images for prompt p; reused from folder only if an earlier run made them from the same prompt, seed,
    settings, model and embeds file (`source`: hashes), so a long SD run can resume."""
    K = cfg.per_prompt
    gcfg = GenerateConfig(n=K, steps=cfg.steps, guidance=cfg.guidance, scheduler=cfg.scheduler,
                          seed=cfg.seed + p * K, progress=False)
    paths = [folder / f"{p:02d}_{i}.png" for i in range(K)]
    metas = [{k: str(v) if isinstance(v, str) else json.dumps(v) for k, v in
              {**gen.metadata(prompt, gcfg, i), **source}.items()} for i in range(K)]
    if all(q.is_file() for q in paths) and all(im.read_meta(q) == m for q, m in zip(paths, metas)):
        return [im.load_rgb(q) for q in paths]
    images = gen.sample(prompt, gcfg)
    for i, (q, image) in enumerate(zip(paths, images)):
        im.save_png(q, image, {**gen.metadata(prompt, gcfg, i), **source})
    return list(images)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def contact_sheet(path: Path, real: list[np.ndarray], rows: list[list[np.ndarray]]) -> Path:
    """Top row: the real photos; then one row per prompt: a real photo beside that prompt's generated images."""
    def thumb(x):        # center square, then THUMB px (photos are not square; don't squash them)
        s = min(x.shape[:2])
        top, left = (x.shape[0] - s) // 2, (x.shape[1] - s) // 2
        return np.asarray(Image.fromarray(x[top:top + s, left:left + s]).resize((THUMB, THUMB), Image.Resampling.BICUBIC))
    cols = max(len(rows[0]) + 1 if rows else 1, min(len(real), 8))
    cells = [thumb(x) for x in real[:cols]] + [np.full((THUMB, THUMB, 3), 255, np.uint8)] * (cols - min(len(real), cols))
    for p, row in enumerate(rows):
        line = [thumb(real[p % len(real)])] + [thumb(x) for x in row]
        cells += line + [np.full((THUMB, THUMB, 3), 255, np.uint8)] * (cols - len(line))
    return im.save_grid(path, cells, cols=cols)


def evaluate(model_dir, embeds_file, subject_dir, metrics_dir, out_dir, cfg: EvaluateConfig = EvaluateConfig(),
             scorer: Scorer | None = None, templates: list[str] | None = None, class_word: str | None = None) -> Path:
    """Generate and score; writes OUT/results.json, OUT/contact_sheet.png, OUT/images/; returns results.json.

    `scorer`/`templates`/`class_word` let other worlds (the toy world) plug in their own metric and prompts."""
    subject_dir, out_dir = Path(subject_dir), Path(out_dir)
    if templates is None:
        class_word, kind, templates = subject_prompts(subject_dir, cfg)
    else:
        kind, class_word = "custom", class_word or cfg.class_word or ""
    real = load_photos(subject_dir)
    options = dict(cfg.provider_options)
    scorer = scorer or DreamBoothScorer(metrics_dir, cfg.provider, options)   # before the SD sessions: fail fast
    scorer.set_reference(real)
    gen = Generator(model_dir, [], cfg.provider, options)
    token = gen.add_embeds(embeds_file)
    source = {"embeds_sha256": _sha256(embeds_file),
              "unet_sha256": gen.model.manifest["files"].get("unet/model.onnx", "")}
    t0, rows, per_prompt = time.perf_counter(), [], []
    for p, template in enumerate(tqdm(templates, desc="evaluate", unit="prompt")):
        prompt, text = ti_prompt(template, token), class_prompt(template, class_word)
        images = _prompt_images(gen, prompt, cfg, p, out_dir / "images", source)
        rows.append(images)
        per_prompt.append({"prompt": prompt, "text": text, **scorer.score(images, text),
                           "images": [f"images/{p:02d}_{i}.png" for i in range(len(images))]})
    overall = {k: float(np.mean([r[k] for r in per_prompt])) for k in scorer.names}
    results = {"overall": overall, "per_prompt": per_prompt, "token": token, "class_word": class_word, "kind": kind,
               "subject": str(subject_dir), "model": str(model_dir), "embeds": str(embeds_file),
               "num_images": sum(len(r) for r in rows), "num_real": len(real),
               "seconds": round(time.perf_counter() - t0, 2), "config": asdict(cfg)}
    contact_sheet(out_dir / "contact_sheet.png", real, rows)
    return atomic_write_json(out_dir / "results.json", results)
