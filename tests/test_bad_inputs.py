"""Every bad input gets one clear line that names the problem, and nothing that existed before is changed.

Table-driven: each case builds its fixture from the tiny model in a fresh folder, runs one `zoodip`
command through click, and checks the exit code, that no traceback is shown, that the message names the
problem, and that every file that existed before the command is byte-for-byte unchanged.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from zoodip.cli import main


@dataclass
class Env:
    """A fresh folder per case: model/ (tiny export), photos/, runs/done (a finished 2-step run)."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def photos(self) -> Path:
        return self.root / "photos"

    @property
    def done(self) -> Path:
        return self.root / "runs" / "done"


@dataclass
class Case:
    name: str
    argv: Callable[[Env], list[str]]
    match: str                                   # regex the one-line message must contain
    setup: Callable[[Env], None] | None = None
    code: int = 1                                # 1: zoodip's error; 2: click's usage error
    extra: Callable[[Env], None] | None = field(default=None)   # further checks after the command


def train(e: Env, *args: str, out: str = "runs/new", images: Path | None = None, model: Path | None = None) -> list[str]:
    return ["train", str(model or e.model), "--images", str(images or e.photos), "--token", "sks", "--init", "dog",
            "--out", str(e.root / out), "--steps", "2", "--set", "progress=false", *args]


def generate(e: Env, *args: str, out: str = "samples") -> list[str]:
    return ["generate", str(e.model), "--prompt", "a photo of a dog", "--out", str(e.root / out), "-n", "1",
            "--steps", "2", *args]


def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def bomb_png(path: Path, side: int = 20000) -> None:
    """A tiny PNG whose header claims side x side pixels (a decompression bomb, not really decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    write(path, b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def manifest_edit(e: Env, **changes) -> None:
    path = e.model / "manifest.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


def external_data(e: Env, location: str) -> None:
    """Rewrite the text encoder so its largest weight lives in external data at `location`."""
    import onnx
    path = e.model / "text_encoder" / "model.onnx"
    model = onnx.load(str(path))
    t = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    t.data_location = onnx.TensorProto.EXTERNAL
    del t.external_data[:]
    for k, v in (("location", location), ("offset", "0"), ("length", str(len(t.raw_data)))):
        t.external_data.add(key=k, value=v)
    t.ClearField("raw_data")
    path.write_bytes(model.SerializeToString())


def foreign_inputs(e: Env) -> None:
    """Replace the text encoder with a graph whose input is called input_ids."""
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, ["b", 77, 32])
    y = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", 77, 32])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["last_hidden_state"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(e.model / "text_encoder" / "model.onnx"))


def checkpoint_of_other_images(e: Env) -> None:
    """The finished run's checkpoint, but the photos changed since."""
    img = Image.open(e.photos / "00.png")
    img.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(e.photos / "00.png")


CASES = [
    # -- photos
    Case("images: empty folder", lambda e: train(e, images=e.root / "empty"), "has no images",
         lambda e: (e.root / "empty").mkdir()),
    Case("images: missing folder", lambda e: train(e, images=e.root / "nope"), "nope does not exist"),
    Case("images: a file, not a folder", lambda e: train(e, images=e.photos / "00.png"), "00.png does not exist or is not a folder"),
    Case("images: truncated jpeg", lambda e: train(e), r"cannot read image .*bad\.jpg.*remove or replace",
         lambda e: write(e.photos / "bad.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")),
    Case("images: empty png", lambda e: train(e), r"cannot read image .*zero\.png", lambda e: write(e.photos / "zero.png", b"")),
    Case("images: text named .png", lambda e: train(e), r"cannot read image .*notes\.png",
         lambda e: write(e.photos / "notes.png", "just some notes")),
    Case("images: decompression bomb", lambda e: train(e), r"bomb\.png is too large to read safely.*downscale",
         lambda e: bomb_png(e.photos / "bomb.png")),
    Case("images: truncated png", lambda e: train(e), r"cannot read image .*cut\.png",
         lambda e: write(e.photos / "cut.png", (e.photos / "00.png").read_bytes()[:200])),
    # -- model folders
    Case("model: missing", lambda e: train(e, model=e.root / "nomodel"), "nomodel does not exist"),
    Case("model: empty folder", lambda e: train(e, model=e.root / "emptymodel"), "no manifest.json, so it is not a zoodip",
         lambda e: (e.root / "emptymodel").mkdir()),
    Case("model: a diffusers folder", lambda e: train(e, model=e.root / "diff"), r"diffusers folder: run `zoodip export",
         lambda e: write(e.root / "diff" / "model_index.json", "{}")),
    Case("model: corrupt manifest", lambda e: train(e), "manifest.json is corrupt",
         lambda e: write(e.model / "manifest.json", "{not json")),
    Case("model: manifest missing keys", lambda e: train(e), r"is not a zoodip-onnx/1 manifest \(missing",
         lambda e: write(e.model / "manifest.json", json.dumps({"format": "zoodip-onnx/1"}))),
    Case("model: unet missing", lambda e: train(e), r"unet/model\.onnx is missing",
         lambda e: (e.model / "unet" / "model.onnx").unlink()),
    Case("model: truncated unet", lambda e: train(e), r"onnxruntime cannot load .*unet/model\.onnx.*damaged",
         lambda e: write(e.model / "unet" / "model.onnx", (e.model / "unet" / "model.onnx").read_bytes()[:5000])),
    Case("model: text encoder is not onnx", lambda e: train(e), r"text_encoder/model\.onnx.*(damaged|not a readable)",
         lambda e: write(e.model / "text_encoder" / "model.onnx", "location location")),
    Case("model: external data at an absolute path", lambda e: train(e), r"outside the model's folder; zoodip refuses it",
         lambda e: external_data(e, "/etc/passwd")),
    Case("model: external data climbing out", lambda e: train(e), r"'\.\./\.\./secret\.bin', outside the model's folder",
         lambda e: external_data(e, "../../secret.bin")),
    Case("model: external data missing", lambda e: train(e), r"needs 'weights\.bin', which is missing beside it",
         lambda e: external_data(e, "weights.bin")),
    Case("model: text encoder with other input names", lambda e: train(e), r"has inputs \['input_ids'\], not \['inputs_embeds'\]",
         foreign_inputs),
    Case("model: token table damaged", lambda e: train(e), r"token_embeddings\.npy.*(damaged|cannot)",
         lambda e: write(e.model / "text_encoder" / "token_embeddings.npy", b"\x93NUMPY garbage")),
    Case("model: manifest vae_scale_factor 0", lambda e: train(e), r"vae_scale_factor is 0, outside",
         lambda e: manifest_edit(e, vae_scale_factor=0)),
    Case("model: manifest num_train_timesteps 10", lambda e: train(e), r"num_train_timesteps is 10, outside",
         lambda e: manifest_edit(e, num_train_timesteps=10)),
    Case("model: manifest prediction type", lambda e: train(e), r"prediction_type 'sample' is not",
         lambda e: manifest_edit(e, prediction_type="sample")),
    Case("model: manifest scaling factor text", lambda e: train(e), r"scaling_factor is 'big', outside",
         lambda e: manifest_edit(e, scaling_factor="big")),
    Case("model: tokenizer missing", lambda e: train(e), r"vocab\.json",
         lambda e: (e.model / "tokenizer" / "vocab.json").unlink()),
    Case("model: a weight file edited", lambda e: ["verify", str(e.model)], r"unet/model\.onnx differ from what the manifest",
         lambda e: write(e.model / "unet" / "model.onnx", (e.model / "unet" / "model.onnx").read_bytes() + b"\0")),
    # -- option values
    Case("--steps 0", lambda e: train(e, "--steps", "0"), "--steps must be >= 1"),
    Case("--steps -5", lambda e: train(e, "--steps", "-5"), "--steps must be >= 1"),
    Case("--steps abc", lambda e: train(e, "--steps", "abc"), "'abc' is not a valid integer", code=2),
    Case("--lr nan", lambda e: train(e, "--lr", "nan"), "lr must be a finite number"),
    Case("--lr inf", lambda e: train(e, "--lr", "inf"), "lr must be a finite number"),
    Case("--lr 0", lambda e: train(e, "--lr", "0"), "lr must be > 0"),
    Case("--lr -1", lambda e: train(e, "--lr", "-1"), "lr must be > 0"),
    Case("--set mu=nan", lambda e: train(e, "--set", "mu=nan"), "mu must be a finite number"),
    Case("--set mu=0", lambda e: train(e, "--set", "mu=0"), "mu must be > 0"),
    Case("--resolution 0", lambda e: train(e, "--resolution", "0"), "--resolution must be a positive number of pixels"),
    Case("--resolution -64", lambda e: train(e, "--resolution", "-64"), "--resolution must be a positive number"),
    Case("--resolution 40", lambda e: train(e, "--resolution", "40"), "must be a positive multiple of 16"),
    Case("--resolution 100000", lambda e: train(e, "--resolution", "99984"), r"over 2x this model's native 32 px.*large_resolution"),
    Case("--time-budget 0", lambda e: train(e, "--time-budget", "0"), "--time-budget '0' must be a positive"),
    Case("--time-budget abc", lambda e: train(e, "--time-budget", "abc"), "--time-budget 'abc' is not a duration"),
    Case("--time-budget -1h", lambda e: train(e, "--time-budget", "-1h"), "--time-budget '-1h' is not a duration"),
    Case("--set t_range=900,500", lambda e: train(e, "--set", "t_range=900,500"), "t_range 900,500 must satisfy"),
    Case("--set t_range=5", lambda e: train(e, "--set", "t_range=5"), "give 2 comma-separated values", code=2),
    Case("--set unknown", lambda e: train(e, "--set", "nope=1"), "NAME one of", code=2),
    Case("--set without =", lambda e: train(e, "--set", "queries"), "expected NAME=VALUE", code=2),
    Case("--set queries=0", lambda e: train(e, "--set", "queries=0"), "queries must be >= 1"),
    Case("--set tau=1", lambda e: train(e, "--set", "tau=1"), "tau must be >= 2"),
    Case("--set subspace=maybe", lambda e: train(e, "--set", "subspace=maybe"), "use true or false", code=2),
    Case("--set prior_refresh over tau", lambda e: train(e, "--directions", "jacobian", "--set", "prior_refresh=500"),
         r"0 <= prior_refresh <= tau"),
    Case("--token with a space", lambda e: train(e)[:5] + ["a b"] + train(e)[6:], "--token must be one word"),
    Case("--token already a word", lambda e: train(e)[:5] + ["dog"] + train(e)[6:], "already in the vocabulary"),
    Case("--init of two tokens", lambda e: train(e)[:7] + ["hot dog"] + train(e)[8:], "must be a single token"),
    Case("--set num_vectors=0", lambda e: train(e, "--set", "num_vectors=0"), "--num-vectors must be >= 1"),
    Case("--set save_every=-1", lambda e: train(e, "--set", "save_every=-1"), "save_every.*must be >= 0"),
    Case("--provider-option without =", lambda e: train(e, "--provider-option", "oops"), r"'oops' must look like key=value"),
    Case("--schedule unknown", lambda e: train(e, "--schedule", "turbo"), "'turbo' is not one of", code=2),
    # -- captions
    Case("captions: missing file", lambda e: train(e, "--captions", str(e.root / "caps.txt")), "caps.txt does not exist"),
    Case("captions: no {}", lambda e: train(e, "--captions", str(e.root / "caps.json")), r"has no '\{\}' where the learned token goes",
         lambda e: write(e.root / "caps.json", json.dumps({p.name: "a photo" for p in e.photos.glob("*.png")}))),
    Case("captions: stray field", lambda e: train(e, "--captions", str(e.root / "caps.json")), r"stray brace field",
         lambda e: write(e.root / "caps.json", json.dumps({p.name: "a {} in {place}" for p in e.photos.glob("*.png")}))),
    Case("captions: invalid json", lambda e: train(e, "--captions", str(e.root / "caps.json")), "is not valid JSON",
         lambda e: write(e.root / "caps.json", "{oops")),
    Case("captions: an image without caption", lambda e: train(e, "--captions", str(e.root / "caps.txt")), r"has no caption for 01\.png",
         lambda e: write(e.root / "caps.txt", "00.png\ta photo of {}\n")),
    Case("captions: tab missing", lambda e: train(e, "--captions", str(e.root / "caps.txt")), r"caps\.txt:1: expected `image-file<TAB>caption`",
         lambda e: write(e.root / "caps.txt", "00.png a photo of {}\n")),
    # -- checkpoints and outputs
    Case("out: a finished run without --resume", lambda e: train(e, out="runs/done"), r"already holds a run at step 2: pass --resume"),
    Case("out: results of another run, no checkpoint", lambda e: train(e, out="runs/done"), r"holds learned_embeds\.safetensors.*--force",
         lambda e: (e.done / "checkpoint.npz").unlink()),
    Case("out: resume with another lr", lambda e: train(e, "--resume", "--lr", "0.5", out="runs/done"), r"cannot resume .*lr=0\.005 \(now 0\.5\)"),
    Case("checkpoint: random bytes", lambda e: train(e, "--resume", out="runs/done"), r"checkpoint\.npz is damaged or not zoodip's",
         lambda e: write(e.done / "checkpoint.npz", b"PK\x03\x04 this is not a zip")),
    Case("checkpoint: a pickle", lambda e: train(e, "--resume", out="runs/done"), r"checkpoint\.npz is damaged or not zoodip's",
         lambda e: write(e.done / "checkpoint.npz", pickle.dumps({"v": [1, 2, 3]}))),
    Case("checkpoint: a foreign npz", lambda e: train(e, "--resume", out="runs/done"), r"checkpoint\.npz is damaged or not zoodip's \(KeyError\)",
         lambda e: np.savez(e.done / "checkpoint.npz", weights=np.zeros(3))),
    Case("checkpoint: other photos", lambda e: train(e, "--resume", out="runs/done"), r"trained with other images",
         checkpoint_of_other_images),
    Case("checkpoint: another model", lambda e: train(e, "--resume", out="runs/done"), r"trained with other model",
         lambda e: manifest_edit(e, note="re-exported")),
    # -- generate
    Case("generate: -n 0", lambda e: generate(e, "-n", "0"), "-n must be >= 1"),
    Case("generate: --steps 0", lambda e: generate(e, "--steps", "0"), "--steps must be >= 1"),
    Case("generate: --guidance -1", lambda e: generate(e, "--guidance", "-1"), "--guidance must be"),
    Case("generate: --guidance nan", lambda e: generate(e, "--guidance", "nan"), "--guidance must be a finite number"),
    Case("generate: --height 100000", lambda e: generate(e, "--height", "99992"), r"--height 99992 is over 2x"),
    Case("generate: --set original_size=1", lambda e: generate(e, "--set", "original_size=1"), "2 comma-separated", code=2),
    Case("generate: --height 100", lambda e: generate(e, "--height", "100"), "multiples of 8"),
    Case("generate: a pickle embedding", lambda e: generate(e, "--embeds", str(e.root / "e.pt")), "pickled files are never loaded",
         lambda e: write(e.root / "e.pt", pickle.dumps({"x": 1}))),
    Case("generate: a missing embedding", lambda e: generate(e, "--embeds", str(e.root / "none.safetensors")), "none.safetensors does not exist"),
    Case("generate: a damaged embedding", lambda e: generate(e, "--embeds", str(e.root / "bad.safetensors")), "not a readable safetensors",
         lambda e: write(e.root / "bad.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")),
    # -- quantize / export
    Case("quantize: into a foreign folder", lambda e: ["quantize", str(e.model), str(e.photos), "--calib-images", str(e.photos)],
         r"exists but is not a finished zoodip quantization"),
    Case("quantize: no calibration photos", lambda e: ["quantize", str(e.model), str(e.root / "q"), "--calib-images", str(e.root / "none")],
         r"calibration images folder .*none does not exist"),
    Case("quantize: unknown scheme", lambda e: ["quantize", str(e.model), str(e.root / "q"), "--scheme", "w3"], "'w3' is not one of", code=2),
    Case("export: into a file", lambda e: ["export", str(e.model), str(e.photos / "00.png")], r"00\.png' is a file", code=2),
]


@pytest.fixture(scope="module")
def template(tiny_exported, photos, tmp_path_factory) -> Path:
    """model/, photos/ and a finished 2-step run, built once; every case gets its own copy."""
    from zo_runtime.train import train as run
    from zo_runtime.train_config import TrainConfig
    root = tmp_path_factory.mktemp("bad_inputs_template")
    shutil.copytree(tiny_exported, root / "model")
    shutil.copytree(photos, root / "photos")
    run(root / "model", root / "photos", root / "runs" / "done",
        TrainConfig(token="sks", init="dog", steps=2, schedule="paper", progress=False))
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_clear_line(case: Case, template: Path, tmp_path: Path):
    env = Env(tmp_path / "env")
    shutil.copytree(template, env.root)
    if case.setup:
        case.setup(env)
    before = snapshot(env.root)
    res = CliRunner().invoke(main, case.argv(env))
    out = res.output
    assert res.exit_code == case.code, out
    assert "Traceback" not in out and not isinstance(res.exception, (AssertionError, KeyError, AttributeError)), out
    assert re.search(case.match, out), out
    lines = [line for line in out.strip().splitlines() if line.startswith(("Error", "Usage", "Try"))]
    assert lines, out
    after = snapshot(env.root)
    changed = sorted(k for k, h in before.items() if after.get(k) != h)
    assert not changed, f"changed or removed: {changed}"
    if case.extra:
        case.extra(env)


def test_the_corpus_is_broad():
    assert len(CASES) >= 60
    kinds = {c.name.split(":")[0].split(" ")[0] for c in CASES}
    assert {"images", "model", "captions", "checkpoint", "out", "generate", "quantize"} <= kinds


def test_runs_into_earlier_outputs_keep_them(template: Path, tmp_path: Path):
    """generate into a folder with earlier images writes a numbered subfolder; --force replaces; train --force
    starts a finished run over in place."""
    env = Env(tmp_path / "env")
    shutil.copytree(template, env.root)
    first = CliRunner().invoke(main, generate(env))
    assert first.exit_code == 0, first.output
    before = snapshot(env.root / "samples")
    second = CliRunner().invoke(main, generate(env, "--seed", "1"))
    assert second.exit_code == 0 and str(env.root / "samples" / "2") in second.output, second.output
    assert all(snapshot(env.root / "samples").get(k) == h for k, h in before.items())      # the first run is intact
    assert (env.root / "samples" / "2" / "grid.png").is_file()
    forced = CliRunner().invoke(main, generate(env, "--seed", "1", "--force"))
    assert forced.exit_code == 0 and (env.root / "samples" / "grid.png").read_bytes() != b""
    assert not (env.root / "samples" / "3").exists()
    again = CliRunner().invoke(main, train(env, "--force", out="runs/done"))
    assert again.exit_code == 0, again.output
    assert json.loads((env.done / "timing.json").read_text())["last_step"] == 2
