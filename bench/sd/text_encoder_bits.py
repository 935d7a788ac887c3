"""Text encoder per weight format: batch-3 time and fidelity to fp32 (why the 256 px step misses 1.05x).

    python -m bench.sd.text_encoder_bits --export runs/sd15-onnx-sliced --w8 runs/sd15-sliced-w8c \
        --out bench/results/text_encoder_bits.json

Builds 4-bit MatMulNBits copies (fp32 compute) of the exported text encoder at block 16 and 32 under
--work, then times a batch-3 call (a step's n + 1 passes) of fp32, the quantized model's 8-bit and both
4-bit encoders in one process, and scores each against fp32: cosine of the hidden states, and cosine of
the finite difference TE(v + mu z) - TE(v) at the placeholder (what the ZO estimate sees).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .. import common

IDS = [49406, 320, 1125, 539, 320, 1929, 49407]     # "a photo of a dog", CLIP BPE; "dog" (slot 5) is perturbed
SLOT, MU, DIRECTIONS, REPEATS = 5, 1e-3, 8, 7


def build_4bit(src: Path, work: Path, block: int) -> Path:
    """The exported text encoder with 4-bit MatMuls (block `block`) and INT8 Conv/Gemm, as `zoodip quantize`."""
    import onnx

    from export import weight_only as wo
    from export.model_files import save_model

    dst = work / f"text_encoder_w4b{block}" / "model.onnx"
    if not dst.is_file():
        model = wo.nbits_matmul(onnx.load(str(src)), 4, block, 1)
        wo.int8_weight_only(model, ("Conv", "Gemm"))
        dst.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, dst)
    return dst


def measure(paths: dict[str, Path], table: np.ndarray) -> dict:
    """Median batch-3 seconds and fidelity to the first entry (fp32) of every encoder."""
    from zo_runtime.session import OnnxModel

    base = np.asarray(table[IDS + [IDS[-1]] * (77 - len(IDS))], np.float32)[None]    # (1, 77, d)
    z = np.random.default_rng(0).standard_normal((DIRECTIONS, base.shape[2])).astype(np.float32)
    outs, res = {}, {}
    for name, path in paths.items():
        sess = OnnxModel(path)
        batch = np.repeat(base, 3, axis=0)
        sess.run({"inputs_embeds": batch})                                           # warm-up
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            sess.run({"inputs_embeds": batch})
            times.append(time.perf_counter() - t0)
        h0 = sess.run({"inputs_embeds": base})[0].astype(np.float64)
        fds = []
        for zi in z:
            e = base.copy()
            e[0, SLOT] += MU * zi
            fds.append(sess.run({"inputs_embeds": e})[0].astype(np.float64) - h0)   # (1, 77, d)
        outs[name] = (h0, fds)
        weights = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file() and f.suffix != ".npy")
        res[name] = {"batch3_median_s": round(float(np.median(times)), 4), "weight_mb": round(weights / 2**20, 3)}
        del sess
    ref_h, ref_fd = next(iter(outs.values()))
    for name, (h, fds) in outs.items():
        res[name]["hidden_cosine"] = round(_cos(h, ref_h), 5)
        res[name]["finite_difference_cosine"] = round(float(np.mean([_cos(a, b) for a, b in zip(fds, ref_fd)])), 5)
    return res


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", type=Path, required=True, help="fp32 `zoodip export` folder")
    p.add_argument("--w8", type=Path, required=True, help="its `zoodip quantize --scheme w8` folder")
    p.add_argument("--work", type=Path, default=Path("runs/text_encoder_bits"), help="where the 4-bit copies go")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    src = a.export / "text_encoder" / "model.onnx"
    paths = {"fp32": src, "w8": a.w8 / "text_encoder" / "model.onnx",
             **{f"w4 block {b}": build_4bit(src, a.work, b) for b in (16, 32)}}
    table = np.load(a.export / "text_encoder" / "token_embeddings.npy", mmap_mode="r")
    res = {"encoders": measure(paths, table), "mu": MU, "directions": DIRECTIONS, "batch": 3,
           "gate_output_cosine_min": 0.98, "machine": common.machine_facts()}
    common.write_json(a.out, res)
    for name, r in res["encoders"].items():
        print(f"{name:12s} {r['batch3_median_s']:.3f} s  {r['weight_mb']:7.1f} MB  cos {r['hidden_cosine']:.4f}  "
              f"fd cos {r['finite_difference_cosine']:.4f}")


if __name__ == "__main__":
    main()
