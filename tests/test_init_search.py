"""Composite inits ("dog+red": summed token rows) and --init-candidates, the greedy init search before step 1."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from safetensors.numpy import load_file

from zo_runtime import init_search as S, objective as O, schedule
from zo_runtime import train as T
from zo_runtime.train_config import TrainConfig


def quick(**kw):
    base = dict(token="sks", init="dog", steps=4, save_every=0, progress=False, schedule="paper")
    return TrainConfig(**{**base, **kw})


def row(run, word):
    return np.asarray(run.text.table[run.text.tokenizer.token_id(word + "</w>")], np.float32)


def embeds(out):
    return load_file(str(out / T.EMBEDS))["sks"]


def test_a_composite_init_starts_at_the_sum_of_its_words(tiny_exported, photos, tmp_path):
    run = O.open_objective(tiny_exported, photos, tmp_path, quick(init="dog+red+striped"))
    want = row(run, "dog") + row(run, "red") + row(run, "striped")
    np.testing.assert_allclose(run.v0[0], want, rtol=1e-6)
    pieces = run.text.tokenizer.tokenize("cyan")                  # two BPE pieces: their rows add up
    assert len(pieces) == 2
    cyan = O.word_rows(run.text, "cyan")
    np.testing.assert_allclose(cyan, sum(run.text.table[run.text.tokenizer.token_id(p)] for p in pieces), rtol=1e-6)


@pytest.mark.parametrize("init", ["dog+", "hot dog+red", "+red"])
def test_a_bad_composite_init_is_one_clear_error(tiny_exported, photos, tmp_path, init):
    with pytest.raises(ValueError, match="single token"):
        O.open_objective(tiny_exported, photos, tmp_path, quick(init=init))


def test_the_search_adds_the_words_that_lower_the_loss_and_stops_without_gain(tiny_exported, photos, tmp_path,
                                                                              monkeypatch):
    cfg = quick(init_candidates="blue, striped,red,cat,red,dog", init_rounds=3, init_draws=2)
    assert cfg.init_words() == ("blue", "striped", "red", "cat")          # repeats and the init itself left out
    run = O.open_objective(tiny_exported, photos, tmp_path, cfg)
    target = row(run, "dog") + row(run, "red") + row(run, "striped")
    # a loss whose minimum is dog + red + striped: two rounds find it, the third finds no gain and stops
    monkeypatch.setattr(O, "eval_losses", lambda r, v, rngs: [float(np.sum((v[0] - target) ** 2)) for _ in rngs])
    found = S.search(run, O.Local())
    assert found.init.split("+")[0] == "dog" and sorted(found.init.split("+")[1:]) == ["red", "striped"]
    assert [s["round"] for s in found.scores] == [0] + [1] * 4 + [2] * 3 + [3] * 2
    assert found.passes == 2 * (1 + 4 + 3 + 2) == cfg.init_search_passes()
    best = {r: min((s for s in found.scores if s["round"] == r), key=lambda s: s["loss"])["word"] for r in (1, 2, 3)}
    assert [best[1], best[2]] == found.init.split("+")[1:] and best[3] in ("blue", "cat")
    assert found.loss == pytest.approx(0.0, abs=1e-6)


def test_the_search_on_the_model_never_ends_above_its_start(tiny_exported, photos, tmp_path):
    cfg = quick(init_candidates="red,blue,cat", init_rounds=2, init_draws=3)
    run = O.open_objective(tiny_exported, photos, tmp_path, cfg)
    found = S.search(run, O.Local())
    assert found.init.split("+")[0] == "dog" and found.passes <= cfg.init_search_passes()

    def loss(words):
        return S.search_loss(run, O.Local(), O.init_rows(run.text, words, 1))
    assert loss(found.init) == found.loss <= loss("dog") == found.scores[0]["loss"]
    assert S.search(run, O.Local()) == found                               # same draws: the same answer


@pytest.mark.parametrize("words, match", [("red,hot dog", "'hot dog'"), ("red,,blue", "''"), ("", "''"),
                                          ("red+blue", "'red\\+blue'")])
def test_bad_candidates_are_one_clear_error_before_anything_opens(words, match):
    with pytest.raises(ValueError, match=f"--init-candidates .*single words separated by commas.*{match}"):
        quick(init_candidates=words)
    with pytest.raises(ValueError, match="init-rounds must be >= 1"):
        quick(init_candidates="red", init_rounds=0)
    with pytest.raises(ValueError, match="names 'sks', the token being learned"):
        quick(init_candidates="red,sks")


def test_training_from_the_search_is_training_from_its_start(tiny_exported, photos, tmp_path):
    """--init-candidates = the search, then exactly `--init <what it found>`; a resume reads the start back."""
    cfg = quick(init_candidates="red,blue,cat,striped", init_draws=2, directions="jacobian", prior_refresh=2, tau=4)
    T.train(tiny_exported, photos, tmp_path / "search", cfg)
    found = json.loads((tmp_path / "search" / S.RESULT).read_text())
    config = json.loads((tmp_path / "search" / "config.json").read_text())
    assert config["start"] == found["init"] and config["init_search_passes"] == found["passes"] == 2 * 5
    T.train(tiny_exported, photos, tmp_path / "direct", replace(cfg, init=found["init"], init_candidates=None))
    np.testing.assert_array_equal(embeds(tmp_path / "search"), embeds(tmp_path / "direct"))

    T.train(tiny_exported, photos, tmp_path / "split", replace(cfg, steps=2, save_every=1))
    T.train(tiny_exported, photos, tmp_path / "split", replace(cfg, resume=True))
    np.testing.assert_array_equal(embeds(tmp_path / "split"), embeds(tmp_path / "search"))


def test_a_resume_needs_the_search_it_started_from(tiny_exported, photos, tmp_path):
    cfg = quick(init_candidates="red,blue", init_draws=1, steps=2, save_every=1)
    T.train(tiny_exported, photos, tmp_path, cfg)
    with pytest.raises(ValueError, match="init_candidates='red,blue' \\(now 'red,cat'\\)"):
        T.train(tiny_exported, photos, tmp_path, replace(cfg, init_candidates="red,cat", steps=3, resume=True))
    (tmp_path / S.RESULT).unlink()
    with pytest.raises(ValueError, match="init_search.json is missing"):
        T.train(tiny_exported, photos, tmp_path, replace(cfg, steps=3, resume=True))


def test_the_fast_schedule_spends_the_search_from_its_steps():
    manifest = {"family": "sd1"}
    plain = schedule.resolve(TrainConfig(token="sks", init="dog"), manifest)
    cfg = TrainConfig(token="sks", init="dog", init_candidates=",".join(f"w{i}" for i in range(22)))
    assert cfg.init_search_passes() == 16 * 23 == 368
    searched = schedule.resolve(cfg, manifest)
    assert searched.steps == plain.steps - 123                              # ceil(368 / 3)
    assert schedule.resolve(replace(cfg, steps=500), manifest).steps == 500    # --steps is the user's


def test_a_search_of_the_same_settings_is_reused_and_another_is_searched_again(tiny_exported, photos, tmp_path,
                                                                                 monkeypatch):
    cfg = quick(init_candidates="red,blue", init_draws=1, steps=1)
    T.train(tiny_exported, photos, tmp_path, cfg)                 # e.g. a run killed before its first checkpoint
    first = (tmp_path / S.RESULT).read_text()
    calls = []
    monkeypatch.setattr(S, "search", lambda run, ev: calls.append(run.cfg.t_range) or pytest.fail("searched"))
    T.train(tiny_exported, photos, tmp_path, replace(cfg, force=True))
    assert calls == [] and (tmp_path / S.RESULT).read_text() == first
    with pytest.raises(pytest.fail.Exception, match="searched"):     # other draws: the search runs again
        T.train(tiny_exported, photos, tmp_path, replace(cfg, force=True, t_range=(100, 900)))
    assert calls == [(100, 900)]


def test_the_cli_takes_the_words_and_names_a_bad_one_in_one_line(tiny_exported, photos, tmp_path):
    from click.testing import CliRunner

    from zoodip.cli import main
    args = ["train", str(tiny_exported), "--images", str(photos), "--token", "sks", "--init", "dog", "--steps", "2",
            "--schedule", "paper", "--set", "init_draws=1", "--out", str(tmp_path)]
    bad = CliRunner().invoke(main, [*args, "--init-candidates", "red,hot dog"])
    assert bad.exit_code == 1 and "'hot dog'" in bad.output and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and not (tmp_path / S.RESULT).exists()
    ok = CliRunner().invoke(main, [*args, "--init-candidates", "red,blue"])
    assert ok.exit_code == 0, ok.output
    assert "at most 3 UNet passes before step 1" in ok.output and "init search: start dog" in ok.output


def test_torch_ti_starts_where_zoodip_does_for_a_composite_init(tiny_diffusers, tiny_exported, photos, tmp_path):
    """The benchmark's TI-from-the-searched-start baseline sums the same rows as init_rows."""
    from bench import torch_ti

    parts = torch_ti.load(tiny_diffusers, torch_ti.TorchTIConfig(init="dog+red", resolution=32, steps=1, warmup=0))
    table = parts.text_encoder.get_input_embeddings().weight.detach().numpy()
    run = O.open_objective(tiny_exported, photos, tmp_path, quick())
    np.testing.assert_allclose(table[parts.placeholder_id], O.init_rows(run.text, "dog+red", 1)[0], rtol=1e-6)
    with pytest.raises(ValueError, match="must be a single token"):
        torch_ti.add_placeholder(parts.tokenizer, torch_ti.TorchTIConfig(init="dog cat"))
