"""Composite inits ("dog+red": summed token rows) and the greedy init search over candidate words."""
from __future__ import annotations

import numpy as np
import pytest

from bench.toy import init_search as S
from zo_runtime import objective as O
from zo_runtime.train_config import TrainConfig


def quick(**kw):
    base = dict(token="sks", init="dog", steps=4, save_every=0, progress=False, schedule="paper")
    return TrainConfig(**{**base, **kw})


def row(run, word):
    return np.asarray(run.text.table[run.text.tokenizer.token_id(word + "</w>")], np.float32)


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
    run = O.open_objective(tiny_exported, photos, tmp_path, quick())
    target = row(run, "dog") + row(run, "red") + row(run, "striped")
    # a loss whose minimum is dog + red + striped: two rounds find it, the third finds no gain and stops
    monkeypatch.setattr(O, "eval_losses", lambda r, v, rngs: [float(np.sum((v[0] - target) ** 2)) for _ in rngs])
    cfg = S.InitSearchConfig(candidates=("blue", "striped", "red", "cat", "red"), rounds=3, draws=2)
    init, scores, passes = S.search_init(run, cfg)
    assert init.split("+")[0] == "dog" and sorted(init.split("+")[1:]) == ["red", "striped"]
    assert [s["round"] for s in scores] == [1] * 4 + [2] * 3 + [3] * 2        # duplicates tried once
    assert passes == 2 * (1 + 4 + 3 + 2) == cfg.max_passes()
    best = {r: min((s for s in scores if s["round"] == r), key=lambda s: s["loss"])["word"] for r in (1, 2, 3)}
    assert [best[1], best[2]] == init.split("+")[1:] and best[3] in ("blue", "cat")


def test_the_search_on_the_model_never_ends_above_its_start(tiny_exported, photos, tmp_path):
    run = O.open_objective(tiny_exported, photos, tmp_path, quick())
    cfg = S.InitSearchConfig(candidates=("red", "blue", "cat"), rounds=2, draws=3)
    init, scores, passes = S.search_init(run, cfg)
    assert init.split("+")[0] == "dog" and passes <= cfg.max_passes()

    def loss(words):
        v = np.sum([O.word_rows(run.text, w) for w in words.split("+")], axis=0)[None]
        return S.search_loss(run, v, cfg.draws)
    assert loss(init) <= loss("dog")
    assert S.search_init(run, cfg) == (init, scores, passes)                  # same draws: the same answer


def test_a_candidate_of_two_words_fails_before_any_pass(tiny_exported, photos, tmp_path, monkeypatch):
    run = O.open_objective(tiny_exported, photos, tmp_path, quick())
    monkeypatch.setattr(O, "eval_losses", lambda *a: pytest.fail("a pass ran before the candidates were checked"))
    with pytest.raises(ValueError, match="'hot dog' is not one word"):
        S.search_init(run, S.InitSearchConfig(candidates=("red", "hot dog")))
    with pytest.raises(ValueError, match="rounds and draws"):
        S.InitSearchConfig(rounds=0)
