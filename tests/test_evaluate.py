"""Metric export (tiny random CLIP / DINO / DINOv2) parity vs torch, numpy preprocessing and metric formulas,
the DreamBooth prompt list, and `evaluate` end to end on the tiny SD export."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from zo_runtime import evaluate as ev
from zo_runtime.assets import CLIP_BPE, DREAMBOOTH_PROMPTS
from zo_runtime.embeds import save_learned_embeds

PROMPTS = DREAMBOOTH_PROMPTS
TOKENIZER = CLIP_BPE
# ONNX vs torch on the same preprocessed inputs (float32 kernels differ in summation order).
EMBED_ATOL = 1e-4
# Metric values vs the numpy reference formulas on the same embeddings.
METRIC_ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny_metric_sources(tmp_path_factory):
    """Local folders of tiny random CLIPModel (real CLIP tokenizer), DINO ViTModel and Dinov2Model."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, Dinov2Config, Dinov2Model, ViTConfig, ViTModel
    torch.manual_seed(0)
    torch.set_num_threads(1)    # torch's thread pool is far slower than one thread on this shared machine
    root = tmp_path_factory.mktemp("metric_src")
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16)).eval()
    clip.save_pretrained(root / "clip")
    CLIPTokenizer(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt")).save_pretrained(root / "clip")
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37), add_pooling_layer=False).eval().save_pretrained(root / "dino")
    Dinov2Model(Dinov2Config(image_size=28, patch_size=14, hidden_size=24, num_hidden_layers=2,
                             num_attention_heads=4, mlp_ratio=2)).eval().save_pretrained(root / "dinov2")
    return root


@pytest.fixture(scope="module")
def tiny_metrics(tiny_metric_sources, tmp_path_factory):
    from export.metrics_export import export_metric_models
    return export_metric_models(tmp_path_factory.mktemp("metrics") / "m", str(tiny_metric_sources / "clip"),
                                str(tiny_metric_sources / "dino"))


def _photos(folder, n=3):
    return ev.load_photos(folder)[:n]


def test_prompts_file_parsed_as_dreambooth(photos):
    classes, lists = ev.parse_prompts_file(PROMPTS)
    assert len(classes) == 30 and classes["dog"] == "dog" and classes["bear_plushie"] == "stuffed animal"
    assert len(lists["object"]) == 25 and len(lists["live"]) == 25
    assert ev.ti_prompt(lists["live"][10], "<sks>") == "a <sks> wearing a red hat"
    assert ev.class_prompt(lists["object"][0], "backpack") == "a backpack in the jungle"
    cfg = ev.EvaluateConfig(prompts_file=str(PROMPTS))
    word, kind, templates = ev.subject_prompts(photos, cfg)
    assert (word, kind, len(templates)) == ("dog", "live", 25)
    assert ev.subject_prompts(photos.parent / "teapot", cfg)[1] == "object"
    with pytest.raises(ValueError, match="--class-word"):
        ev.subject_prompts(Path("/tmp/unknown_subject"), cfg)


def test_preprocess_matches_transformers_clip_processor(photos):
    from transformers import CLIPImageProcessor
    images = _photos(photos, 2) + [np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8)]
    ours = ev.preprocess(images, 224, 224, ev_mean(), ev_std())
    ref = CLIPImageProcessor()(images=images, return_tensors="np")["pixel_values"]
    assert ours.shape == ref.shape == (3, 3, 224, 224)
    assert np.abs(ours - ref).max() < 1e-5


def ev_mean():
    from export.metrics_export import CLIP_MEAN
    return CLIP_MEAN


def ev_std():
    from export.metrics_export import CLIP_STD
    return CLIP_STD


def test_exported_metric_models_match_torch(tiny_metrics, tiny_metric_sources, photos):
    import torch
    assert torch.is_grad_enabled()      # exporting (the tiny_metrics fixture) left the process's grad mode alone
    from transformers import CLIPModel, CLIPTokenizer, ViTModel
    scorer = ev.DreamBoothScorer(tiny_metrics, provider="cpu")
    images = _photos(photos)
    clip = CLIPModel.from_pretrained(tiny_metric_sources / "clip").eval()
    with torch.no_grad():
        x = torch.from_numpy(ev.preprocess(images, 32, 32, ev_mean(), ev_std()))
        want = torch.nn.functional.normalize(clip.get_image_features(pixel_values=x), dim=-1).numpy()
        texts = ["a dog in the jungle", "a red dog"]
        ids = CLIPTokenizer.from_pretrained(tiny_metric_sources / "clip")(texts, padding="max_length",
                                                                         max_length=77, return_tensors="pt")
        assert np.array_equal(ids["input_ids"].numpy(), scorer.tokenizer(texts))
        want_t = torch.nn.functional.normalize(clip.get_text_features(**ids), dim=-1).numpy()
        dino = ViTModel.from_pretrained(tiny_metric_sources / "dino").eval()
        c = scorer.dino_cfg
        want_d = dino(pixel_values=torch.from_numpy(
            ev.preprocess(images, c["resize"], c["crop"], c["mean"], c["std"]))).last_hidden_state[:, 0].numpy()
    assert np.abs(scorer.embed_clip(images) - want).max() < EMBED_ATOL
    assert np.abs(scorer.embed_text(texts) - want_t).max() < EMBED_ATOL
    assert np.abs(scorer.embed_dino(images) - want_d).max() < EMBED_ATOL
    assert np.allclose(np.linalg.norm(scorer.embed_clip(images), axis=1), 1, atol=1e-5)


def test_dinov2_export_matches_torch(tiny_metric_sources, tmp_path, photos):
    import torch
    from transformers import Dinov2Model
    from export.metrics_export import export_dino
    export_dino(str(tiny_metric_sources / "dinov2"), tmp_path)
    cfg = json.loads((tmp_path / "dino" / "preprocess.json").read_text())
    assert cfg["crop"] == 28 and cfg["mean"][0] == 0.485
    import onnxruntime as ort
    x = ev.preprocess(_photos(photos, 2), cfg["resize"], cfg["crop"], cfg["mean"], cfg["std"])
    got = ort.InferenceSession(str(tmp_path / "dino" / "model.onnx")).run(None, {"pixel_values": x})[0]
    with torch.no_grad():
        want = Dinov2Model.from_pretrained(tiny_metric_sources / "dinov2")(
            pixel_values=torch.from_numpy(x)).pooler_output.numpy()
    assert np.abs(got - want).max() < EMBED_ATOL


def test_scores_match_numpy_reference_formulas(tiny_metrics, photos):
    scorer = ev.DreamBoothScorer(tiny_metrics, provider="cpu")
    real, gen = _photos(photos, 3), [np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8) for i in range(2)]
    scorer.set_reference(real)
    got = scorer.score(gen, "a dog in the jungle")
    cos = lambda a, b: float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    gc, rc, gd, rd = scorer.embed_clip(gen), scorer.embed_clip(real), scorer.embed_dino(gen), scorer.embed_dino(real)
    t = scorer.embed_text(["a dog in the jungle"])[0]
    want = {"clip_i": np.mean([cos(g, r) for g in gc for r in rc]),
            "clip_t": np.mean([cos(g, t) for g in gc]),
            "dino": np.mean([cos(g, r) for g in gd for r in rd])}
    for k in want:
        assert abs(got[k] - want[k]) < METRIC_ATOL, k
    # a duplicated image scores the same as itself alone (a mean, not a sum)
    scorer.set_reference(gen)
    assert abs(scorer.score(gen[:1] * 2, "x")["dino"] - np.mean([cos(gd[0], r) for r in gd])) < METRIC_ATOL


def test_evaluate_end_to_end_and_reuse(tiny_exported, tiny_metrics, tmp_path, photos):
    dim = json.loads((tiny_exported / "manifest.json").read_text())["embedding_dim"]
    embeds = save_learned_embeds(tmp_path / "e.safetensors", "<sks>", np.ones((1, dim), np.float32) * 0.1)
    subject = tmp_path / "dog"
    shutil.copytree(photos, subject)
    cfg = ev.EvaluateConfig(per_prompt=2, num_prompts=2, steps=2, prompts_file=str(PROMPTS), provider="cpu")
    path = ev.evaluate(tiny_exported, embeds, subject, tiny_metrics, tmp_path / "out", cfg)
    res = json.loads(path.read_text())
    assert set(res["overall"]) == {"clip_i", "clip_t", "dino"} and res["num_images"] == 4
    assert [r["prompt"] for r in res["per_prompt"]] == ["a <sks> in the jungle", "a <sks> in the snow"]
    assert res["per_prompt"][0]["text"] == "a dog in the jungle" and res["kind"] == "live"
    for k in res["overall"]:
        assert abs(res["overall"][k] - np.mean([r[k] for r in res["per_prompt"]])) < 1e-9
        assert -1 <= res["overall"][k] <= 1
    assert (tmp_path / "out" / "contact_sheet.png").is_file()
    first = (tmp_path / "out" / "images" / "00_0.png").stat().st_mtime_ns
    again = json.loads(ev.evaluate(tiny_exported, embeds, subject, tiny_metrics, tmp_path / "out", cfg).read_text())
    assert (tmp_path / "out" / "images" / "00_0.png").stat().st_mtime_ns == first      # images reused
    assert again["overall"] == pytest.approx(res["overall"], abs=1e-6)
    from zoodip.cli import main
    r = CliRunner().invoke(main, ["evaluate", str(tiny_exported), "--embeds", str(embeds), "--subject", str(subject),
                                  "--metrics", str(tiny_metrics), "--out", str(tmp_path / "out"), "-k", "2",
                                  "--prompts", "2", "--steps", "2", "--prompts-file", str(PROMPTS), "--provider", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads(path.read_text())["overall"] == pytest.approx(res["overall"], abs=1e-6)
    r = CliRunner().invoke(main, ["evaluate", str(tiny_exported), "--embeds", str(embeds), "--subject", str(subject),
                                  "--metrics", str(tmp_path / "none"), "--out", str(tmp_path / "o2")])
    assert r.exit_code == 1 and "zoodip export-metrics" in r.output
    save_learned_embeds(embeds, "<sks>", np.ones((1, dim), np.float32) * -0.3)     # a new embedding, same file
    ev.evaluate(tiny_exported, embeds, subject, tiny_metrics, tmp_path / "out", cfg)
    assert (tmp_path / "out" / "images" / "00_0.png").stat().st_mtime_ns != first     # not reused: regenerated


class Brightness:
    """A stand-in plug-in metric: mean brightness of generated minus real images."""

    names = ("brightness",)

    def set_reference(self, real):
        self.ref = np.mean([r.mean() for r in real])

    def score(self, generated, text):
        return {"brightness": float(np.mean([g.mean() for g in generated]) - self.ref)}


def brightness_scorer(metrics_dir, provider, options):
    return Brightness()


def test_scorer_is_pluggable(tiny_exported, tmp_path, photos):
    dim = json.loads((tiny_exported / "manifest.json").read_text())["embedding_dim"]
    embeds = save_learned_embeds(tmp_path / "e.safetensors", "<t>", np.zeros((1, dim), np.float32))
    cfg = ev.EvaluateConfig(per_prompt=1, steps=1, provider="cpu")
    res = json.loads(ev.evaluate(tiny_exported, embeds, photos, None, tmp_path / "o", cfg, scorer=Brightness(),
                                 templates=["a {0} {1} on a red background"], class_word="star").read_text())
    assert list(res["overall"]) == ["brightness"] and res["per_prompt"][0]["text"] == "a star on a red background"
    # the same through the command: --scorer module:factory and --templates FILE
    from zoodip.cli import main
    (tmp_path / "t.txt").write_text("# toy prompts\na {0} {1} on a red background\n{0} on a blue background\n")
    r = CliRunner().invoke(main, ["evaluate", str(tiny_exported), "--embeds", str(embeds), "--subject", str(photos),
                                  "--scorer", "test_evaluate:brightness_scorer", "--templates", str(tmp_path / "t.txt"),
                                  "--class-word", "star", "--out", str(tmp_path / "c"), "-k", "1", "--steps", "1",
                                  "--provider", "cpu"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "c" / "results.json").read_text())
    assert [p["prompt"] for p in res["per_prompt"]] == ["a <t> on a red background", "<t> on a blue background"]
    r = CliRunner().invoke(main, ["evaluate", str(tiny_exported), "--embeds", str(embeds), "--subject", str(photos),
                                  "--scorer", "nope:x", "--out", str(tmp_path / "d")])
    assert r.exit_code == 1 and "cannot be loaded" in r.output


def test_export_metrics_cli_reuses_and_rejects_wrong_models(tiny_metrics, tiny_metric_sources):
    from zoodip.cli import main
    r = CliRunner().invoke(main, ["export-metrics", str(tiny_metrics), "--clip", str(tiny_metric_sources / "clip"),
                                  "--dino", str(tiny_metric_sources / "dino")])
    assert r.exit_code == 0 and "reusing" in r.output
    r = CliRunner().invoke(main, ["export-metrics", str(tiny_metrics.parent / "x"), "--clip",
                                  str(tiny_metric_sources / "dino")])
    assert r.exit_code == 1 and "needs a CLIPModel" in r.output and "Traceback" not in r.output
    assert not (tiny_metrics.parent / "x").exists()
