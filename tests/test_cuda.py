"""onnxruntime's CUDA execution provider (onnxruntime-gpu): the tiny model's UNet, IOBinding and training steps
match the CPU provider. Skipped where no CUDA provider is installed (this project's CI machine has no GPU);
the bench's refusal and its nvidia-smi parsing are checked everywhere."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from bench.sd import cuda_pass
from zo_runtime import train as T
from zo_runtime.model_dir import ModelDir
from zo_runtime.session import OnnxModel

needs_cuda = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="no CUDAExecutionProvider: onnxruntime-gpu and an NVIDIA GPU are needed")
# cuDNN / cuBLAS sum in other orders and may use TF32 on Ampere+ (10-bit mantissa): relative errors of ~1e-3
# on a UNet output are expected there; 1e-2 separates that from a wrong graph (which is off by O(1)).
OUTPUT_MAX_REL_ERR = 1e-2
LOSS_REL_DIFF_MAX = 1e-2


def test_parse_mib_reads_nvidia_smi():
    assert cuda_pass.parse_mib("12345\n") == 12345.0
    assert cuda_pass.parse_mib("[N/A]\n") is None
    assert cuda_pass.parse_mib("") is None


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is installed here")
def test_bench_refuses_in_one_line_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="install onnxruntime-gpu"):
        cuda_pass.main([str(tmp_path), "--out", str(tmp_path / "r.json"), "--train-steps", "0"])


@needs_cuda
def test_unet_on_cuda_matches_cpu(tiny_exported):
    path = ModelDir.open(tiny_exported).onnx("unet")
    cpu, gpu = OnnxModel(path, "cpu"), OnnxModel(path, "cuda")
    assert gpu.provider == "CUDAExecutionProvider"
    from bench.sd.fast_pass import unet_feeds
    feeds = unet_feeds(cpu, resolution=64)
    a, b = cpu.run(feeds)[0], gpu.run(feeds)[0]
    assert np.max(np.abs(a - b)) / np.max(np.abs(a)) < OUTPUT_MAX_REL_ERR


@pytest.mark.parametrize("provider", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_iobinding_pass_equals_session_run(tiny_exported, provider):
    res = cuda_pass.time_cuda_pass(str(tiny_exported), resolution=64, repeats=2, provider=provider)
    assert res["provider"] == {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[provider]
    assert res["run_vs_iobinding_max_abs"] < 1e-5
    assert res["run_s"]["median"] > 0 and res["iobinding_s"]["median"] > 0


@needs_cuda
def test_training_steps_on_cuda_match_cpu(tiny_exported, photos, tmp_path):
    losses = {}
    for provider in ("cpu", "cuda"):
        cfg = T.TrainConfig(token="sks", init="dog", steps=3, tau=4, save_every=0, progress=False,
                            schedule="paper", provider=provider)
        T.train(tiny_exported, photos, tmp_path / provider, cfg)
        rows = [json.loads(line) for line in (tmp_path / provider / "log.jsonl").read_text().splitlines()]
        losses[provider] = np.array([r["loss"] for r in rows])
    # the first step's loss is the same draw on the same v: only kernel rounding differs
    assert abs(losses["cuda"][0] - losses["cpu"][0]) <= LOSS_REL_DIFF_MAX * abs(losses["cpu"][0])
    assert np.all(np.isfinite(losses["cuda"]))
