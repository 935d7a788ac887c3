"""Export stage: every submodel matches its PyTorch original; manifest, reuse, errors and the CLI behave."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from zo_runtime.model_dir import MANIFEST_KEYS, ModelDir
from zo_runtime.session import OnnxModel
from zo_runtime.tokenizer import ClipTokenizer

PAIRS = [("tiny_diffusers", "tiny_exported"), ("tiny_v_diffusers", "tiny_v_exported")]
PROMPTS = ["a photo of a dog", "an oil painting of a red fox in the snow, highly detailed"]


@pytest.fixture(params=PAIRS, ids=["sd1", "sd2v"])
def pair(request):
    src, out = request.param
    return request.getfixturevalue(src), ModelDir.open(request.getfixturevalue(out))


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def test_text_encoder_table_lookup_matches_clip(pair):
    from transformers import CLIPTextModel
    src, model = pair
    tok = ClipTokenizer(model.tokenizer_dir, model.manifest["pad_token"])
    ids = tok(PROMPTS)                                                     # (2, 77)
    embeds = np.asarray(model.token_table()[ids], dtype=np.float32)        # (2, 77, d)
    got = OnnxModel(model.onnx("text_encoder")).run({"inputs_embeds": embeds})[0]
    ref = CLIPTextModel.from_pretrained(src / "text_encoder").eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert got.shape == want.shape == (2, 77, model.dim)
    assert _max_err(got, want) < 1e-4
    # The causal mask matters: changing a late token must not change earlier positions.
    embeds2 = embeds.copy()
    embeds2[:, 10] += np.random.default_rng(0).standard_normal(model.dim).astype(np.float32)  # not a constant: LayerNorm removes those
    got2 = OnnxModel(model.onnx("text_encoder")).run({"inputs_embeds": embeds2})[0]
    assert _max_err(got2[:, :10], got[:, :10]) < 1e-5 and _max_err(got2[:, 10:], got[:, 10:]) > 1e-3


def test_unet_matches_diffusers(pair):
    from diffusers import UNet2DConditionModel
    src, model = pair
    rng = np.random.default_rng(0)
    m = model.manifest
    h = m["native_resolution"] // m["vae_scale_factor"]
    sample = rng.standard_normal((2, m["latent_channels"], h, h)).astype(np.float32)
    ehs = rng.standard_normal((2, 77, model.dim)).astype(np.float32)
    ref = UNet2DConditionModel.from_pretrained(src / "unet").eval()
    sess = OnnxModel(model.onnx("unet"))
    for t in (999, 1):
        got = sess.run({"sample": sample, "timestep": np.array(t), "encoder_hidden_states": ehs})[0]
        with torch.no_grad():
            want = ref(torch.from_numpy(sample), t, torch.from_numpy(ehs)).sample.numpy()
        assert _max_err(got, want) < 1e-4 * max(1.0, float(np.abs(want).max()))


def test_vae_matches_diffusers(pair):
    from diffusers import AutoencoderKL
    src, model = pair
    rng = np.random.default_rng(1)
    m = model.manifest
    H = m["native_resolution"]
    image = rng.uniform(-1, 1, (1, 3, H, H)).astype(np.float32)
    ref = AutoencoderKL.from_pretrained(src / "vae").eval()
    params = OnnxModel(model.onnx("vae_encoder")).run({"sample": image})[0]
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(image)).latent_dist
    C = m["latent_channels"]
    assert params.shape == (1, 2 * C, H // m["vae_scale_factor"], H // m["vae_scale_factor"])
    assert _max_err(params[:, :C], dist.mean.numpy()) < 1e-4
    assert _max_err(params[:, C:], dist.logvar.numpy()) < 1e-4
    latent = rng.standard_normal(dist.mean.shape).astype(np.float32)
    got = OnnxModel(model.onnx("vae_decoder")).run({"latent_sample": latent})[0]
    with torch.no_grad():
        want = ref.decode(torch.from_numpy(latent)).sample.numpy()
    assert got.shape == (1, 3, H, H)
    assert _max_err(got, want) < 1e-4 * max(1.0, float(np.abs(want).max()))


def test_manifest_facts_and_hashes(tiny_exported, tiny_v_exported):
    from export.manifest import verify_files
    for path, family, pad, pred in [(tiny_exported, "sd1", "<|endoftext|>", "epsilon"),
                                    (tiny_v_exported, "sd2", "!", "v_prediction")]:
        m = ModelDir.open(path).manifest
        assert set(MANIFEST_KEYS) <= set(m)
        assert (m["family"], m["pad_token"], m["prediction_type"], m["scheme"]) == (family, pad, pred, "fp32")
        assert (m["embedding_dim"], m["vocab_size"], m["max_length"], m["latent_channels"]) == (32, 49408, 77, 4)
        assert (m["vae_scale_factor"], m["native_resolution"], m["num_train_timesteps"]) == (2, 32, 1000)
        assert ModelDir.open(path).token_table().shape == (49408, 32)
        written = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
        assert set(m["files"]) == written and verify_files(path, m) == []
        assert all(m["versions"][k] != "absent" for k in ("torch", "onnx", "onnxruntime", "diffusers"))


def test_manifest_hash_detects_tampering(tmp_path, tiny_exported):
    import shutil
    from export.manifest import verify_files
    copy = shutil.copytree(tiny_exported, tmp_path / "copy")
    with open(copy / "scheduler" / "scheduler_config.json", "a") as f:
        f.write(" ")
    assert verify_files(copy, ModelDir.open(copy).manifest) == ["scheduler/scheduler_config.json"]


def test_exported_tokenizer_ids(tiny_exported, tiny_v_exported):
    want = [49406, 320, 1125, 539, 320, 1929, 49407]
    ids = ClipTokenizer(ModelDir.open(tiny_exported).tokenizer_dir, "<|endoftext|>")("a photo of a dog")[0]
    assert ids[:7].tolist() == want and (ids[7:] == 49407).all()
    ids_v = ClipTokenizer(ModelDir.open(tiny_v_exported).tokenizer_dir, "!")("a photo of a dog")[0]
    assert ids_v[:7].tolist() == want and (ids_v[7:] == 0).all()  # "!" is id 0


def test_reuse_and_force(tmp_path, tiny_diffusers, tiny_exported):
    import shutil
    from click.testing import CliRunner
    from zoodip.cli import main
    out = shutil.copytree(tiny_exported, tmp_path / "onnx")
    mtime = (out / "unet" / "model.onnx").stat().st_mtime_ns
    res = CliRunner().invoke(main, ["export", str(tiny_diffusers), str(out)])
    assert res.exit_code == 0 and "reusing" in res.output
    assert (out / "unet" / "model.onnx").stat().st_mtime_ns == mtime
    (out / "vae_decoder" / "model.onnx").unlink()  # incomplete: refused without --force
    assert "--force" in _cli_error(["export", str(tiny_diffusers), str(out)])
    res = CliRunner().invoke(main, ["export", str(tiny_diffusers), str(out), "--force"])
    assert res.exit_code == 0, res.output
    assert (out / "unet" / "model.onnx").stat().st_mtime_ns != mtime
    ModelDir.open(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def _cli_error(args) -> str:
    from click.testing import CliRunner
    from zoodip.cli import main
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0
    assert "Traceback" not in res.output and not isinstance(res.exception, (RuntimeError, AttributeError, KeyError))
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), res.output
    return lines[0]


def _variant(src, tmp_path, name, edit):
    """A copy of a diffusers folder with one config edited: edit(folder)."""
    import shutil
    folder = shutil.copytree(src, tmp_path / name)
    edit(folder)
    return folder


def _edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_diffusers):
    out = str(tmp_path / "out")
    assert "does not exist" in _cli_error(["export", str(tmp_path / "nope"), out])
    (tmp_path / "empty").mkdir()
    assert "no unet/ folder" in _cli_error(["export", str(tmp_path / "empty"), out])
    sdxl = _variant(tiny_diffusers, tmp_path, "sdxl", lambda f: _edit_json(
        f / "model_index.json", _class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "X"]))
    msg = _cli_error(["export", str(sdxl), out])
    assert "SDXL" in msg and "SD 1.x" in msg and "SD 2.x" in msg
    inpaint = _variant(tiny_diffusers, tmp_path, "inpaint", lambda f: _edit_json(f / "unet" / "config.json", in_channels=9))
    assert "not a supported architecture" in _cli_error(["export", str(inpaint), out])
    assert "not a local folder and could not be fetched" in _cli_error(["export", "nobody/no-such-model-zz", out])
    assert "does not exist" in _cli_error(["export", str(tmp_path / "missing.safetensors"), out])
    junk = tmp_path / "junk.safetensors"
    from safetensors.numpy import save_file
    save_file({"w": np.zeros((2, 2), np.float32)}, junk)
    assert "could not load" in _cli_error(["export", str(junk), out])
    assert not (tmp_path / "out").exists()


def test_no_permission_and_no_disk(tmp_path, tiny_diffusers, monkeypatch):
    import collections
    import os
    import shutil
    out = str(tmp_path / "out")
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # tests run as root, where chmod alone is ignored
    assert "cannot write to" in _cli_error(["export", str(tiny_diffusers), out])
    monkeypatch.undo()
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 1 << 20))
    msg = _cli_error(["export", str(tiny_diffusers), out])
    assert "not enough disk space" in msg and "GiB" in msg
    assert not (tmp_path / "out").exists()


def test_cli_help_does_not_import_torch():
    code = ("import sys\nfrom zoodip.cli import main\n"
            "for args in (['--help'], ['export', '--help'], ['replica', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'optimum') if m in sys.modules]\n"
            "assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "replica" in res.stdout and "--force" in res.stdout and "--seed" in res.stdout


@pytest.mark.parametrize("kind,counts", [
    # Parameter counts of the published checkpoints (unet, vae, text encoder): the replicas are those architectures.
    ("sd15", (859_520_964, 83_653_863, 123_060_480)),
    ("sd21", (865_910_724, 83_653_863, 340_387_840)),
])
def test_replica_architectures_match_published_sizes(kind, counts):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from export.replica import SPECS
    spec = SPECS[kind]
    with torch.device("meta"):  # shapes only, no memory
        models = (UNet2DConditionModel(**spec["unet"]), AutoencoderKL(**spec["vae"]),
                  CLIPTextModel(CLIPTextConfig(**spec["text"])))
    assert tuple(sum(p.numel() for p in m.parameters()) for m in models) == counts


def test_replica_is_seeded(tmp_path, tiny_diffusers, tiny_v_diffusers):
    from safetensors.numpy import load_file
    from export.replica import write_replica
    again = write_replica("tiny", tmp_path / "again", seed=0)  # the tiny_diffusers fixture used seed 0
    f, k = "unet/diffusion_pytorch_model.safetensors", "conv_in.weight"
    w0, w0b, w1 = (load_file(p / f)[k] for p in (tiny_diffusers, again, tiny_v_diffusers))  # tiny-v: seed 1
    assert np.array_equal(w0, w0b) and w0.shape == w1.shape and not np.array_equal(w0, w1)
    pad = json.loads((again / "tokenizer" / "special_tokens_map.json").read_text())["pad_token"]
    assert (pad if isinstance(pad, str) else pad["content"]) == "<|endoftext|>"


def _softmax_count(path) -> int:
    import onnx
    return sum(n.op_type == "Softmax" for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_sliced_attention_matches_full_export(tmp_path, tiny_diffusers, tiny_exported):
    """The default (sliced) export computes the full graph's attention, at any batch and resolution."""
    from export.onnx_export import export_model
    sliced = ModelDir.open(tiny_exported)
    full = ModelDir.open(export_model(tiny_diffusers, tmp_path / "full", attention="full"))
    assert (sliced.manifest["attention"], full.manifest["attention"]) == ("sliced", "full")
    rng = np.random.default_rng(2)
    h = sliced.manifest["native_resolution"] // sliced.manifest["vae_scale_factor"]
    for batch, side in ((3, h), (1, h // 2)):   # neither the traced batch nor the traced resolution
        feeds = {"sample": rng.standard_normal((batch, 4, side, side)).astype(np.float32), "timestep": np.array(500),
                 "encoder_hidden_states": rng.standard_normal((batch, 77, sliced.dim)).astype(np.float32)}
        want = OnnxModel(full.onnx("unet")).run(feeds)[0]
        assert _max_err(OnnxModel(sliced.onnx("unet")).run(feeds)[0], want) < 1e-5 * max(1.0, float(np.abs(want).max()))
        latent = {"latent_sample": feeds["sample"]}
        want = OnnxModel(full.onnx("vae_decoder")).run(latent)[0]
        assert _max_err(OnnxModel(sliced.onnx("vae_decoder")).run(latent)[0], want) < 1e-5 * max(1.0, float(np.abs(want).max()))
    for sub in ("unet", "vae_decoder", "vae_encoder"):
        assert _softmax_count(sliced.onnx(sub)) > _softmax_count(full.onnx(sub)), sub
