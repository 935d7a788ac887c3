"""Image files in and out: PNGs written atomically with metadata in text chunks, grids, and load_rgb (numpy + Pillow)."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .io_utils import atomic_write

# Pixels between grid cells, and their value (white reads as a gap on any image).
GRID_GAP = 2
GRID_FILL = 255


def to_uint8(images: np.ndarray) -> np.ndarray:
    """VAE output (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded like diffusers' numpy_to_pil."""
    x = np.clip(np.asarray(images, dtype=np.float32) / 2 + 0.5, 0.0, 1.0)
    return (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def _check_hwc(image: np.ndarray, what: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"{what} must be a (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    return image


def _pnginfo(meta: dict | None) -> PngImagePlugin.PngInfo:
    """Each meta entry becomes one tEXt chunk; non-strings are stored as JSON so they read back typed."""
    info = PngImagePlugin.PngInfo()
    for key, value in (meta or {}).items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value))
    return info


def save_png(path: str | Path, image: np.ndarray, meta: dict | None = None) -> Path:
    """Write one (H, W, 3) uint8 image as PNG with `meta` in text chunks, atomically; returns the path."""
    image = _check_hwc(image)
    pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
    info = _pnginfo(meta)
    return atomic_write(path, lambda p: pil.save(p, format="PNG", pnginfo=info))


def read_meta(path: str | Path) -> dict[str, str]:
    """The PNG text chunks of a file (as strings), e.g. to check what a sample was made with."""
    with Image.open(path) as im:
        im.load()
        return dict(getattr(im, "text", {}) or {})


def make_grid(images: list[np.ndarray], cols: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 images -> one (rows*H + gaps, cols*W + gaps, 3) uint8 grid; cols defaults to ~sqrt(n)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    images = [_check_hwc(im, f"grid image {i}") for i, im in enumerate(images)]
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    c = max(im.shape[2] for im in images)
    cols = cols or math.ceil(math.sqrt(len(images)))
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    grid = np.full((rows * h + (rows - 1) * GRID_GAP, cols * w + (cols - 1) * GRID_GAP, c), GRID_FILL, np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        y, x = r * (h + GRID_GAP), q * (w + GRID_GAP)
        if im.shape[2] != c:   # grey or RGBA mixed with RGB: broadcast grey, drop alpha
            im = np.repeat(im[..., :1], c, axis=2) if im.shape[2] == 1 else im[..., :c]
        grid[y:y + im.shape[0], x:x + im.shape[1]] = im
    return grid


def save_grid(path: str | Path, images: list[np.ndarray], cols: int | None = None, meta: dict | None = None) -> Path:
    """make_grid + save_png; returns the path written."""
    return save_png(path, make_grid(images, cols), meta)


def grid(images: list[np.ndarray], cols: int | None = None) -> Image.Image:
    """make_grid as a PIL image."""
    return Image.fromarray(make_grid(images, cols))


write_grid = save_grid   # the name some callers use


BACKGROUND = (255, 255, 255)   # transparent pixels are composited on white, as an image viewer shows them


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB as it looks: EXIF orientation applied, 16-bit grey scaled (not clipped),
    palette / LA / RGBA composited on white, CMYK and other modes through PIL's conversion."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, np.float64)
        # 16-bit PNGs open as I;16 (or I); 32-bit I or float F images keep their range when it fits 8 bits
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else (1.0 if im.mode == "F" and a.max() <= 1 else 255.0)
        return Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        flat = Image.new("RGB", im.size, BACKGROUND)
        flat.paste(im, mask=im.getchannel("A"))
        return flat
    return im.convert("RGB")


def read_rgb(path: str | Path) -> Image.Image:
    """An image file as 8-bit RGB (to_rgb); ValueError naming the file and the fix for anything unreadable."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                rgb = to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"image {path} is too large to read safely ({err}); downscale it (photos of a few "
                         "megapixels are plenty: training uses 512-1024 px)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
        raise ValueError(f"cannot read image {path} ({err}); remove or replace that file") from None
    if 0 in rgb.size:
        raise ValueError(f"image {path} is empty ({rgb.width}x{rgb.height}); remove or replace that file")
    return rgb


def load_rgb(path: str | Path, size: int | None = None) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB (read_rgb); optional center-crop + resize to size x size."""
    im = read_rgb(path)
    if size:
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)
