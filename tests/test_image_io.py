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


def _saved(tmp_path, name, im, **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return path


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    from PIL import Image
    a16 = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    path = _saved(tmp_path, "g16.png", Image.fromarray(a16))
    got = np.asarray(images.read_rgb(path))
    want = np.rint(a16 / 257.0).astype(np.uint8)
    assert Image.open(path).mode.startswith("I")
    assert np.array_equal(got, np.repeat(want[..., None], 3, axis=2)) and got.max() == 255 and got[24, 0, 0] < 255


def test_transparency_is_composited_on_white(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (32, 40), dtype=np.uint8)
    alpha[:8] = 0                                                     # fully transparent rows -> white
    want = np.rint(rgb * (alpha[..., None] / 255.0) + 255 * (1 - alpha[..., None] / 255.0))
    got = np.asarray(images.read_rgb(_saved(tmp_path, "a.png", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))))
    assert np.abs(got.astype(int) - want).max() <= 1 and (got[:8] == 255).all()
    grey = np.dstack([rgb[..., 0], alpha])
    got = np.asarray(images.read_rgb(_saved(tmp_path, "la.png", Image.fromarray(grey, "LA"))))
    want_g = np.rint(rgb[..., 0] * (alpha / 255.0) + 255 * (1 - alpha / 255.0))
    assert np.abs(got[..., 0].astype(int) - want_g).max() <= 1 and np.array_equal(got[..., 0], got[..., 2])


def test_palette_with_a_transparent_index(tmp_path):
    from PIL import Image
    pal = Image.new("P", (4, 4))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putdata([0, 1] * 8)
    got = np.asarray(images.read_rgb(_saved(tmp_path, "p.png", pal, transparency=1)))
    assert (got.reshape(-1, 3)[0::2] == [255, 0, 0]).all() and (got.reshape(-1, 3)[1::2] == 255).all()   # index 1: white


def test_cmyk_and_exif_rotation(tmp_path):
    from PIL import Image
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    cmyk = rgb.convert("CMYK")
    path = _saved(tmp_path, "c.jpg", cmyk, quality=100)
    assert np.abs(np.asarray(images.read_rgb(path)).astype(int) - np.asarray(Image.open(path).convert("RGB"))).max() == 0
    exif = rgb.getexif()
    exif[0x0112] = 6                                                  # rotate 90 degrees clockwise to display
    path = _saved(tmp_path, "r.png", rgb, exif=exif)
    got = np.asarray(images.read_rgb(path))
    assert got.shape == (30, 20, 3) and np.array_equal(got, np.rot90(np.asarray(rgb), k=-1))
