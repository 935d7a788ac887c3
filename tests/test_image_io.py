"""PNG writing with metadata, grids and the VAE-output conversion."""
import json

import numpy as np
import pytest
from PIL import Image

from zo_runtime import image_io as images


def _img(seed, h=8, w=10):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_save_png_roundtrips_pixels_and_meta(tmp_path):
    im = _img(0)
    meta = {"prompt": "a sks dog", "seed": 3, "guidance": 7.5}
    out = images.save_png(tmp_path / "a" / "x.png", im, meta)
    assert out == tmp_path / "a" / "x.png"
    assert np.array_equal(np.asarray(Image.open(out)), im)
    text = images.read_meta(out)
    assert text["prompt"] == "a sks dog"
    assert json.loads(text["seed"]) == 3 and json.loads(text["guidance"]) == 7.5
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_save_png_rejects_float(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        images.save_png(tmp_path / "x.png", np.zeros((4, 4, 3), np.float32))


def test_grid_layout():
    ims = [_img(i) for i in range(5)]
    g = images.make_grid(ims, cols=3)
    gap = images.GRID_GAP
    assert g.shape == (2 * 8 + gap, 3 * 10 + 2 * gap, 3)
    assert np.array_equal(g[:8, :10], ims[0])
    assert np.array_equal(g[8 + gap:, 10 + gap:20 + gap], ims[4])
    assert (g[8:8 + gap] == images.GRID_FILL).all()
    assert (g[8 + gap:, 2 * (10 + gap):] == images.GRID_FILL).all()   # empty sixth cell
    assert images.make_grid(ims).shape[1] == 3 * 10 + 2 * gap          # default cols = ceil(sqrt(5))


def test_save_grid_and_to_uint8(tmp_path):
    x = np.array([-1.0, 0.0, 1.0, 2.0], np.float32).reshape(1, 1, 1, 4).repeat(3, axis=1)   # (1, 3, 1, 4)
    u = images.to_uint8(x)
    assert u.shape == (1, 1, 4, 3) and u[0, 0, :, 0].tolist() == [0, 128, 255, 255]
    p = images.save_grid(tmp_path / "g.png", [_img(1), _img(2)], cols=1, meta={"k": "v"})
    assert np.asarray(Image.open(p)).shape == (16 + images.GRID_GAP, 10, 3)
    assert images.read_meta(p)["k"] == "v"


def test_pil_grid_alias():
    ims = [_img(i) for i in range(2)]
    assert np.array_equal(np.asarray(images.grid(ims, cols=2)), images.make_grid(ims, cols=2))
    assert images.write_grid is images.save_grid
