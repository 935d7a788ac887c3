"""Activation memory of one SD 1.5 self-attention at 512 px in onnxruntime: plain vs head-sliced export.

    python -m bench.sd.attention_memory --out bench/results/attention_memory.json

The first UNet block attends over 64x64 = 4096 latent tokens with 8 heads; exported plainly, ORT
materializes (8, 4096, 4096) fp32 scores and probabilities (0.5 GiB each). diffusers' SlicedAttnProcessor
(one head at a time) exports a graph whose slices ORT frees one by one. Each variant runs in a fresh process.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .. import common

TOKENS, DIM, HEADS = 4096, 320, 8      # SD 1.5 down_blocks.0 self-attention at 512 px


def export(folder: Path) -> dict[str, Path]:
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor, SlicedAttnProcessor

    out = {}
    for name, proc in (("plain", AttnProcessor()), ("sliced", SlicedAttnProcessor(1))):
        attn = Attention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS).eval()
        attn.set_processor(proc)
        out[name] = folder / f"{name}.onnx"
        torch.onnx.export(attn, (torch.randn(1, TOKENS, DIM),), str(out[name]), input_names=["x"],
                          output_names=["y"], opset_version=17, dynamo=False)
    return out


def measure(path: Path) -> dict:
    """RSS added by one forward (VmHWM reset after loading, so set-up does not hide it)."""
    import numpy as np
    from zo_runtime.session import OnnxModel

    model = OnnxModel(path)
    Path("/proc/self/clear_refs").write_text("5")        # Linux: reset VmHWM to the current RSS
    base = common.peak_rss_bytes()
    model.run({"x": np.random.default_rng(0).standard_normal((1, TOKENS, DIM), dtype=np.float32)})
    return {"rss_before_gb": common.gib(base), "added_by_forward_gb": common.gib(common.peak_rss_bytes() - base)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.measure:
        common.write_json(a.result, measure(Path(a.measure)))
        return
    if not a.out:
        p.error("--out is required")
    with tempfile.TemporaryDirectory() as tmp:
        models = export(Path(tmp))
        res = {name: common.run_isolated("bench.sd.attention_memory", ["--measure", str(m)]) for name, m in models.items()}
    res = {"shape": {"tokens": TOKENS, "dim": DIM, "heads": HEADS}, "variants": res, "machine": common.machine_facts()}
    print(f"wrote {common.write_json(a.out, res)}")
    for name, r in res["variants"].items():
        print(f"{name}: +{r['added_by_forward_gb']} GiB per forward", file=sys.stderr)


if __name__ == "__main__":
    main()
