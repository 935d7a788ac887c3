"""Schedules, the plan, time budgets and early stopping: arithmetic, resolution of defaults, exact resume."""
import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
from safetensors.numpy import load_file

from zo_runtime import objective as O
from zo_runtime import plan as pl
from zo_runtime import schedule
from zo_runtime import train as T
from zo_runtime.early_stop import Tracker
from zo_runtime.train_config import TrainConfig


@pytest.mark.parametrize("text, seconds", [("3h", 10800), ("90m", 5400), ("45s", 45), ("1h30m", 5400),
                                           ("1.5h", 5400), (" 2 H ", 7200), ("120", 120), ("1d", 86400)])
def test_durations_parse(text, seconds):
    assert pl.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "abc", "-1h", "", "nan", "inf", "3x", "1h-5m", "0m"])
def test_bad_durations_name_the_fix(text):
    with pytest.raises(ValueError, match="time-budget.*(3h|duration)"):
        pl.parse_duration(text)
    with pytest.raises(ValueError, match="time-budget"):
        TrainConfig(token="sks", init="dog", time_budget=text)


def test_plan_arithmetic_and_line():
    assert pl.steps_within(100.0, 3.0, 1000) == 33 and pl.steps_within(100.0, 3.0, 10) == 10
    assert pl.steps_within(-5.0, 3.0, 10) == 1 and pl.steps_within(10.0, 0.0, 7) == 7
    p = pl.Plan(3, 2.0, 0.5, steps=1000, done=10, budget_seconds=None, resolution=512, peak_rss_gb=1.25)
    assert p.seconds_per_step == 2.5 and p.seconds_left == 990 * 2.5
    import datetime as dt
    now = dt.datetime(2026, 12, 3, 12, 0)
    line = p.line(now)
    assert "1000 steps x 3 passes, 2.50 s/step at 512 px" in line and "41 min left" in line
    assert "done ~Thu 12:41" in line and "1.25 GiB" in line
    assert "256 px ~10 min" in line and "384 px ~23 min" in line          # (r / 512)^2 of 2,475 s
    assert p.as_dict()["seconds_left"] == 2475.0 and p.as_dict()["finish"]
    assert pl.human(3 * 3600 + 25 * 60) == "3 h 25 min" and pl.human(30) == "30 s"


def test_schedules_fill_only_what_is_unset():
    sd1, sd2 = {"family": "sd1", "scheme": "fp32"}, {"family": "sd2", "scheme": "fp32"}
    fast = schedule.resolve(TrainConfig(token="sks", init="dog"), sd1)
    assert (fast.steps, fast.mu, fast.t_range) == (schedule.SCHEDULES["fast"]["steps"], 1e-3, (500, 900))
    paper = schedule.resolve(TrainConfig(token="sks", init="dog", schedule="paper"), sd2)
    assert (paper.steps, paper.lr, paper.mu, paper.directions, paper.early_stop) == (30000, 1e-2, 1e-2, "gaussian", False)
    mine = schedule.resolve(TrainConfig(token="sks", init="dog", schedule="paper", steps=7, lr=0.1, mu=0.5), sd2)
    assert (mine.steps, mine.lr, mine.mu) == (7, 0.1, 0.5)
    with pytest.raises(ValueError, match="not resolved"):
        TrainConfig(token="sks", init="dog").zo


def test_the_models_validated_mu_is_used_and_others_warn():
    gates = {"thresholds": {"zo_corr_min": 0.7}, "zo": {"0.001": {"corr": 0.2}, "0.01": {"corr": 0.95}}}
    fast = {"family": "sd1", "scheme": "w8-fast", "gates": gates, "zo_validated_mus": [1e-2],
            "train_defaults": {"mu": 1e-2}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert schedule.resolve(TrainConfig(token="sks", init="dog"), fast).mu == 1e-2
        assert schedule.resolve(TrainConfig(token="sks", init="dog", mu=0.1), fast).mu == 0.1   # above: covered
    with pytest.warns(UserWarning, match=r"mu 0.001 is below .* 0.01 \(ZO correlation 0.20 there\).*--set mu=0.01"):
        schedule.resolve(TrainConfig(token="sks", init="dog", mu=1e-3), fast)
    # the recorded training mu is the bar, though the gate held below it too (the toy world lost 28% there)
    both = {**fast, "zo_validated_mus": [3e-3, 1e-2]}
    assert "--set mu=0.01" in schedule.mu_warning(both, 3e-3) and schedule.mu_warning(both, 1e-2) is None
    older = {"family": "sd1", "scheme": "w8", "gates": gates}              # before zo_validated_mus: from the gates
    assert schedule.validated_mus(older) == [0.01] and schedule.mu_warning(older, 1e-3)
    assert "--scheme w8" in schedule.mu_warning({**fast, "zo_validated_mus": []}, 1e-2)
    assert schedule.mu_warning({"scheme": "fp32"}, 1e-9) is None and schedule.validated_mus({"scheme": "fp32"}) is None


def test_the_tracker_keeps_the_best_vector_and_stops_after_patience():
    tr = Tracker.start(np.zeros(3))
    for step, loss in ((0, 1.0), (100, 0.8), (200, 0.9), (300, 0.85)):
        tr.update(step, loss, np.full(3, step, np.float32))
    assert tr.best_step == 100 and np.array_equal(tr.best_v, np.full(3, 100)) and tr.since_best == 2
    assert not tr.stop(3) and tr.stop(2) and not tr.stop(0)       # patience 0: never stop
    back = Tracker.from_arrays(tr.arrays(), np.zeros(3))
    assert (back.best_loss, back.best_step, back.since_best) == (0.8, 100, 2) and np.array_equal(back.best_v, tr.best_v)
    assert Tracker.from_arrays({}, np.ones(3)).best_loss == float("inf")          # checkpoints without validation


def _quick(**kw):
    base = dict(token="sks", init="dog", steps=12, tau=4, save_every=0, progress=False, schedule="paper",
                early_stop=True, val_every=3, val_draws=2, patience=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def images(photos):
    return photos


def test_early_stopping_saves_the_best_validated_vector(tiny_exported, images, tmp_path):
    T.train(tiny_exported, images, tmp_path, _quick(lr=0.05))
    rows = [json.loads(r) for r in (tmp_path / "log.jsonl").read_text().splitlines()]
    checks = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in checks] == [0, 3, 6, 9, 12]
    best = min(checks, key=lambda r: r["val_loss"])
    best_v = load_file(str(tmp_path / T.EMBEDS))["sks"]
    last = load_file(str(tmp_path / T.LAST_EMBEDS))["sks"]
    run = O.open_objective(tiny_exported, images, tmp_path, _quick(lr=0.05))
    assert O.validation_loss(run, best_v) == pytest.approx(best["val_loss"], rel=1e-6)   # the saved one is the best
    assert O.validation_loss(run, last) == pytest.approx(checks[-1]["val_loss"], rel=1e-6)
    with np.load(tmp_path / T.CHECKPOINT) as z:
        assert int(z["val_best_step"]) == best["step"]


def test_patience_stops_the_run(tiny_exported, images, tmp_path):
    T.train(tiny_exported, images, tmp_path, _quick(steps=60, lr=0.5, patience=1))      # a large lr: no progress
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert timing["stopped"] == "early stop" and timing["last_step"] < 60


def test_resume_with_early_stopping_is_exact(tiny_exported, images, tmp_path):
    ref = T.train(tiny_exported, images, tmp_path / "ref", _quick(steps=15, save_every=5))
    T.train(tiny_exported, images, tmp_path / "cut", _quick(steps=10, save_every=5))
    cut = T.train(tiny_exported, images, tmp_path / "cut", _quick(steps=15, save_every=5, resume=True))
    assert np.array_equal(load_file(str(ref))["sks"], load_file(str(cut))["sks"])
    with np.load(tmp_path / "ref" / T.CHECKPOINT) as a, np.load(tmp_path / "cut" / T.CHECKPOINT) as b:
        for key in ("v", "m", "s", "val_best_v", "val_best_loss", "val_best_step", "val_since_best"):
            assert np.array_equal(a[key], b[key]), key
    with pytest.raises(ValueError, match="early_stop"):           # turning it off changes the trajectory's record
        T.train(tiny_exported, images, tmp_path / "cut", _quick(steps=20, resume=True, early_stop=False))


def test_a_time_budget_picks_the_steps_and_records_the_plan(tiny_exported, images, tmp_path, capsys):
    # 15 s: the plan comes after 3 warm-up steps, which must end inside the budget also on a loaded machine
    T.train(tiny_exported, images, tmp_path, replace(_quick(early_stop=False, time_budget="15s"), steps=None))
    config = json.loads((tmp_path / "config.json").read_text())
    plan, timing = config["plan"], json.loads((tmp_path / "timing.json").read_text())
    assert plan["budget_seconds"] == 15 and plan["steps"] < 30000 and plan["passes_per_step"] == 3
    assert timing["last_step"] <= plan["steps"]
    assert "plan: " in capsys.readouterr().out
    T.train(tiny_exported, images, tmp_path / "given", _quick(early_stop=False, time_budget="1h", steps=5))
    assert json.loads((tmp_path / "given" / "config.json").read_text())["plan"]["steps"] == 5    # --steps wins


def test_a_budget_that_ends_inside_warm_up_still_records_the_plan(tiny_exported, images, tmp_path):
    # 1 ms: the first step outlasts it; the run stops there and config.json holds the plan from that step
    T.train(tiny_exported, images, tmp_path, replace(_quick(early_stop=False, time_budget="0.001s"), steps=None))
    plan = json.loads((tmp_path / "config.json").read_text())["plan"]
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert plan is not None and plan["budget_seconds"] == 0.001 and plan["seconds_per_step"] > 0
    assert timing["stopped"] == "time budget reached" and timing["last_step"] == 1 == plan["steps"]
