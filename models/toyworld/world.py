"""The toy world: seeded 64x64 images of patterned shapes on plain backgrounds (numpy + Pillow, no torch).

An image is fully described by four attributes (shape, color, pattern, background). A concept is a
(shape, color, pattern) triple; the held-out rule below removes 1/8 of the triples from training so
they can serve as personalization concepts, each initialized from its shape word.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64  # output side in pixels (SD-format model works on 64x64 images)
SUPERSAMPLE = 2  # draw at 128 px and downscale: antialiased edges like a photo, not jagged masks

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "ring")
COLORS = {  # object colors; pattern ink is a dark shade of the same color
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "cyan": (40, 210, 220), "blue": (40, 70, 220), "purple": (140, 50, 190), "pink": (245, 130, 190),
}
PATTERNS = ("solid", "striped", "dotted", "checkered")
BACKGROUNDS = {  # plain backgrounds; red/green/blue reuse the object RGB, so "never equal" is a real rule
    "white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128),
    "red": COLORS["red"], "green": COLORS["green"], "blue": COLORS["blue"],
}
COLOR_NAMES = tuple(COLORS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
# every word of the world, once (23): `--init-candidates` for its concepts
WORDS = tuple(dict.fromkeys((*SHAPES, *COLOR_NAMES, *PATTERNS, *BACKGROUND_NAMES)))
INK_SHADE = 0.35  # pattern ink = 35% of the object color: visible on every color, never a new hue
PATTERN_PERIOD = 12  # px at 64 px; 3 latent pixels per period for a factor-4 VAE, so patterns survive it

# Held-out rule (see `is_held_out`): seed of the permutations that pick 1/8 of the triples.
HOLDOUT_SEED = 6

CAPTION_TEMPLATES = (  # {a}: attribute phrase such as "red striped star"; {bg}: background word
    "a {a} on a {bg} background",
    "a photo of a {a} on a {bg} background",
    "{bg} background with a {a}",
    "a {a}, {bg} background",
    "an image of a {a} in front of a {bg} background",
    "on a {bg} background, a {a}",
)
NO_BACKGROUND_TEMPLATES = ("a photo of a {a}", "a {a}")  # rare: the model must also draw without a bg word
NO_BACKGROUND_SHARE = 0.1  # 90% of captions name the background: the trial ignored bg words when rare


@dataclass(frozen=True)
class Scene:
    """All attributes of one image; `jitter` is (dx, dy, radius, angle_deg)."""

    shape: str
    color: str
    pattern: str
    background: str
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 22.0, 0.0)

    def __post_init__(self):
        for value, allowed, name in ((self.shape, SHAPES, "shape"), (self.color, COLOR_NAMES, "color"),
                                     (self.pattern, PATTERNS, "pattern"),
                                     (self.background, BACKGROUND_NAMES, "background")):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {allowed}")
        if BACKGROUNDS[self.background] == COLORS[self.color]:
            raise ValueError(f"background {self.background!r} equals the object color; pick another background")

    @property
    def concept(self) -> tuple[str, str, str]:
        return (self.shape, self.color, self.pattern)


def all_triples() -> list[tuple[str, str, str]]:
    """Every (shape, color, pattern) triple: 8 * 8 * 4 = 256."""
    return [(s, c, p) for s in SHAPES for c in COLOR_NAMES for p in PATTERNS]


@lru_cache(maxsize=None)
def _holdout_codes(seed: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    a = tuple(int(x) for x in rng.permutation(8))  # shape code, a permutation of 0..7
    b = tuple(int(x) for x in rng.permutation(8))  # color code, a permutation of 0..7
    d = tuple(int(x) for x in rng.choice(8, size=len(PATTERNS), replace=False))  # 4 distinct pattern codes
    return a, b, d


def is_held_out(triple: tuple[str, str, str], seed: int = HOLDOUT_SEED) -> bool:
    """Rule: held out iff (a[shape] + b[color] + d[pattern]) % 8 == 0, with seeded codes a, b, d.

    Because a and b are permutations and d has distinct values, exactly one color is held out per
    (shape, pattern), exactly one shape per (color, pattern) and at most one pattern per (shape, color):
    32 of 256 triples (12.5%), and every attribute pair still occurs in training.
    """
    s, c, p = triple
    a, b, d = _holdout_codes(seed)
    return (a[SHAPES.index(s)] + b[COLOR_NAMES.index(c)] + d[PATTERNS.index(p)]) % 8 == 0


def held_out_triples(seed: int = HOLDOUT_SEED) -> list[tuple[str, str, str]]:
    return [t for t in all_triples() if is_held_out(t, seed)]


def training_triples(seed: int = HOLDOUT_SEED) -> list[tuple[str, str, str]]:
    return [t for t in all_triples() if not is_held_out(t, seed)]


def allowed_backgrounds(color: str) -> list[str]:
    """Backgrounds whose RGB differs from the object color."""
    return [b for b in BACKGROUND_NAMES if BACKGROUNDS[b] != COLORS[color]]


def _polygon(shape: str, r: float) -> list[tuple[float, float]] | None:
    """Outline points around (0, 0) with radius r; None for shapes drawn another way."""
    if shape == "square":
        h = r * 0.8
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":
        return [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    if shape == "diamond":
        return [(0, -r), (0.7 * r, 0), (0, r), (-0.7 * r, 0)]
    if shape == "star":
        return [((r if i % 2 == 0 else 0.45 * r) * math.cos(math.radians(-90 + 36 * i)),
                 (r if i % 2 == 0 else 0.45 * r) * math.sin(math.radians(-90 + 36 * i))) for i in range(10)]
    if shape == "cross":
        w = 0.33 * r
        return [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
                (-r, -w), (-w, -w)]
    if shape == "heart":
        pts = []
        for k in range(48):  # classic parametric heart, scaled to radius r
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((r * x / 17, -r * (y + 2) / 17))
        return pts
    return None


def _shape_mask(shape: str, r: float, side: int) -> Image.Image:
    """Unrotated mask ('L', side x side) of the shape centered in the canvas."""
    m = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(m)
    c = side / 2
    pts = _polygon(shape, r)
    if pts is not None:
        draw.polygon([(c + x, c + y) for x, y in pts], fill=255)
    elif shape == "circle":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif shape == "ring":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
        draw.ellipse([c - 0.5 * r, c - 0.5 * r, c + 0.5 * r, c + 0.5 * r], fill=0)
    return m


def _pattern_texture(color: str, pattern: str, side: int, period: float) -> Image.Image:
    """Object fill ('RGB', side x side): the color, with the pattern drawn in its dark shade."""
    rgb = np.array(COLORS[color], dtype=np.float32)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    half = period / 2
    if pattern == "solid":
        ink = np.zeros((side, side), bool)
    elif pattern == "striped":
        ink = (xx % period) < half
    elif pattern == "checkered":
        ink = ((xx // half) + (yy // half)) % 2 == 1
    else:  # dotted: a dot of radius 0.27 period in every cell
        dx, dy = (xx % period) - half, (yy % period) - half
        ink = dx * dx + dy * dy < (0.27 * period) ** 2
    img = np.where(ink[..., None], rgb * INK_SHADE, rgb)  # (side, side, 3)
    return Image.fromarray(img.astype(np.uint8), "RGB")


def sample_jitter(rng: np.random.Generator) -> tuple[float, float, float, float]:
    """(dx, dy) in px, radius 17..25 px, angle in degrees; keeps the object inside the image."""
    radius = float(rng.uniform(17, 25))
    slack = SIZE / 2 - radius - 3
    dx, dy = (float(v) for v in rng.uniform(-slack, slack, size=2))
    return dx, dy, radius, float(rng.uniform(-30, 30))


def render(scene: Scene) -> np.ndarray:
    """(64, 64, 3) uint8 image of the scene."""
    k = SUPERSAMPLE
    side = SIZE * k
    dx, dy, radius, angle = scene.jitter
    mask = _shape_mask(scene.shape, radius * k, side)
    tex = _pattern_texture(scene.color, scene.pattern, side, PATTERN_PERIOD * k)
    # rotate object and its pattern together, then shift: pattern follows the object like a print
    mask = mask.rotate(angle, resample=Image.BILINEAR, translate=(dx * k, dy * k))
    tex = tex.rotate(angle, resample=Image.NEAREST, translate=(dx * k, dy * k))
    canvas = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    canvas.paste(tex, (0, 0), mask)
    return np.asarray(canvas.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.uint8)


def random_scene(rng: np.random.Generator, triples: list[tuple[str, str, str]] | None = None,
                 background: str | None = None) -> Scene:
    """A scene with a random triple from `triples` (default: all) and an allowed background."""
    triples = triples if triples is not None else all_triples()
    shape, color, pattern = triples[int(rng.integers(len(triples)))]
    bgs = allowed_backgrounds(color)
    bg = background if background is not None else bgs[int(rng.integers(len(bgs)))]
    return Scene(shape, color, pattern, bg, sample_jitter(rng))


def attribute_phrase(shape: str, color: str, pattern: str, rng: np.random.Generator) -> str:
    """Words for the object with varied order, e.g. 'red striped star' or 'striped red star'."""
    form = int(rng.integers(4))
    if form == 0:
        return f"{color} {pattern} {shape}"
    if form == 1:
        return f"{pattern} {color} {shape}"
    if form == 2:
        return f"{color} {shape} with a {pattern} pattern"
    return f"{shape} that is {color} and {pattern}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption from the templates; 90% of them name the background."""
    a = attribute_phrase(scene.shape, scene.color, scene.pattern, rng)
    if rng.random() < NO_BACKGROUND_SHARE:
        return NO_BACKGROUND_TEMPLATES[int(rng.integers(len(NO_BACKGROUND_TEMPLATES)))].format(a=a)
    return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(a=a, bg=scene.background)


def vocabulary() -> list[str]:
    """Every word a caption can use: the rows of the token table this model trained (the rest of its
    49,408 rows keep their random init), i.e. the toy's counterpart of SD's whole trained table."""
    words = {*SHAPES, *COLOR_NAMES, *PATTERNS, *BACKGROUND_NAMES, "with", "pattern", "that", "is", "and"}
    for template in (*CAPTION_TEMPLATES, *NO_BACKGROUND_TEMPLATES):
        words.update(template.replace("{a}", " ").replace("{bg}", " ").replace(",", " ").split())
    return sorted(words)


def prompt(shape: str, color: str, pattern: str, background: str) -> str:
    """The canonical evaluation prompt for a full attribute set."""
    return f"a {color} {pattern} {shape} on a {background} background"


def make_dataset(n: int, seed: int, triples: list[tuple[str, str, str]] | None = None
                 ) -> tuple[np.ndarray, list[Scene]]:
    """n images (n, 64, 64, 3) uint8 and their scenes, from `triples` (default: all)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, triples) for _ in range(n)]
    images = np.stack([render(s) for s in scenes]) if n else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return images, scenes


def concept_scenes(concept: tuple[str, str, str], n: int, seed: int, background: str | None = None) -> list[Scene]:
    """The n scenes behind `make_concept_images` (same seed, same scenes): their backgrounds tell a
    benchmark which background words the training photos already showed."""
    shape, color, pattern = concept
    Scene(shape, color, pattern, allowed_backgrounds(color)[0])  # validates the names
    rng = np.random.default_rng(seed)
    return [random_scene(rng, [concept], background) for _ in range(n)]


def make_concept_images(concept: tuple[str, str, str], n: int, seed: int,
                        background: str | None = None) -> list[Image.Image]:
    """n training images of one concept (shape, color, pattern) on random allowed backgrounds."""
    return [Image.fromarray(render(s)) for s in concept_scenes(concept, n, seed, background)]


def degrade(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild blur and noise on (n, 64, 64, 3) uint8, so the classifier also reads decoded/generated images."""
    out = np.empty_like(images)
    for i, img in enumerate(images):
        pil = Image.fromarray(img)
        radius = float(rng.uniform(0.0, 1.0))
        if radius > 0.2:
            pil = pil.filter(ImageFilter.GaussianBlur(radius))
        arr = np.asarray(pil, dtype=np.float32) + rng.normal(0, rng.uniform(0, 6), size=img.shape)
        out[i] = np.clip(arr, 0, 255).astype(np.uint8)
    return out
