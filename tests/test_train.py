"""Training on the tiny exported model: loss falls, exact resume after SIGKILL, NaN stop, errors, diffusers, no torch."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from zo_runtime import latents, prompts, schedule as S, zo
from zo_runtime import objective as O
from zo_runtime import train as T
from zo_runtime.model_dir import ModelDir

REPO = Path(__file__).resolve().parents[1]


def quick(**kw):
    """A few-step config for the tiny model (tau small so the subspace refresh is exercised)."""
    base = dict(token="sks", init="dog", steps=12, tau=4, save_every=0, progress=False, schedule="paper")
    return T.TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three small photos of odd sizes and formats, one with an EXIF rotation."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (size, fmt) in enumerate([((48, 40), "png"), ((40, 56), "jpeg"), ((64, 64), "webp")]):
        arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        arr[: size[1] // 2] //= 3                           # some structure so the VAE sees edges
        im = Image.fromarray(arr)
        if fmt == "jpeg":
            exif = im.getexif()
            exif[0x0112] = 6                                # "rotate 90 CW" orientation tag
            im.save(folder / f"{i}.jpg", exif=exif)
        else:
            im.save(folder / f"{i}.{fmt}")
    (folder / "notes.txt").write_text("not an image, skipped by suffix")
    return folder


@pytest.fixture(scope="module")
def trained(tiny_exported, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    T.train(tiny_exported, images, out, quick(num_vectors=2))
    return out


def test_outputs(trained):
    embeds = load_file(str(trained / "learned_embeds.safetensors"))
    assert list(embeds) == ["sks"] and embeds["sks"].shape == (2, 32) and embeds["sks"].dtype == np.float32
    rows = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"step", "loss", "t", "grad_norm", "projected_dims", "seconds"} <= set(rows[0])
    assert all(500 <= r["t"] < 900 for r in rows)
    assert rows[3]["projected_dims"] == 0 and rows[4]["projected_dims"] > 0   # subspace from step tau+1
    config = json.loads((trained / "config.json").read_text())
    assert config["config"]["queries"] == 2 and config["tokens"] == ["sks", "sks_1"]
    assert config["images_used"] == ["0.png", "1.jpg", "2.webp"] and "onnxruntime" in config["versions"]


def test_loss_falls_on_a_fixed_draw(tiny_exported, images, tmp_path, monkeypatch):
    # A random tiny UNet barely listens to text: over random draws (t, noise, image) the per-step
    # gradient is mostly noise (measured cos to the mean gradient ~0.2) and 40 steps move the loss
    # by less than 1e-4. With every step reusing one draw the objective is deterministic, so the
    # whole path (splicing v into the prompt rows, batched passes, RGE sign, Adam) must lower it:
    # by > 1e-3 (measured ~2e-3 for seeds 0-2), more than any random move of the same length, and
    # the mirrored move (2 v0 - v, what a flipped estimator sign would give) must do worse.
    draw = O.draw
    monkeypatch.setattr(O, "draw", lambda run, rng: draw(run, zo.step_rng(run.cfg.seed, 1)))
    cfg = quick(steps=40, lr=1e-2, tau=16)
    path = T.train(tiny_exported, images, tmp_path, cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    run = O.open_objective(tiny_exported, images, tmp_path, cfg)
    v = load_file(str(path))["sks"]

    def loss(x):
        return O.eval_loss(run, x.astype(np.float32), [zo.step_rng(cfg.seed, 1)])

    before, after, mirror = loss(run.v0), loss(v), loss(2 * run.v0 - v)
    assert abs(before - losses[0]) < 1e-4                     # eval and training see the same objective
    dist = np.linalg.norm(v - run.v0)
    randoms = [loss(run.v0 + dist * z / np.linalg.norm(z)) for z in np.random.default_rng(0).standard_normal((3, *v.shape))]
    assert after < before - 1e-3, (before, after)
    assert after < min(randoms) - 5e-4, (after, randoms)
    assert mirror > after + 1e-3, (mirror, after)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def _train_script(model, images, out, steps, extra=""):
    return (f"{extra}\nfrom zo_runtime.train import TrainConfig, train\n"
            f"train({str(model)!r}, {str(images)!r}, {str(out)!r}, TrainConfig(token='sks', init='dog', steps={steps}, "
            "tau=4, save_every=3, resume=True, progress=False, schedule='paper'))\n")


def test_sigkill_and_resume_match_uninterrupted(tiny_exported, images, tmp_path):
    steps = 24
    ref = tmp_path / "ref"
    T.train(tiny_exported, images, ref, quick(steps=steps, save_every=3))
    out = tmp_path / "killed"
    for kill_after in (7, 16):                    # two kills at different points, then finish
        proc = subprocess.Popen([sys.executable, "-c", _train_script(tiny_exported, images, out, steps)], cwd=REPO)
        log = out / "log.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if log.is_file() and len(log.read_text().splitlines()) >= kill_after:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    subprocess.run([sys.executable, "-c", _train_script(tiny_exported, images, out, steps)], cwd=REPO, check=True)
    a = load_file(str(ref / "learned_embeds.safetensors"))["sks"]
    b = load_file(str(out / "learned_embeds.safetensors"))["sks"]
    assert np.array_equal(a, b)
    rows = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows == list(range(1, steps + 1))       # rows written after the last checkpoint were replaced
    with np.load(ref / "checkpoint.npz") as r, np.load(out / "checkpoint.npz") as k:
        for key in ("v", "m", "s", "history", "basis"):
            assert np.array_equal(r[key], k[key]), key


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_exported, images, tmp_path, monkeypatch):
    real = O.losses
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        out = real(*args)
        return out * np.nan if calls["n"] == 7 else out

    monkeypatch.setattr(O, "losses", flaky)
    with pytest.raises(FloatingPointError, match="step 7.*checkpoint"):
        T.train(tiny_exported, images, tmp_path, quick(steps=10, save_every=5))
    with np.load(tmp_path / "checkpoint.npz") as z:
        assert int(z["step"]) == 5 and np.isfinite(z["v"]).all()
        v5 = z["v"]
    assert np.array_equal(load_file(str(tmp_path / "learned_embeds.safetensors"))["sks"].ravel(), v5)
    monkeypatch.setattr(O, "losses", real)
    T.train(tiny_exported, images, tmp_path, quick(steps=10, save_every=5, resume=True))
    assert int(np.load(tmp_path / "checkpoint.npz")["step"]) == 10


def test_existing_run_needs_resume_and_same_settings(tiny_exported, images, tmp_path):
    T.train(tiny_exported, images, tmp_path, quick(steps=3))
    with pytest.raises(FileExistsError, match="--resume"):
        T.train(tiny_exported, images, tmp_path, quick(steps=3))
    with pytest.raises(ValueError, match="lr"):
        T.train(tiny_exported, images, tmp_path, quick(steps=5, lr=0.1, resume=True))


@pytest.mark.parametrize("kw, match", [
    ({"init": "hot dog"}, "single token"),
    ({"token": "dog"}, "already in the vocabulary"),
    ({"token": "a b"}, "one word"),
    ({"t_range": (900, 500)}, "t_range"),
    ({"queries": 0}, "queries"),
    ({"resolution": 40}, "multiple of 16"),
])
def test_bad_settings_are_clear_errors(tiny_exported, images, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        T.train(tiny_exported, images, tmp_path, quick(**kw))


def test_bad_images_are_clear_errors(tiny_exported, images, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        T.train(tiny_exported, empty, tmp_path / "o1", quick())
    for name, content in [("broken.jpg", b"\xff\xd8\xff not really a jpeg"), ("zero.png", b"")]:
        bad = tmp_path / name.split(".")[0]
        bad.mkdir()
        (bad / "ok.png").write_bytes((images / "0.png").read_bytes())
        (bad / name).write_bytes(content)
        with pytest.raises(ValueError, match=name):
            T.train(tiny_exported, bad, tmp_path / f"o-{name}", quick())
    with pytest.raises(FileNotFoundError):
        T.train(tiny_exported, tmp_path / "missing", tmp_path / "o2", quick())


def test_images_are_exif_rotated_cropped_and_cached(tiny_exported, images, tmp_path):
    x = latents.load_image(images / "1.jpg", 32)           # 40x56 stored, rotated -> 56x40, cropped to 32x32
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
    model = ModelDir.open(tiny_exported)
    a = latents.encode_images(model, images, 32, tmp_path)
    assert a.mean.shape == (3, 2, 4, 16, 16) and len(list(tmp_path.glob("latents-*.npz"))) == 1
    assert not np.allclose(a.mean[:, 0], a.mean[:, 1])      # the mirror image has its own latent
    b = latents.encode_images(model, images, 32, tmp_path)      # from the cache
    assert np.array_equal(a.mean, b.mean) and len(list(tmp_path.glob("latents-*.npz"))) == 1
    latents.encode_images(model, images, 48, tmp_path)
    assert len(list(tmp_path.glob("latents-*.npz"))) == 2    # keyed by resolution


def test_resolution_rules(tiny_exported):
    model = ModelDir.open(tiny_exported)
    assert latents.check_resolution(model, None) == 32
    static = ModelDir(model.root, {**model.manifest, "static_shapes": {"batch": 3, "height": 32, "width": 32}})
    assert latents.check_resolution(static, 32) == 32
    with pytest.raises(ValueError, match="static-shape"):
        latents.check_resolution(static, 48)


def test_captions(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"a.jpg": "a photo of {} on grass", "b": "{} at night"}))
    assert prompts.load_captions(tmp_path / "c.json", ["a.jpg", "b.png"]) == {
        "a.jpg": "a photo of {} on grass", "b.png": "{} at night"}
    (tmp_path / "c.txt").write_text("a.jpg\ta photo of {}\n")
    with pytest.raises(ValueError, match="b.png"):
        prompts.load_captions(tmp_path / "c.txt", ["a.jpg", "b.png"])
    (tmp_path / "d.txt").write_text("a.jpg\ta photo of a dog\n")
    with pytest.raises(ValueError, match=r"\{\}"):
        prompts.load_captions(tmp_path / "d.txt", ["a.jpg"])


def test_v_prediction_target(tiny_v_exported, images, tmp_path):
    cfg = quick(latent="mean")
    run = O.open_objective(tiny_v_exported, images, tmp_path, cfg)
    _, _, _, t, x_t, target, _ = O.draw(run, zo.step_rng(0, 1))
    rng = np.random.default_rng([0, 1, 0])          # replay the draws of step 1: image, flip, prompt, t, eps
    index, flip = int(rng.integers(3)), bool(rng.random() < 0.5)
    rng.integers(len(prompts.OBJECT_TEMPLATES)), rng.integers(500, 900)
    eps = rng.standard_normal(x_t.shape, dtype=np.float32)
    x0 = run.latents.mean[index, int(flip)][None]
    a = run.alphas[t]
    assert np.allclose(target, np.sqrt(a) * eps - np.sqrt(1 - a) * x0, atol=1e-6)
    assert np.allclose(x_t, np.sqrt(a) * x0 + np.sqrt(1 - a) * eps, atol=1e-6)
    T.train(tiny_v_exported, images, tmp_path, quick(steps=3))


def test_diffusers_loads_the_output(trained, tiny_diffusers):
    torch = pytest.importorskip("torch")
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusers, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(trained / "learned_embeds.safetensors"))
    ids = pipe.tokenizer.convert_tokens_to_ids(["sks", "sks_1"])
    rows = pipe.text_encoder.get_input_embeddings().weight[ids].detach().to(torch.float32).numpy()
    assert np.array_equal(rows, load_file(str(trained / "learned_embeds.safetensors"))["sks"])


def test_training_never_imports_torch(tiny_exported, images, tmp_path):
    """Training through the library and the CLI in a fresh process leaves torch & co. unimported."""
    heavy = "('torch', 'diffusers', 'transformers', 'optimum')"
    cli = (f"from zoodip.cli import main\nmain(['train', {str(tiny_exported)!r}, '--images', {str(images)!r}, "
           f"'--token', 'sks', '--init', 'dog', '--out', {str(tmp_path / 'cli')!r}, '--steps', '3'], standalone_mode=False)")
    check = f"\nimport sys\nloaded = [m for m in {heavy} if m in sys.modules]\nassert not loaded, loaded\n"
    script = _train_script(tiny_exported, images, tmp_path / "lib", 3) + cli + check
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "lib" / "learned_embeds.safetensors").is_file()
    assert (tmp_path / "cli" / "learned_embeds.safetensors").is_file()
    # the check itself can fail: the same script after `import torch` is refused
    res = subprocess.run([sys.executable, "-c", "import torch" + check], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "torch" in res.stderr


def test_cli_errors_are_one_line(tiny_exported, images, tmp_path):
    from click.testing import CliRunner
    from zoodip.cli import main
    res = CliRunner().invoke(main, ["train", str(tiny_exported), "--images", str(images), "--token", "sks",
                                    "--init", "hot dog", "--out", str(tmp_path), "--steps", "2"])
    assert res.exit_code == 1 and "single token" in res.output and "Traceback" not in res.output


def test_personalize_chains_stages_and_reuses_them(tiny_exported, images, tmp_path):
    from click.testing import CliRunner
    from zoodip.cli import main
    args = ["personalize", str(tiny_exported), "--images", str(images), "--token", "sks", "--init", "dog",
            "--out", str(tmp_path), "--steps", "3"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert (tmp_path / "learned_embeds.safetensors").is_file() and (tmp_path / "samples" / "grid.png").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["scheme"] != "fp32"    # trained the quantized model
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "reusing it" in again.output and "up to date" in again.output


def test_personalize_knows_a_finished_run_when_steps_come_from_the_schedule(tiny_exported, images, tmp_path):
    from zoodip import personalize as P
    cfg = T.TrainConfig(token="sks", init="dog", init_candidates="red,blue", progress=False)   # steps unset
    fast = S.defaults("fast", ModelDir.open(tiny_exported).manifest.get("family", "sd1"))["steps"]
    assert P._planned_steps(tiny_exported, cfg) == fast - math.ceil(16 * 3 / 3)     # the search's 48 passes off
    T.train(tiny_exported, images, tmp_path, quick(steps=3, save_every=3))
    assert P._finished(tmp_path, 3) and not P._finished(tmp_path, 4)


def test_unet_batch_and_single_give_the_same_losses(tiny_exported, images, tmp_path):
    runs = {mode: O.open_objective(tiny_exported, images, tmp_path, quick(unet_batch=mode)) for mode in ("batch", "single")}
    assert (runs["batch"].unet_rows, runs["single"].unet_rows) == (3, 1)
    _, base, rows, t, x_t, target, _ = O.draw(runs["batch"], zo.step_rng(0, 1))
    emb = np.repeat(base[None], 3, axis=0)
    for r in rows:
        emb[:, r] = (runs["batch"].v0 + np.float32(0.1) * np.arange(3, dtype=np.float32)[:, None, None])[:, :1]
    losses = {m: O.losses(run, emb, x_t, t, target, np.empty((run.unet_rows, 4, 16, 16), np.float32))
              for m, run in runs.items()}
    assert np.allclose(losses["batch"], losses["single"], rtol=1e-5, atol=1e-6)
    assert len(set(np.round(losses["single"], 9))) == 3          # the passes really differ


def test_static_batch_decides_the_calls():
    from types import SimpleNamespace as NS

    def session(batch):
        return NS(inputs={"sample": NS(shape=[batch, 4, 16, 16])}, path="unet/model.onnx")

    assert O.batch_per_call(session("batch_size"), "sample", 3, 3, "UNet") == 3     # dynamic: as asked
    assert O.batch_per_call(session("batch_size"), "sample", 3, 1, "UNet") == 1
    assert O.batch_per_call(session(1), "sample", 3, 3, "UNet") == 1                # static batch 1: one by one
    assert O.batch_per_call(session(3), "sample", 3, 1, "UNet") == 3                # static batch n+1: one call
    with pytest.raises(ValueError, match="static batch 2"):
        O.batch_per_call(session(2), "sample", 3, 3, "UNet")


def test_sample_every_writes_a_grid(tiny_exported, images, tmp_path):
    T.train(tiny_exported, images, tmp_path, quick(steps=2, sample_every=2))
    assert (tmp_path / "samples" / "step_000002" / "grid.png").is_file()


def test_jacobian_directions_come_from_the_text_encoder(tiny_exported, images, tmp_path):
    """--directions jacobian: queries in the top prior_rank directions of the text encoder's J^T J at v0."""
    from zo_runtime import priors, zo

    cfg = quick(directions="jacobian", prior_prompts=2, prior_rank=4, prior_mix=0.2, prior_refresh=0)
    run = O.open_objective(tiny_exported, images, tmp_path / "o1", cfg)
    draws = [run.prompts.draw_template(i) for i in range(2)]
    m = priors.jacobian_moment(run.text, draws, run.v0)
    assert np.allclose(run.dirs.sqrt, zo.top_k_sqrt(m, 4, 0.2), atol=1e-5)
    d = run.v0.shape[1]
    assert np.isclose(run.dirs.trace, 4 + 0.2 * (d - 4), rtol=1e-4)            # E|z|^2 the estimate divides by
    # the directions favour what the encoder responds to: E|J z|^2 beats an isotropic draw's
    a = run.dirs.sqrt.astype(np.float64)
    assert np.trace(a @ m @ a) / run.dirs.trace > 2 * np.trace(m) / d          # measured 2.6x here
    assert isinstance(O.open_objective(tiny_exported, images, tmp_path / "o2", quick()).dirs, zo.Gaussian)
    assert T.train(tiny_exported, images, tmp_path / "o3", cfg).is_file()


def test_refreshed_jacobian_subspace_resumes_exactly(tiny_exported, images, tmp_path):
    """--prior-rank k --prior-refresh R: queries in J^T J's top-k at the current v; a resume inside a
    period rebuilds that period's prior from the history, so it matches an uninterrupted run bit for bit."""
    cfg = quick(directions="jacobian", prior_prompts=1, prior_rank=3, prior_mix=0.1, prior_refresh=3, steps=10)
    run = O.open_objective(tiny_exported, images, tmp_path / "o0", cfg)
    w = np.linalg.eigvalsh(run.dirs.sqrt.astype(np.float64) @ run.dirs.sqrt)
    assert np.allclose(w[-3:], 1, atol=1e-5) and np.allclose(w[:-3], 0.1, atol=1e-5)
    ref = T.train(tiny_exported, images, tmp_path / "ref", cfg)
    T.train(tiny_exported, images, tmp_path / "cut", replace(cfg, steps=5))        # stops inside period 4-6
    cut = T.train(tiny_exported, images, tmp_path / "cut", replace(cfg, resume=True))
    assert np.array_equal(load_file(str(ref))["sks"], load_file(str(cut))["sks"])
    fixed = T.train(tiny_exported, images, tmp_path / "v0", replace(cfg, prior_refresh=0))
    assert not np.array_equal(load_file(str(ref))["sks"], load_file(str(fixed))["sks"])   # the refresh acted
    with pytest.raises(ValueError, match="prior_refresh"):
        quick(directions="jacobian", prior_refresh=5)                               # > tau: not in the history
    assert quick(prior_refresh=5).tau == 4          # gaussian directions never refresh: the setting is moot
