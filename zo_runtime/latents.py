"""The latent cache: training photos -> VAE latents (and their mirror images), encoded once per run folder."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .image_io import read_rgb
from .io_utils import atomic_savez
from .model_dir import INPUTS, ModelDir
from .session import OnnxModel

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Latents:
    """Posterior of every image and its mirror image, already times the latent scaling factor."""

    names: list[str]
    mean: np.ndarray    # (N, 2, C, h, w) float32; [:, 1] is the horizontally flipped image
    std: np.ndarray     # (N, 2, C, h, w) float32
    # (N, 2, 6) SDXL micro-conditioning of each image and its mirror: original (height, width) before resizing,
    # the crop's (top, left) in the resized image (mirrored for the flip), target (height, width)
    time_ids: np.ndarray | None = None

    def sample(self, rng: np.random.Generator, index: int, flip: bool, mode: str) -> np.ndarray:
        """(1, C, h, w) x0: the posterior mean, or a posterior sample like the reference's latent_dist.sample()."""
        mean = self.mean[index, int(flip)]
        if mode == "mean":
            return mean[None]
        return (mean + self.std[index, int(flip)] * rng.standard_normal(mean.shape, dtype=np.float32))[None]


# Sizes above this many times the model's native one are refused unless asked for: activation memory and
# time grow with the pixels ((R/N)^2), and such a typo (100000 px) would try to allocate tens of GB.
MAX_SIZE_FACTOR = 2


def check_size(model: ModelDir, px: int, what: str, allow_large: bool = False) -> None:
    """ValueError when px exceeds MAX_SIZE_FACTOR x the model's native size (unless allow_large)."""
    native = int(model.manifest["native_resolution"])
    if px > MAX_SIZE_FACTOR * native and not allow_large:
        raise ValueError(f"{what} {px} is over {MAX_SIZE_FACTOR}x this model's native {native} px: each UNet pass "
                         f"would take ~{(px / native) ** 2:.0f}x the memory and time of one at {native} px. Use "
                         f"{native}, or allow it with --set large_resolution=true")


def check_resolution(model: ModelDir, resolution: int | None, allow_large: bool = False) -> int:
    """The training resolution: native by default; a multiple of vae_scale_factor*8; equal to static shapes;
    at most MAX_SIZE_FACTOR x native unless allow_large."""
    res = int(model.manifest["native_resolution"] if resolution is None else resolution)
    step = int(model.manifest["vae_scale_factor"]) * 8
    if res <= 0 or res % step:
        raise ValueError(f"resolution {res} must be a positive multiple of {step} (VAE factor "
                         f"{model.manifest['vae_scale_factor']} x 8, for the UNet's down-sampling); try {max(step, res // step * step)}")
    check_size(model, res, "--resolution", allow_large)
    static = model.static_shapes
    if static and (static.get("height"), static.get("width")) != (res, res):
        raise ValueError(f"{model.root} is a static-shape model for {static.get('height')}x{static.get('width')} px; "
                         f"train at --resolution {static.get('height')} or quantize again for {res} px")
    return res


def list_images(folder: str | Path) -> list[Path]:
    """Image files in a folder (by suffix, sorted, hidden files skipped); ValueError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder {folder} does not exist or is not a folder")
    paths = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); put 3-5 photos of the subject there")
    return paths


def load_image(path: Path, resolution: int, geometry: list | None = None) -> np.ndarray:
    """(3, res, res) float32 in [-1, 1]: the image as it looks (image_io.read_rgb), short side resized,
    center crop. geometry: appended with the (6,) time ids of the image and of its mirror (Latents.time_ids)."""
    im = read_rgb(path)
    w, h = im.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    if geometry is not None:       # as diffusers' SDXL scripts: a flipped crop's left edge is mirrored too
        geometry.append([[h, w, top, left, resolution, resolution], [h, w, top, nw - left - resolution, resolution,
                                                                     resolution]])
    return (np.asarray(im, np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def _cache_key(model: ModelDir, paths: list[Path], resolution: int) -> str:
    h = hashlib.sha256((model.root / "manifest.json").read_bytes())
    h.update(f"{resolution}/time_ids".encode())       # caches from before time ids are rebuilt
    for p in paths:
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def _encode(vae: OnnxModel, image: np.ndarray) -> np.ndarray:
    """(3, H, W) -> (2C, h, w) posterior parameters; pads the batch for a static-batch encoder."""
    shape = vae.inputs["sample"].shape
    batch = shape[0] if isinstance(shape[0], int) else 1
    return vae.run({"sample": np.repeat(image[None], batch, axis=0)})[0][0]


def encode_images(model: ModelDir, images_dir: str | Path, resolution: int, cache_dir: str | Path,
                  provider: str = "cpu", provider_options: dict | None = None) -> Latents:
    """VAE-encode every image and its mirror image once; reuse the cache keyed by content, resolution, model."""
    paths = list_images(images_dir)
    cache = Path(cache_dir) / f"latents-{_cache_key(model, paths, resolution)}.npz"
    names = [p.name for p in paths]
    if cache.is_file():
        with np.load(cache) as z:
            return Latents(names, z["mean"], z["std"], z["time_ids"])
    geometry: list = []
    pixels = [load_image(p, resolution, geometry) for p in paths]   # all decoded first: a bad file fails first
    vae = OnnxModel(model.onnx("vae_encoder"), provider, provider_options, expect=INPUTS["vae_encoder"])
    sf = float(model.manifest["scaling_factor"])
    params = np.stack([[_encode(vae, px), _encode(vae, px[:, :, ::-1])] for px in pixels])  # (N, 2, 2C, h, w)
    c = params.shape[2] // 2
    mean = params[:, :, :c] * sf
    std = np.exp(0.5 * np.clip(params[:, :, c:], -30.0, 20.0)) * sf    # as diffusers' DiagonalGaussianDistribution
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    time_ids = np.asarray(geometry, np.float32)                          # (N, 2, 6)
    atomic_savez(cache, mean=mean, std=std, time_ids=time_ids)
    return Latents(names, mean, std, time_ids)
