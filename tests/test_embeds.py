"""Learned-embeds files: diffusers and A1111 layouts load; bad files get errors that name the fix."""
import numpy as np
import pytest
from safetensors.numpy import save_file

from zo_runtime.embeds import load_learned_embeds, save_learned_embeds, vector_names

D = 8


def test_diffusers_roundtrip_and_single_vector(tmp_path):
    vec = np.arange(2 * D, dtype=np.float32).reshape(2, D)
    name, got = load_learned_embeds(save_learned_embeds(tmp_path / "a.safetensors", "<cat>", vec), dim=D)
    assert name == "<cat>" and np.array_equal(got, vec)
    save_file({"sks": np.ones(D, np.float32)}, str(tmp_path / "b.safetensors"))      # (d,) -> (1, d)
    name, got = load_learned_embeds(tmp_path / "b.safetensors", dim=D, token="override")
    assert name == "override" and got.shape == (1, D)
    assert vector_names("sks", 3) == ["sks", "sks_1", "sks_2"]


@pytest.mark.parametrize("key", ["emb_params", "string_to_param.*"])
def test_a1111_layouts_take_the_file_name(tmp_path, key):
    save_file({key: np.full((3, D), 0.5, np.float32)}, str(tmp_path / "my-style.safetensors"))
    name, got = load_learned_embeds(tmp_path / "my-style.safetensors", dim=D)
    assert name == "my-style" and got.shape == (3, D) and (got == 0.5).all()


@pytest.mark.parametrize("tensors, message", [
    ({"t": np.zeros((1, D + 1), np.float32)}, "does not match this model's 8"),
    ({"t": np.array([[np.nan] * D], np.float32)}, "NaN or inf"),
    ({"t": np.array([[np.inf] * D], np.float32)}, "NaN or inf"),
    ({"a": np.zeros((1, D), np.float32), "b": np.zeros((1, D), np.float32)}, "unknown embedding layout"),
    ({"t": np.zeros((1, 2, D), np.float32)}, r"expected \(k, d\)"),
])
def test_bad_contents_are_refused(tmp_path, tensors, message):
    save_file(tensors, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match=message):
        load_learned_embeds(tmp_path / "x.safetensors", dim=D)


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt"])
def test_pickles_are_never_opened(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")    # a malicious pickle: must not even be read
    with pytest.raises(ValueError, match="pickled files are never loaded.*save_file"):
        load_learned_embeds(path, dim=D)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_learned_embeds(tmp_path / "nope.safetensors")
    (tmp_path / "c.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_learned_embeds(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="finite"):
        save_learned_embeds(tmp_path / "s.safetensors", "t", np.full((1, D), np.nan))
