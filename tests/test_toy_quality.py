"""bench.toy.quality: the one-concept smoke version of the held-out-concept benchmark, end to end.

Few steps and few images keep it to about a minute; the assertions are on values the benchmark
must get right whatever the training length: the oracle (concept in words) beats the init word,
passes are counted per method, the curve covers the eval steps, an interrupted run resumes.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from bench.toy import quality as toy_quality
from bench.toy.eval import eval_backgrounds, prompts_for
from models.toyworld import world

STEPS = 8


def test_eval_backgrounds_avoid_the_training_ones():
    concept = ("circle", "red", "checkered")
    scenes = world.concept_scenes(concept, 5, seed=3)
    assert [s.concept for s in scenes] == [concept] * 5
    shown = {s.background for s in scenes}
    bgs = eval_backgrounds(concept, scenes, 3, seed=0)
    assert len(bgs) == 3 and "red" not in bgs                      # never the object's own color
    fresh = [b for b in world.allowed_backgrounds("red") if b not in shown]
    assert set(bgs[:len(fresh)]) == set(fresh[:3]) or set(bgs) <= set(fresh)
    assert prompts_for("sks", ["blue"]) == [("a photo of a sks", None), ("a sks on a blue background", "blue")]


def test_summary_passes_to_90pct_of_ti():
    def row(cfs, passes):
        curve = [{"step": i + 1, "forward_passes": p, **dict.fromkeys(toy_quality.METRICS, c)}
                 for i, (c, p) in enumerate(zip(cfs, passes))]
        return {"curve": curve, "final": curve[-1], "train_seconds": 1.0, "wall_seconds": 2.0, "peak_rss_gb": 0.1}

    results = [{"backprop_ti": row([0.5, 1.0], [10, 20]), "zoodip": row([0.8, 0.95], [30, 60])},
               {"backprop_ti": row([0.5, 0.8], [10, 20]), "zoodip": row([0.7, 0.85], [30, 60])}]
    s = toy_quality.summarize(results, ["backprop_ti", "zoodip"])
    assert s["backprop_ti"]["concept_fidelity"] == 0.9
    assert s["zoodip"]["curve"][0]["concept_fidelity"] == 0.75
    assert s["zoodip"]["passes_to_90pct_ti"] == 60                  # 0.9 * 0.9 = 0.81: reached at 60, not 30
    assert s["backprop_ti"]["passes_to_90pct_ti"] == 20


def test_pool_ratio_interval_and_passes(tmp_path):
    """Paired units: a method at exactly half of TI on every concept has ratio 0.5 and a zero-width interval."""
    from bench.toy import pool as toy_pool

    def res(seed, pairs):
        row = lambda f: {"curve": [{"forward_passes": 10, "concept_fidelity": f / 2},
                                   {"forward_passes": 20, "concept_fidelity": f}], "final": {"concept_fidelity": f}}
        return {"config": {"seed": seed, "steps": 20}, "concepts": [{"concept": ["c", str(i), "p"]} for i in range(len(pairs))],
                "per_concept": [{"backprop_ti": row(t), "zoodip": row(z)} for t, z in pairs]}

    half = toy_pool.pool([res(1, [(0.4, 0.2), (0.8, 0.4)]), res(2, [(0.6, 0.3)])])
    z = half["methods"]["zoodip"]
    assert z["paired_units"] == 3 and z["ratio_to_ti"] == 0.5 and z["ratio_ci95"] == [0.5, 0.5]
    assert z["losses"] == 3 and z["passes_to_90pct_ti"] is None      # 0.9 * 0.6 never reached
    assert z["ratio_curve"] == [[10, 0.25, 0.25, 0.25], [20, 0.5, 0.5, 0.5]]   # half the passes: half the fidelity
    assert "| 0.25 (0.25-0.25) at 10 |" in toy_pool.table(half)
    mixed = toy_pool.pool([res(1, [(0.4, 0.6), (0.8, 0.7)]), res(2, [(0.2, 0.1), (0.6, 0.9)])])["methods"]["zoodip"]
    assert mixed["ratio_to_ti"] == 1.15 and mixed["wins"] == 2
    lo, hi = mixed["ratio_ci95"]
    assert lo < 1.15 < hi and hi - lo > 0.2                          # 4 units: a wide interval, said as such
    assert mixed["passes_to_90pct_ti"] == 20                         # curve 0.29, 0.575 vs target 0.45
    pooled = toy_pool.pool([res(1, [(0.4, 0.6), (0.8, 0.7)]), res(2, [(0.2, 0.1), (0.6, 0.9)])])
    assert "| zoodip (w8, ZO) | 4 |" in toy_pool.table(pooled)
    toy_pool.write(pooled, tmp_path / "pooled.json")
    assert json.loads((tmp_path / "pooled.json").read_text())["methods"]["zoodip"]["ratio_to_ti"] == 1.15
    assert (tmp_path / "pooled_curve.png").stat().st_size > 1000


def test_cluster_interval_resamples_whole_concepts():
    """Runs that repeat a concept count once per concept: the interval is wider than resampling runs, and a
    method at exactly twice the reference on every run keeps ratio 2 in every resample."""
    from bench.toy import pool as toy_pool
    ref = np.array([0.2, 0.8, 0.4, 0.6] * 3)
    ours = ref + np.array([0.3, -0.2, 0.1, 0.0] * 3)
    groups = ["a", "b", "c", "d"] * 3                      # 12 runs of 4 concepts
    _, lo, hi = toy_pool.ratio_interval(ours, ref)
    clo, chi = toy_pool.cluster_ratio_interval(ours, ref, groups)
    assert chi - clo > 1.3 * (hi - lo)
    assert toy_pool.cluster_ratio_interval(2 * ref, ref, groups) == (2.0, 2.0)


def test_pool_reports_prompt_fidelity_paired_with_ti():
    """The token must not swallow the prompt: prompt fidelity's mean and its paired difference to TI's."""
    from bench.toy import pool as toy_pool

    def res(seed, prompts):           # (TI's, zoodip's) prompt fidelity per concept; concept fidelity 0.5 each
        row = lambda p: {"curve": [{"forward_passes": 10, "concept_fidelity": 0.5}],
                         "final": {"concept_fidelity": 0.5, "prompt_fidelity": p}}
        return {"config": {"seed": seed, "steps": 10}, "concepts": [{"concept": ["c", str(i), "p"]} for i in range(2)],
                "per_concept": [{"backprop_ti": row(t), "zoodip": row(z)} for t, z in prompts]}

    z = toy_pool.pool([res(1, [(1.0, 0.75), (0.5, 0.25)])])["methods"]["zoodip"]
    assert z["prompt_fidelity"] == 0.5 and z["prompt_minus_ti"] == -0.25 and z["prompt_minus_ti_ci95"] == [-0.25, -0.25]
    assert "| 0.500 (-0.250, -0.250 to -0.250) |" in toy_pool.table(toy_pool.pool([res(1, [(1.0, 0.75), (0.5, 0.25)])]))


def test_pool_pairs_a_later_file_with_the_runs_of_the_same_draw():
    """A candidate screened later (its own file) pairs with the reference and TI run earlier on the same draw."""
    from bench.toy import pool as toy_pool

    def res(seed, methods):           # methods: {name: [fidelity per concept]}
        row = lambda f: {"curve": [{"forward_passes": 10, "concept_fidelity": f}], "final": {"concept_fidelity": f}}
        return {"config": {"seed": seed, "steps": 10}, "concepts": [{"concept": ["c", str(i), "p"]} for i in range(2)],
                "per_concept": [{m: row(f[i]) for m, f in methods.items()} for i in range(2)]}

    earlier = res(21, {"backprop_ti": [0.4, 0.8], "zoodip": [0.2, 0.4]})
    later = res(21, {"zoodip_lr5e3": [0.6, 1.2]})
    pooled = toy_pool.pool([earlier, later])
    assert pooled["draws"] == [21] and len(pooled["units"]) == 2
    late = pooled["methods"]["zoodip_lr5e3"]
    assert late["paired_units"] == 2 and late["ratio_to_ti"] == 1.5
    assert pooled["methods"]["zoodip"]["ratio_to_ti"] == 0.5


@pytest.mark.slow
def test_one_concept_smoke(tmp_path, monkeypatch):
    out = tmp_path / "toy.json"
    args = ["--concepts", "1", "--seed", "0", "--steps", str(STEPS), "--work", str(tmp_path / "work"),
            "--methods", "zoodip,backprop_ti,init_only,oracle_prompt", "--eval", "images_per_prompt=4",
            "--eval", "steps=15", "--out", str(out)]
    toy_quality.main(args + ["--jobs", "2"])                      # two (concept, method) processes at once
    res = json.loads(out.read_text())
    m = res["methods"]
    assert set(m) == {"zoodip", "backprop_ti", "init_only", "oracle_prompt"}
    # The concept said in words is drawn far more faithfully than its shape word alone (a real model).
    assert m["oracle_prompt"]["concept_fidelity"] >= m["init_only"]["concept_fidelity"] + 0.25
    assert m["oracle_prompt"]["color_accuracy"] >= 0.75
    assert [p["step"] for p in m["zoodip"]["curve"]] == [1, 2, 4, 8]
    assert m["zoodip"]["forward_passes"] == 3 * STEPS                # n = 2 queries: 3 passes a step
    assert m["backprop_ti"]["forward_passes"] == STEPS
    for s in m.values():
        assert 0.0 <= s["concept_fidelity"] <= 1.0 and 0.0 < s["peak_rss_gb"] < 4.0
    assert res["per_concept"][0]["zoodip"]["method"] == "zoodip"      # results land under their own method
    assert (Path(res["concepts"][0]["work"]) / "zoodip.log").is_file()   # one log per (concept, method)
    samples = np.load(res["per_concept"][0]["zoodip"]["samples"])
    assert samples.shape == (4, 4, 64, 64, 3) and samples.dtype == np.uint8
    assert out.with_suffix(".md").read_text().count("\n|") >= 5
    assert out.with_name("toy_samples.png").stat().st_size > 1000
    # Finished (concept, method) results are reused: a second run recomputes nothing and agrees.
    before = out.with_name("toy_samples.png").stat().st_mtime
    toy_quality.main(args)
    again = json.loads(out.read_text())["methods"]
    assert again["zoodip"]["curve"] == m["zoodip"]["curve"]
    assert again["zoodip"]["train_seconds"] == m["zoodip"]["train_seconds"]
    assert before <= out.with_name("toy_samples.png").stat().st_mtime
    # Re-drawing the final token with the model it trained on reproduces its score (scoring is seeded).
    from bench.toy import rescore
    rs = rescore.rescore([out], "zoodip", "w8", "backprop_ti")["per_run"][0]
    assert rs["zoodip@w8"] == rs["zoodip"] == m["zoodip"]["concept_fidelity"]
    # Extending past the budget resumes the checkpoint: the same vector a fresh 12-step run makes.
    from bench.toy import extend as toy_extend
    from zo_runtime.embeds import load_learned_embeds
    from zo_runtime.train import train

    ext = tmp_path / "ext.json"
    toy_extend.main([str(out), "--to", "12", "--jobs", "2", "--out", str(ext)])    # one thread, like the stages
    z = json.loads(ext.read_text())["methods"]["zoodip"]
    assert [p for p, _ in z["curve"]] == [3, 6, 12, 24, 36]          # the 4 budget points + 12 steps x 3 passes
    spec = res["concepts"][0]
    from bench.toy.method import zo_config
    from dataclasses import replace
    monkeypatch.setenv("ZOODIP_THREADS", "1")     # bit-equality needs the same thread count (float sums)
    fresh = train(spec["models"]["w8"], spec["images"], tmp_path / "fresh", replace(zo_config(spec, "zoodip"), steps=12))
    extended = Path(spec["work"]) / "zoodip_ext" / "learned_embeds.safetensors"
    assert np.array_equal(load_learned_embeds(fresh)[1], load_learned_embeds(extended)[1])
    # The early-stopping study re-trains in validation stages and scores the checkpoints it needs.
    from bench.toy import early_stop
    es = tmp_path / "es.json"
    early_stop.main([str(out), "--method", "zoodip", "--every", "2", "--score-every", "4", "--patience", "1", "9",
                     "--out", str(es)])
    run = json.loads(es.read_text())["runs"][0]
    assert [s for s, _ in run["val"]] == [0, 2, 4, 6, 8] and -1 <= run["spearman"] <= 1
    assert run["patience"]["9"]["stop"] == 8 and run["patience"]["1"]["stop"] <= 8
    assert set(run["fidelity"]) >= {"4", "8", str(run["patience"]["1"]["best"])}


def test_pass_budgeted_methods_are_scored_at_zoodips_forward_passes():
    from bench.toy import method as toy_method

    spec = {"init": "circle", "seed": 1, "zo": {"lr": 0.02}, "eval_at": [375, 750, 1500, 3000]}
    assert toy_method.eval_steps(spec, "zoodip") == [375, 750, 1500, 3000]
    for method, passes in (("zoodip_q8_eq", 9), ("zoodip_q16_eq", 17)):
        steps = toy_method.eval_steps(spec, method)
        assert toy_method.zo_config(spec, method).passes == passes
        assert [abs(s * passes - 3 * e) <= passes for s, e in zip(steps, spec["eval_at"])] == [True] * 4


def test_early_stop_study_arithmetic():
    from bench.toy.early_stop import simulate, spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0) and spearman([1, 1], [2, 3]) == 0.0
    val = [(0, 1.0), (100, 0.8), (200, 0.9), (300, 0.95), (400, 0.7)]
    assert simulate(val, 2) == (300, 100) and simulate(val, 3) == (400, 400) and simulate(val, 1) == (200, 100)


def test_ti_variants_count_their_passes(monkeypatch):
    from bench.toy import method as toy_method

    assert toy_method.TI_METHODS["ti_b4"][0] == {"batch": 4, "steps": 1500}
    assert toy_method.label("ti_b4") == "backprop TI, batch 4, 1,500 steps"
    assert "backprop_ti" in toy_method.METHODS and not toy_method.is_zo("ti_b4")


def test_ti_from_the_searched_start_reads_the_zoodip_runs_start(tmp_path):
    from bench.toy import method as M
    spec = {"work": str(tmp_path), "init": "ring"}
    assert M.ti_start(spec, "backprop_ti") == "ring"
    with pytest.raises(FileNotFoundError, match="run zoodip_jsub_lr5e3_init1 on this concept first"):
        M.ti_start(spec, "ti_searched_init1")
    (tmp_path / "zoodip_jsub_lr5e3_init1.result.json").write_text(json.dumps({"init_search": {"init": "ring+solid"}}))
    assert M.ti_start(spec, "ti_searched_init1") == "ring+solid"


def test_blind_search_leaves_out_the_concepts_own_words():
    from bench.toy import method as M
    spec = {"zo": {"lr": 0.02}, "init": "ring", "seed": 1, "concept": ["ring", "red", "striped"]}
    seen, blind = (M.zo_config(spec, m).init_words() for m in ("zoodip_jsub_lr5e3_init1", "zoodip_jsub_lr5e3_init1_blind"))
    assert {"red", "striped"} <= set(seen) and not {"red", "striped", "ring"} & set(blind)
    assert len(blind) == len(seen) - 2 == 20
