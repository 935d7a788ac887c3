"""Shared session fixtures: tiny random SD pipelines (diffusers folders) and their zoodip ONNX exports.

Built once per test session from configs (no network): tiny = SD 1.x style (epsilon, pad <|endoftext|>),
tiny_v = SD 2.x style (gelu text encoder, linear projections, v-prediction, pad "!"); both use the real
CLIP BPE tokenizer zoodip ships (zo_runtime/assets/clip-bpe). Latents 16x16 (32 px images), d = 32.
`photos`: procedural photos (toy-world scenes) so no test needs anything outside the repository.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Python that makes torch & co. unimportable: a script after it proves its code path runs without them.
BLOCK_HEAVY = """import sys
class Block:
    def find_spec(self, name, *args):
        if name.split('.')[0] in ('torch', 'diffusers', 'transformers', 'optimum'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
"""


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where torch, diffusers, transformers and optimum cannot be imported."""
    return subprocess.run([sys.executable, "-c", BLOCK_HEAVY + code], capture_output=True, text=True)


def _replica(tmp_path_factory, kind: str, seed: int) -> Path:
    """A tiny random diffusers folder of export.replica's `kind`, in its own session folder."""
    from export.replica import write_replica
    return write_replica(kind, tmp_path_factory.mktemp(kind.replace("-", "_")) / "diffusers", seed=seed)


def _exported(tmp_path_factory, diffusers: Path, name: str) -> Path:
    """The zoodip ONNX export of `diffusers` (layout: zo_runtime/model_dir.py)."""
    from export.onnx_export import export_model
    return export_model(diffusers, tmp_path_factory.mktemp(name) / "model")


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory):
    """Path of a tiny random SD 1.x diffusers folder (StableDiffusionPipeline.from_pretrained loads it)."""
    return _replica(tmp_path_factory, "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_exported(tiny_diffusers, tmp_path_factory):
    """Path of the zoodip ONNX export of tiny_diffusers (layout: zo_runtime/model_dir.py)."""
    return _exported(tmp_path_factory, tiny_diffusers, "tiny_onnx")


@pytest.fixture(scope="session")
def tiny_v_diffusers(tmp_path_factory):
    """Path of a tiny random SD 2.x-style (v-prediction, pad "!") diffusers folder."""
    return _replica(tmp_path_factory, "tiny-v", seed=1)


@pytest.fixture(scope="session")
def tiny_v_exported(tiny_v_diffusers, tmp_path_factory):
    """Path of the zoodip ONNX export of tiny_v_diffusers."""
    return _exported(tmp_path_factory, tiny_v_diffusers, "tiny_v_onnx")


# (width, height) of the procedural photos: odd sizes and aspect ratios exercise resizing and cropping.
PHOTO_SIZES = ((96, 80), (64, 64), (120, 72), (72, 128), (100, 100), (80, 96))


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """A folder `dog/` of 6 procedural photos (toy-world scenes upscaled to odd sizes); `dog` is the name the
    DreamBooth class lookup keys on. Calibration takes the first 4, held-out gates the rest."""
    from PIL import Image

    from models.toyworld import world
    folder = tmp_path_factory.mktemp("photos") / "dog"
    folder.mkdir()
    images, _ = world.make_dataset(len(PHOTO_SIZES), seed=7)
    for i, (img, size) in enumerate(zip(images, PHOTO_SIZES)):
        Image.fromarray(img).resize(size, Image.Resampling.BICUBIC).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="session")
def xl_diffusers(tmp_path_factory):
    """Path of a tiny random SDXL-shaped diffusers folder (encoder widths 32 and 48, pooled width 40)."""
    return _replica(tmp_path_factory, "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def xl_exported(xl_diffusers, tmp_path_factory):
    """Path of the zoodip ONNX export of xl_diffusers."""
    return _exported(tmp_path_factory, xl_diffusers, "tiny_sdxl_onnx")
