"""bench/: the harness on the tiny model writes the expected JSON with real numbers; the TI reference is TI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import common, torch_ti
from bench.sd import memory, plot, speed

RES = 32   # tiny models: 16x16 latents


def test_peak_rss_sees_a_large_allocation():
    # In a fresh process: this one's high-water mark is already above 160 MiB after earlier tests.
    code = ("import numpy as np; from bench import common; b = common.peak_rss_bytes(); "
            "x = np.ones(160 * 2 ** 20 // 8); print(b, common.peak_rss_bytes(), x.sum() > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    before, after = int(out[0]), int(out[1])
    assert after - before >= 120 * 2 ** 20, (before, after)
    assert common.time_stats([3.0, 1.0, 2.0, 10.0])["median"] == 2.5


def test_torch_ti_gradient_only_on_placeholder_row(tiny_diffusers, photos):
    import torch

    cfg = torch_ti.TorchTIConfig(resolution=RES, steps=1, warmup=0, max_images=2)
    parts = torch_ti.load(tiny_diffusers, cfg)
    latents = torch_ti.encode_images(parts, photos, cfg)
    assert latents.shape == (2, 4, RES // 2, RES // 2)
    ids = torch_ti.prompt_ids(parts, cfg)
    assert parts.placeholder_id in ids[0].tolist()
    table = parts.text_encoder.get_input_embeddings().weight
    before = table.detach().clone()
    loss = torch_ti.ti_loss(parts, latents, ids, torch.Generator().manual_seed(0))
    loss.backward()
    rows = table.grad.abs().sum(dim=1).nonzero().flatten().tolist()
    assert rows == [parts.placeholder_id]          # true gradient reaches the placeholder row, and only it
    parts.optimizer.zero_grad(set_to_none=True)
    torch_ti.ti_step(parts, latents, ids, torch.Generator().manual_seed(1))
    changed = (table.detach() - before).abs().sum(dim=1).nonzero().flatten().tolist()
    assert changed == [parts.placeholder_id]       # weight decay's drift on other rows is restored


def test_memory_harness_writes_expected_keys(tiny_diffusers, tiny_exported, tmp_path, photos):
    cfg = memory.MemoryConfig(base=tiny_diffusers, resolution=RES, images=photos, zoodip_steps=3, ti_steps=1,
                              models=(tiny_exported,), log_dir=tmp_path / "logs", default_scheme="fp32")
    out = memory.run(cfg, tmp_path / "memory.json")
    res = json.loads(out.read_text())
    assert set(res) >= {"zoodip", "torch_ti", "schemes", "machine", "summary", "note"}
    assert f"load average {res['machine']['loadavg_1_5_15'][0]:.2f}" in res["note"]   # the run's own load, not a stock phrase
    assert res["machine"]["logical_cores"] >= 1 and res["machine"]["versions"]["onnxruntime"]
    zo, ti = res["zoodip"], res["torch_ti"]
    assert res["schemes"] == {"fp32": zo}
    for r in (zo, ti):
        assert r["peak_rss_gb"] > 0.02 and r["step_seconds"] > 0
        # the kernel's wait4 view bounds the child's own VmHWM (it also folds in this parent's peak at exec)
        assert r["process"]["peak_rss_gb_wait4"] >= r["peak_rss_gb"] - 0.01
    per_step = 1 if zo["config"]["unet_batch"] == "batch" else 3     # one batch-3 call or three batch-1 calls
    assert zo["forward_passes_per_step"] == 3 and zo["session_calls"]["unet"] == 3 * per_step
    assert zo["torch_imported"] is False           # zoodip trained in a process without torch
    assert 0 <= zo["outside_session_run_share"] < 1
    assert ti["forward_passes_per_step"] == 1 and ti["backward_passes_per_step"] == 1
    assert res["summary"]["rss_ratio_vs_torch_ti"]["fp32"] == pytest.approx(ti["peak_rss_gb"] / zo["peak_rss_gb"], rel=0.02)
    md = plot.render([res], None)
    assert "| zoodip fp32 (default) | 32 |" in md and "PyTorch TI" in md
    png = plot.plot_memory([res], tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speed_worker_times_every_shape(tiny_exported):
    res = speed.time_folder(tiny_exported, resolutions=(RES, 2 * RES), batches=(1, 3), repeats=1)
    assert res["scheme"] == "fp32" and res["unet_mb"] > 0
    for px in (str(RES), str(2 * RES)):
        for b in ("1", "3"):
            assert res["unet"][px][b]["median"] > 0
    assert res["text_encoder"]["3"]["median"] > 0 and res["peak_rss_gb"] > 0


def test_text_encoder_bits_scores_against_fp32(tiny_exported, tmp_path):
    """fp32 scores itself exactly; a 4-bit copy is close but not equal, on both hidden states and differences."""
    from bench.sd import text_encoder_bits as teb

    src = tiny_exported / "text_encoder" / "model.onnx"
    four = teb.build_4bit(src, tmp_path, 16)
    assert teb.build_4bit(src, tmp_path, 16) == four                  # built once, then reused
    table = np.load(tiny_exported / "text_encoder" / "token_embeddings.npy", mmap_mode="r")
    res = teb.measure({"fp32": src, "w4": four}, table)
    assert res["fp32"]["hidden_cosine"] == pytest.approx(1.0) and res["fp32"]["finite_difference_cosine"] == pytest.approx(1.0)
    assert 0.5 < res["w4"]["hidden_cosine"] < 1.0 and 0.0 < res["w4"]["finite_difference_cosine"] < 1.0
    assert res["w4"]["weight_mb"] < res["fp32"]["weight_mb"] and res["w4"]["batch3_median_s"] > 0


def test_toy_grad_spectrum_reports_shares_that_add_up(tmp_path):
    """Exact toy gradients: shares are monotone in k, isotropic is k/d, and the energy sits in few dims."""
    from bench.analysis import grad_spectrum as G
    from models.toyworld import world

    concept = ("circle", "orange", "solid")
    (tmp_path / "images").mkdir()
    for i, img in enumerate(world.make_concept_images(concept, 3, 0)):
        img.save(tmp_path / "images" / f"{i}.png")
    r = G.analyse(tmp_path, "circle", draws=12, vector=None)
    assert r["d"] == 128 and r["isotropic_share"]["16"] == 0.125
    for key in ("held_out_share", "vocab_prior_share", "jacobian_prior_share"):
        shares = [r[key][str(k)] for k in G.KS]
        assert all(0 <= s <= 1.0001 for s in shares) and shares == sorted(shares)
    # 12 draws span at most 12 dims, so 12 eigen-directions hold everything
    assert r["dims_for_energy"]["0.95"] <= 12 and 1 <= r["effective_dim"] <= 12
    assert r["jacobian_prior_share"]["16"] > r["isotropic_share"]["16"]


def test_the_torch_jacobian_of_the_analysis_matches_the_products(tiny_diffusers, tiny_exported):
    """bench.analysis.grad_spectrum's torch J^T J twin agrees with zo_runtime.priors.jacobian_moment on the
    same model (diffusers folder vs its ONNX export) for 'a photo of a sks' at the init word's row."""
    from dataclasses import replace

    from bench.analysis import grad_spectrum as G
    from bench.toy.ti import row_optimizer
    from zo_runtime import priors
    from zo_runtime.model_dir import ModelDir
    from zo_runtime.text import TextEncoder

    tcfg = replace(torch_ti.TorchTIConfig(), resolution=32, init="dog", steps=1, warmup=0)
    parts = torch_ti.load(tiny_diffusers, tcfg)
    vec, _ = row_optimizer(parts, tcfg)
    v0 = vec.detach().numpy()[0].astype(np.float32)
    text = TextEncoder(ModelDir.open(tiny_exported))
    sks = text.add_tokens(["sks"], v0[None])[0]
    ids = text.tokenizer(["a photo of a sks"])
    prompt = [(text.token_embeds(ids)[0], [np.flatnonzero(ids[0] == sks)])]
    ours = priors.jacobian_moment(text, prompt, v0[None])
    twin = G.jacobian_moment(parts, vec, v0)
    assert np.linalg.norm(ours - twin) < 1e-3 * np.linalg.norm(twin)


def test_goal_lines_judge_the_step_goal_at_512_px_only():
    from bench.sd import plot

    def mem(px, ratio):
        return {"resolution": px, "default_scheme": "w8",
                "zoodip": {"step_over_unet_seconds": ratio, "forward_passes_per_step": 3}}

    lines = plot.goals([mem(512, 1.03), mem(256, 1.08)], None)
    assert "512 px) = 1.030" in lines[0] and lines[0].endswith(": met.")
    assert "256 px) = 1.080" in lines[1] and "over the bound" in lines[1] and "NOT met" not in lines[1]
    assert plot.goals([mem(512, 1.08)], None)[0].endswith("NOT met.")


def test_toy_split_parts_add_up_and_shares_follow_the_spectrum():
    from bench.analysis.split import split

    d = 8
    moment = np.diag(np.arange(d, 0, -1, dtype=np.float64))      # eigen-directions = the axes, dim 0 stiffest
    v0 = np.ones(d)
    dv = np.zeros(d)
    dv[[0, 6]] = [1.0, 3.0]                                        # 1 unit stiff, 3 units flat
    p = split(v0, v0 + dv, moment)
    assert np.allclose(p["stiff"] + p["flat"], dv) and np.allclose(p["stiff"], np.eye(d)[0])
    assert np.isclose(p["flat_share"], 0.9) and np.isclose(p["top16_share"], 1.0)   # d < 16: all of it


def test_run_guarded_stops_a_child_at_its_data_limit_or_rss_cap(tmp_path):
    import sys
    grow = "import numpy as np, time; a = np.ones(2 ** 28); time.sleep(30)"      # 2 GiB, every page touched
    r = common.run_guarded([sys.executable, "-c", grow], tmp_path / "a.log", data_limit_gb=1.0, min_available_gb=None)
    assert r["returncode"] != 0 and r["killed"] is None and "MemoryError" in (tmp_path / "a.log").read_text()
    small = "import numpy as np, time; a = np.ones(2 ** 25); time.sleep(30)"     # 256 MiB
    r = common.run_guarded([sys.executable, "-c", small], tmp_path / "b.log", max_rss_gb=0.15, min_available_gb=None)
    assert r["killed"].startswith("RSS") and r["returncode"] != 0 and r["wall_seconds"] < 20
    assert r["rss_timeline"] and max(v for _, v in r["rss_timeline"]) > 0.15


def test_sdxl_plot_and_tables_from_results(tmp_path):
    from bench.sd import plot_xl, torch_ti_xl
    proc = {"returncode": 0, "killed": None, "data_limit_gb": 16.0}
    fits = torch_ti_xl.classify({"peak_rss_gb": 15.2, "step_seconds": 80.0, "step_cpu_seconds": 150.0}, proc, "", 16.0)
    oom = torch_ti_xl.classify({}, {**proc, "returncode": 1}, "RuntimeError: DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 1 bytes.", 16.0)
    oom["saved_only"] = {"fits": True, "lower_bound_step_peak_gb": 31.5, "loaded_rss_gb": 13.4, "saved_tensor_gb": 18.1}
    fits512 = torch_ti_xl.classify({"peak_rss_gb": 18.2, "step_seconds": 160.0}, proc, "", 16.0)
    ti = {"resolutions": {"256": fits, "512": fits512, "1024": oom}, "machine": {"mem_total_gib": 23.54}}
    zoodip = [{"config": {"resolution": r}, "peak_rss_gb": g, "step_seconds": s, "forward_passes_per_step": 3,
               "scheme": "w8"} for r, g, s in ((1024, 4.1, 300.0), (512, 3.2, 90.0))]
    stages = {"stages": {"replica": {"reused": True}, "export": {"peak_rss_gb": 11.0, "wall_seconds": 1149,
                                                                  "user_seconds": 272}}}
    md = plot_xl.render(ti, zoodip, stages)
    assert "| zoodip w8 | 512 | 3.20 |" in md and "goal <= 4.5 GiB: met" in md
    assert "| PyTorch TI (fp32) | 256 | 15.20 | 80.0 |" in md
    assert "| PyTorch TI (fp32) | 1024 | > 16.0 |" in md and ">= 31.5 GiB = 13.4 resident + 18.1 kept" in md
    # peak = c + b px^2 through (256, 15.2) and (512, 18.2): b = 3 / 196608, 1024 px -> 15.2 + 15 * 65536 b = 30.2
    assert "~30.2 GiB estimated" in md
    assert "| export (`zoodip export`) | 11.00 | 19.1 |" in md and "zoodip replica" not in md    # reused: no row
    png = plot_xl.plot(ti, zoodip, tmp_path / "xl.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fast_pass_toy_plans_refuse_to_run_without_an_output_file(tmp_path, capsys, monkeypatch):
    from bench.sd import fast_pass

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        fast_pass.main(["toy-model", str(tmp_path / "models"), "--plan", "resnet=static"])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())          # nothing written into the working directory
