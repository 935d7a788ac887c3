"""Toy world: generator determinism, held-out rule, classifier accuracy (ONNX) and the shipped pipeline folder."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from models.toyworld import world

TOY = Path(__file__).resolve().parents[1] / "models" / "toyworld"
BUDGET_BYTES = 40 * 1024 * 1024  # issue 6: weights + classifier ONNX


def test_generator_is_deterministic_and_seed_dependent():
    a, scenes_a = world.make_dataset(6, seed=3)
    b, scenes_b = world.make_dataset(6, seed=3)
    c, _ = world.make_dataset(6, seed=4)
    assert a.shape == (6, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and scenes_a == scenes_b
    assert not np.array_equal(a, c)


def test_vocabulary_sizes():
    assert len(world.SHAPES) >= 8 and len(world.COLORS) >= 8
    assert len(world.PATTERNS) >= 4 and len(world.BACKGROUNDS) >= 6
    assert len(world.CAPTION_TEMPLATES) >= 4


def test_held_out_rule_size_disjoint_and_pairs_covered():
    held, train = world.held_out_triples(), world.training_triples()
    assert len(held) == 32 and len(held) / len(world.all_triples()) >= 0.10
    assert not set(held) & set(train) and set(held) | set(train) == set(world.all_triples())
    # every attribute pair of a held-out triple still occurs in training: generalization is compositional
    for s, c, p in held:
        assert any(t[:2] == (s, c) for t in train)
        assert any((t[0], t[2]) == (s, p) for t in train)
        assert any(t[1:] == (c, p) for t in train)
    assert world.held_out_triples(seed=7) != held  # the rule is seeded


def test_background_never_equals_object_color():
    rng = np.random.default_rng(0)
    for _ in range(500):
        s = world.random_scene(rng)
        assert world.BACKGROUNDS[s.background] != world.COLORS[s.color]
    with pytest.raises(ValueError, match="equals the object color"):
        world.Scene("star", "red", "solid", "red")
    with pytest.raises(ValueError, match="unknown shape"):
        world.Scene("blob", "red", "solid", "white")


def test_rendered_background_and_object_pixels():
    img = world.render(world.Scene("square", "yellow", "solid", "black", (0.0, 0.0, 22.0, 0.0)))
    assert tuple(img[1, 1]) == world.BACKGROUNDS["black"]  # corner is background
    assert tuple(img[32, 32]) == world.COLORS["yellow"]  # center is the solid object


def test_captions_name_attributes_and_mostly_the_background():
    rng = np.random.default_rng(1)
    scene = world.Scene("heart", "pink", "dotted", "gray")
    caps = [world.caption(scene, rng) for _ in range(400)]
    assert all(w in c for c in caps for w in ("heart", "pink", "dotted"))
    share_bg = np.mean(["gray" in c for c in caps])
    assert 0.8 < share_bg < 0.97
    assert len({c.replace("gray", "") for c in caps}) >= 8  # template and word-order variety


def test_concept_images():
    concept = world.held_out_triples()[0]
    imgs = world.make_concept_images(concept, 5, seed=11)
    again = world.make_concept_images(concept, 5, seed=11)
    assert len(imgs) == 5 and imgs[0].size == (64, 64)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(imgs, again))


def test_classifier_onnx_accuracy_on_fresh_images():
    from models.toyworld.attributes import AttributeClassifier, attribute_accuracy
    clf = AttributeClassifier()
    images, scenes = world.make_dataset(300, seed=20261129)  # a seed the training never used
    wanted = [{"shape": s.shape, "color": s.color, "pattern": s.pattern, "background": s.background} for s in scenes]
    acc = attribute_accuracy(clf.predict(images), wanted)
    assert min(acc.values()) >= 0.97, acc  # >= 98% on 2,000 at training time; 300 images leave noise
    feats = clf.features(images[:4])
    assert feats.shape == (4, 128) and np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    same = clf.similarity(world.make_concept_images(("star", "red", "striped"), 3, 0),
                          world.make_concept_images(("star", "red", "striped"), 3, 1))
    other = clf.similarity(world.make_concept_images(("star", "red", "striped"), 3, 0),
                           world.make_concept_images(("ring", "blue", "dotted"), 3, 1))
    assert same > other


def test_shipped_size_within_budget():
    files = [p for p in (TOY / "pipeline").rglob("*") if p.is_file()] + [TOY / "classifier.onnx"]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 3  # vae, text_encoder, unet
    assert sum(p.stat().st_size for p in files) <= BUDGET_BYTES


def test_pipeline_folder_loads_with_diffusers():
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    with safe_open(TOY / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    pipe = StableDiffusionPipeline.from_pretrained(TOY / "pipeline", torch_dtype=torch.float32)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.vocab_size == 49408 and pipe.tokenizer.model_max_length == 77
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.tokenizer("star").input_ids == [49406, 1565, 49407]  # the real CLIP BPE
    sch = pipe.scheduler.config
    assert (sch.beta_start, sch.beta_end, sch.beta_schedule, sch.num_train_timesteps) == \
        (0.00085, 0.012, "scaled_linear", 1000) and sch.prediction_type == "epsilon"
    out = pipe("a red solid star on a white background", num_inference_steps=2, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


@pytest.mark.parametrize("pair", list(itertools.islice(itertools.combinations(world.SHAPES, 2), 3)))
def test_shapes_render_differently(pair):
    a = world.render(world.Scene(pair[0], "red", "solid", "white"))
    b = world.render(world.Scene(pair[1], "red", "solid", "white"))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


def test_world_words_are_every_attribute_word_once():
    words = world.WORDS
    assert len(words) == len(set(words)) == 23 and {"ring", "pink", "checkered", "white"} <= set(words)


def test_read_counts_the_concepts_attributes_in_samples(tmp_path):
    import json

    from click.testing import CliRunner

    from models.toyworld import read
    triple = ("star", "red", "striped")
    for i, img in enumerate(world.make_concept_images(triple, 4, seed=5)):
        img.save(tmp_path / f"{i:03d}.png")
    world.make_concept_images(("ring", "blue", "dotted"), 1, seed=5)[0].save(tmp_path / "grid.png")   # skipped
    (tmp_path / "concept.json").write_text(json.dumps(dict(zip(("shape", "color", "pattern"), triple))))
    counts = read.read(tmp_path, json.loads((tmp_path / "concept.json").read_text()))
    assert sum(counts["shape"].values()) == 4 and counts["shape"]["star"] >= 3 and counts["color"]["red"] >= 3
    res = CliRunner().invoke(read.main, [str(tmp_path), str(tmp_path / "concept.json")])
    assert res.exit_code == 0 and "shape star" in res.output and "/4" in res.output
    empty = tmp_path / "none"
    empty.mkdir()
    res = CliRunner().invoke(read.main, [str(empty), str(tmp_path / "concept.json")])
    assert res.exit_code == 1 and "no samples" in res.output and "Traceback" not in res.output
