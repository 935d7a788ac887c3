"""SDXL training on the tiny SDXL model: one vector [clip_l | clip_g] per token, pooled text_embeds and time ids
from the photos, exact resume, diffusers loads the result, no torch; the PyTorch TI reference on SDXL."""
from __future__ import annotations


import numpy as np
from conftest import run_without_torch

from zo_runtime.model_dir import ModelDir
from zo_runtime.text import SdxlTextEncoder

TOKEN = "<sks>"


def _xl_train_cfg(**kw):
    from zo_runtime.train_config import TrainConfig
    return TrainConfig(**{**dict(token=TOKEN, init="dog", steps=6, tau=4, save_every=3, progress=False), **kw})


def test_training_sdxl_conditions_on_both_encoders_and_the_photos_geometry(xl_exported, photos, tmp_path):
    from zo_runtime import objective as O
    from zo_runtime import zo

    run = O.open_objective(xl_exported, photos, tmp_path, _xl_train_cfg())
    assert run.v0.shape == (1, 32 + 48) and (run.cfg.mu, run.cfg.t_range, run.cfg.directions) == (1e-2, (700, 900), "gaussian")
    d = O.draw(run, zo.step_rng(0, 1))
    assert 700 <= d.t < 900 and d.extra["time_ids"].shape == (1, 6) and d.extra["ids_2"].shape == (77,)
    h, w, top, left, th, tw = d.extra["time_ids"][0]
    assert (th, tw) == (run.resolution, run.resolution) and min(h, w) > 0 and top >= 0 and left >= 0
    geo = run.latents.time_ids                                            # (N, 2, 6): an image and its mirror
    scale = run.resolution / np.minimum(geo[:, 0, 0], geo[:, 0, 1])
    resized_w = np.maximum(run.resolution, np.round(geo[:, 0, 1] * scale))
    assert np.allclose(geo[:, 1, 3], resized_w - geo[:, 0, 3] - run.resolution)      # the flipped crop's left edge
    # the training conditioning of v is what generation computes for the prompt with v as the token's vector
    buf = O.Buffers.for_run(run)
    pts = np.repeat(run.v0.reshape(1, -1), 3, axis=0) + np.float32(0.1) * np.arange(3, dtype=np.float32)[:, None]
    emb = buf.emb[:3]
    emb[:] = d.base
    for j, r in enumerate(d.rows):
        emb[:, r] = pts.reshape(3, 1, -1)[:, j, None]
    cond = O.encode_text(run, emb, d.extra)
    ref = SdxlTextEncoder(ModelDir.open(xl_exported))
    ref.add_tokens([TOKEN], pts[2:3])
    hidden, pooled = ref([d.prompt])
    assert np.abs(cond["encoder_hidden_states"][2] - hidden[0]).max() < 1e-5
    assert np.abs(cond["text_embeds"][2] - pooled[0]).max() < 1e-5
    losses = O.point_losses(run, pts, d, buf)
    assert np.isfinite(losses).all() and len(set(np.round(losses, 12))) == 3


def test_training_sdxl_resumes_exactly_and_diffusers_loads_the_result(xl_exported, xl_diffusers, photos, tmp_path):
    import json
    from diffusers import StableDiffusionXLPipeline
    from safetensors.numpy import load_file
    from zo_runtime.train import train

    ref = train(xl_exported, photos, tmp_path / "ref", _xl_train_cfg())
    train(xl_exported, photos, tmp_path / "cut", _xl_train_cfg(steps=3))
    cut = train(xl_exported, photos, tmp_path / "cut", _xl_train_cfg(resume=True))
    a, b = load_file(str(ref)), load_file(str(cut))
    assert set(a) == {"clip_l", "clip_g"} and a["clip_l"].shape == (1, 32) and a["clip_g"].shape == (1, 48)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    losses = [json.loads(r)["loss"] for r in (tmp_path / "ref" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(np.isfinite(losses))
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_diffusers)
    import torch
    state = {k: torch.from_numpy(v) for k, v in a.items()}
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    row = pipe.text_encoder_2.get_input_embeddings().weight[pipe.tokenizer_2.convert_tokens_to_ids(TOKEN)]
    assert np.array_equal(row.detach().numpy(), a["clip_g"][0])


def test_training_sdxl_runs_where_torch_cannot_be_imported(xl_exported, photos, tmp_path):
    code = f"""
from zoodip.cli import main
main(['train', {str(xl_exported)!r}, '--images', {str(photos)!r}, '--token', 'sks', '--init', 'dog', '--out',
      {str(tmp_path / 'o')!r}, '--steps', '2', '--set', 'progress=false'], standalone_mode=False)
"""
    r = run_without_torch(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "o" / "learned_embeds.safetensors").is_file()


def test_torch_ti_xl_trains_only_the_placeholder_rows_of_both_encoders(xl_diffusers, photos):
    import torch
    from bench.sd import torch_ti_xl as ti
    from zo_runtime.latents import load_image, list_images

    cfg = ti.TorchTIXLConfig(resolution=32, steps=1, warmup=0, max_images=2)
    parts = ti.load(xl_diffusers, photos, cfg)
    assert parts.latents.shape == (2, 4, 16, 16) and parts.time_ids.shape == (2, 6)
    geometry = []
    for path in list_images(photos)[:2]:
        load_image(path, 32, geometry)
    assert parts.time_ids.tolist() == [g[0] for g in geometry]          # zoodip's time ids of the same photos
    ids = ti.prompt_ids(parts, cfg)
    assert all(pid in i[0].tolist() for pid, i in zip(parts.placeholder_ids, ids))
    tables = [e.get_input_embeddings().weight for e in parts.encoders]
    before = [t.detach().clone() for t in tables]
    ti.xl_loss(parts, ids, torch.Generator().manual_seed(0)).backward()
    for t, pid in zip(tables, parts.placeholder_ids):
        assert t.grad.abs().sum(dim=1).nonzero().flatten().tolist() == [pid]    # both rows get a true gradient
    assert not any(p.grad is not None for p in parts.unet.parameters())
    parts.optimizer.zero_grad(set_to_none=True)
    step = ti.xl_step(parts, ids, torch.Generator().manual_seed(1))
    assert np.isfinite(step["loss"]) and step["backward_s"] > 0
    for t, b, pid in zip(tables, before, parts.placeholder_ids):
        assert (t.detach() - b).abs().sum(dim=1).nonzero().flatten().tolist() == [pid]
    saved = ti.saved_bytes(parts, ids, torch.Generator().manual_seed(2))
    assert saved["saved_tensor_gb"] > 0 and saved["saved_storages"] > 10


def test_torch_ti_xl_runs_and_sweep_entries_say_what_did_not_fit(xl_diffusers, photos, monkeypatch, tmp_path):
    import json
    from bench.sd import torch_ti_xl as ti

    cfg = ti.TorchTIXLConfig(resolution=32, steps=1, warmup=1, max_images=2)
    step, bound = ti.run(xl_diffusers, photos, cfg), ti.run(xl_diffusers, photos, cfg, saved_only=True)
    assert step["mode"] == "step" and step["peak_rss_gb"] > 0.05 and step["step_seconds"] > 0
    assert bound["lower_bound_step_peak_gb"] > bound["loaded_rss_gb"] > 0 and "step_seconds" not in bound
    proc = {"returncode": 1, "killed": None}
    torch_oom = "RuntimeError: [enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: " \
                "you tried to allocate 671088640 bytes. Error code 12 (Cannot allocate memory)"
    e = ti.classify({}, proc, f"Traceback ...\n{torch_oom}\n", 16.0)
    assert not e["fits"] and e["needs_more_than_gb"] == 16.0 and "allocate" in e["error"]
    low = ti.classify({}, {"returncode": -9, "killed": "machine MemAvailable 1.2 GiB < 1.5 GiB"}, "", 16.0)
    assert low["machine_low"] and "needs_more_than_gb" not in low
    # the sweep: a run that does not fit gets a forward-only bound; the largest fitting resolution is kept
    fake = {32: {**step, "process": {}, "fits": True}, 64: {"process": {}, "fits": False, "machine_low": False}}
    monkeypatch.setattr(ti, "_one", lambda base, images, res, extra, *a: bound if "--saved-only" in extra else fake[res])
    out = ti.sweep(xl_diffusers, photos, [32, 64], tmp_path / "ti.json", 8.0, None, 1, 1, tmp_path / "logs")
    res = json.loads(out.read_text())
    assert res["largest_fitting_resolution"] == 32 and res["resolutions"]["64"]["saved_only"]["mode"] == "saved_only"


def test_zoodip_train_bench_counts_both_encoders_of_an_sdxl_step(xl_exported, photos, tmp_path):
    from bench.sd import zoodip_train
    res = zoodip_train.run(xl_exported, photos, tmp_path / "o", steps=3, warmup=1, resolution=32, token="sks",
                           init="dog", seed=0, progress=False)
    calls = res["session_calls"]
    assert calls["unet"] == 9 and calls["text_encoder"] == calls["text_encoder_2"] == 3    # 3 passes a step
    assert res["text_encoder_seconds_per_step"] > 0 and 0 <= res["outside_session_run_share"] < 1


def test_w8_fast_rewrites_sdxl_and_its_gate_decides_the_training_mu(xl_exported, photos, tmp_path):
    """w8-fast on SDXL: fused attention and int8-compute MatMuls in the UNet, every one of FAST_MUS gated, and the
    manifest's training mu is the largest whose ZO correlation reaches the bar (none: the gate fails, naming it)."""
    from export.quantize import FAST_MUS, FAST_ZO_CORR_MIN, QuantizeConfig, quantize_model
    cfg = QuantizeConfig(scheme="w8-fast", calib_images=str(photos), calib_samples=4, text_samples=4,
                         gate_samples=2, zo_directions=8, gate=False)
    m = ModelDir.open(quantize_model(xl_exported, tmp_path / "fast", cfg)).manifest
    ic, g = m["int8_compute"], m["gates"]
    assert ic["fused_attention"] > 0 and ic["nodes"]["MatMulNBits(int8 compute)"] > 0
    assert g["unet"]["cond_cosine"] > 0.95 and g["text_encoder_2"]["cosine"] > 0.999
    corr = {float(mu): z["corr"] for mu, z in g["zo"].items()}
    assert sorted(corr) == sorted(FAST_MUS)
    held = [mu for mu in FAST_MUS if corr[mu] >= FAST_ZO_CORR_MIN]
    assert m.get("train_defaults", {}).get("mu") == max(held, default=None)
    assert bool(held) == (not any("ZO finite-difference" in f for f in g["failed"]))
