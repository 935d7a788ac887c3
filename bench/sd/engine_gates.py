"""Gates 2 and 3 of a model folder run by another engine: conditioning cosine and ZO correlation vs fp32.

    .venv-openvino/bin/python -m bench.sd.engine_gates runs/toy-onnx runs/toy-onnx --config ov-bf16 \\
        --calib-images TOY_PHOTOS --out bench/results/engine_gates.json --merge

The reference is always the fp32 export on onnxruntime's CPU provider; the candidate folder (fp32, w8, ...)
runs under a bench.sd.fast_pass engine configuration (e.g. OpenVINO with bf16 inference precision), on the
held-out inputs and directions `zoodip quantize` uses for its gates, at every mu of bench.sd.int8_groups.MUS.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import common
from .fast_pass import CONFIGS
from .int8_groups import MUS


def provider(config: dict) -> tuple:
    """(provider, options) of an engine configuration; thread and spinning settings do not change numbers."""
    if config.get("ov"):
        return "openvino", {"device_type": "CPU", "load_config": json.dumps({"CPU": config["ov"]})}
    return "cpu", None


def measure(src_dir: Path, cand_dir: Path, config: str, calib: Path, mus=MUS, directions: int = 32) -> dict:
    from export import calibration as cal
    from export import gates as gt
    from export.quantize import QuantizeConfig, _zo_gate
    from zo_runtime.model_dir import ModelDir

    src, cand = ModelDir.open(src_dir), ModelDir.open(cand_dir)
    cfg = QuantizeConfig(calib_images=str(calib), zo_mus=tuple(mus), zo_directions=directions)
    res = cfg.gate_resolution or cfg.resolution or int(src.manifest["native_resolution"])
    held = cal.real_inputs(src, cal.list_images(calib), res, cfg.gate_samples, True, None, cfg.seed)
    alphas = src.alphas_cumprod()
    prov = provider(CONFIGS[config])
    out = gt.conditioning_fidelity(src.onnx("unet"), cand.onnx("unet"), held, alphas, cfg.gate_samples,
                                   cfg.seed + 2, None, prov)
    out["zo"] = _zo_gate(src, cand.root, held, alphas, cfg, None, prov)
    return {"candidate": str(cand_dir), "scheme": cand.manifest.get("scheme"), "config": config,
            "settings": CONFIGS[config], **out}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reference", type=Path, help="fp32 zoodip export")
    p.add_argument("candidate", type=Path, help="model folder to gate (the export itself, w8, w8-fast, ...)")
    p.add_argument("--config", required=True, choices=list(CONFIGS))
    p.add_argument("--calib-images", type=Path, required=True)
    p.add_argument("--directions", type=int, default=32)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--merge", action="store_true")
    a = p.parse_args(argv)
    row = measure(a.reference, a.candidate, a.config, a.calib_images, MUS, a.directions)
    result = json.loads(a.out.read_text()) if a.merge and a.out.is_file() else {"rows": {}}
    result["rows"][f"{row['scheme']} {a.config}"] = row
    result.setdefault("commands", []).append("python -m bench.sd.engine_gates " + " ".join(sys.argv[1:] if argv is None else argv))
    result["machine"] = common.machine_facts()
    common.write_json(a.out, result)
    zo = ", ".join(f"{mu}: {z['corr']:.3f}" for mu, z in row["zo"].items())
    print(f"{row['scheme']} {a.config}: cond cos {row['cond_cosine']:.3f} ({row['cond_cosine_min']:.3f}); ZO corr {zo}")


if __name__ == "__main__":
    main()
