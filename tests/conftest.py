"""Shared session fixtures: tiny random SD pipelines (diffusers folders) and their zoodip ONNX exports.

Built once per test session from configs (no network): tiny = SD 1.x style (epsilon, pad <|endoftext|>),
tiny_v = SD 2.x style (gelu text encoder, linear projections, v-prediction, pad "!"); both use the real
CLIP BPE tokenizer in ../shared/tokenizers/clip-bpe-49408. Latents 16x16 (32 px images), d = 32.
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory):
    """Path of a tiny random SD 1.x diffusers folder (StableDiffusionPipeline.from_pretrained loads it)."""
    from export.replica import write_replica
    return write_replica("tiny", tmp_path_factory.mktemp("tiny") / "diffusers", seed=0)


@pytest.fixture(scope="session")
def tiny_exported(tiny_diffusers, tmp_path_factory):
    """Path of the zoodip ONNX export of tiny_diffusers (layout: zo_runtime/model_dir.py)."""
    from export.onnx_export import export_model
    return export_model(tiny_diffusers, tmp_path_factory.mktemp("tiny_onnx") / "model")


@pytest.fixture(scope="session")
def tiny_v_diffusers(tmp_path_factory):
    """Path of a tiny random SD 2.x-style (v-prediction, pad "!") diffusers folder."""
    from export.replica import write_replica
    return write_replica("tiny-v", tmp_path_factory.mktemp("tiny_v") / "diffusers", seed=1)


@pytest.fixture(scope="session")
def tiny_v_exported(tiny_v_diffusers, tmp_path_factory):
    """Path of the zoodip ONNX export of tiny_v_diffusers."""
    from export.onnx_export import export_model
    return export_model(tiny_v_diffusers, tmp_path_factory.mktemp("tiny_v_onnx") / "model")
