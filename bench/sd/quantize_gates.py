"""The three quantization gates for every scheme on one exported model, as JSON and a README table.

    python -m bench.sd.quantize_gates MODEL --calib-images DIR --out bench/results/quantize_gates_tiny.json

Each scheme is quantized with `--no-gate` (so a missed gate is measured, not fatal) into --work, with the
default calibration and gate settings of `zoodip quantize`; existing quantizations are reused.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from export.quantize import SCHEMES, QuantizeConfig, quantize_model
from zo_runtime.io_utils import atomic_write_json
from zo_runtime.model_dir import ModelDir

from .. import common


def measure(model: Path, calib: Path, work: Path, schemes=SCHEMES, target: str = "cpu") -> dict:
    """{scheme: manifest gates} for each scheme."""
    out = {}
    for scheme in schemes:
        cfg = QuantizeConfig(scheme=scheme, target=target, calib_images=str(calib), gate=False)
        q = quantize_model(model, work / f"{model.name}-{scheme}-{target}", cfg)
        out[scheme] = ModelDir.open(q).manifest["gates"]
    return out


def table(gates: dict) -> str:
    """Markdown: one row per scheme, the numbers each gate is judged on."""
    rows = ["| scheme | TE cos / PSNR | UNet cos / PSNR | VAE dec cos (kept) | cond cos (min) | ZO corr mu=1e-3 | "
            "ZO corr mu=1e-2 | gates |", "|---|---|---|---|---|---|---|---|"]
    for scheme, g in gates.items():
        te, un, vd, zo = g["text_encoder"], g["unet"], g["vae_decoder"], g["zo"]
        kept = "quantized" if vd.get("quantized") else "kept float"
        rows.append(f"| {scheme} | {te['cosine']:.4f} / {te['psnr_db']:.1f} dB | {un['cosine']:.4f} / "
                    f"{un['psnr_db']:.1f} dB | {vd['cosine']:.4f} ({kept}) | {un['cond_cosine']:.3f} "
                    f"({un['cond_cosine_min']:.3f}) | {zo['0.001']['corr']:.3f} | {zo['0.01']['corr']:.3f} | "
                    f"{'pass' if g['passed'] else 'FAIL'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--calib-images", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("runs/quantize_gates"))
    p.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    gates = measure(a.model, a.calib_images, a.work, a.schemes)
    result = {"model": str(a.model), "calib_images": str(a.calib_images), "gates": gates,
              "table": table(gates), "machine": common.machine_facts()}
    atomic_write_json(a.out, result)
    print(result["table"])
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
