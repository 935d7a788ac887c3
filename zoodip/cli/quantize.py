"""`zoodip quantize EXPORTED OUT --scheme ...`: a thin map from options to export.quantize.quantize_model."""
from __future__ import annotations

import click

from ._common import friendly_errors

SCHEMES = ("w8a8", "w8", "w4", "fp16", "w8-fast")  # export.quantize.SCHEMES (kept here so --help imports nothing)
TARGETS = ("cpu", "qnn", "openvino", "npu-static")


@click.command()
@click.argument("exported", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--scheme", type=click.Choice(SCHEMES), default="w8", show_default=True,
              help="w8a8: static INT8 weights+activations; w8: weight-only INT8; w4: 4-bit MatMul weights; fp16; "
                   "w8-fast: w8 with fused attention and int8 compute, 0.7-0.8x w8's pass time at 0.89x its toy-world "
                   "fidelity (docs/fast_pass.md); records the mu training must use.")
@click.option("--target", type=click.Choice(TARGETS), default="cpu", show_default=True,
              help="cpu: dynamic shapes; qnn: QDQ u16/u8 for Qualcomm NPUs; openvino / npu-static: fixed shapes.")
@click.option("--calib-images", type=click.Path(file_okay=False), default=None,
              help="Real photos for calibration and held-out gates (e.g. your training photos). "
                   "Default: $ZOODIP_CALIB_IMAGES or ~/.cache/zoodip/calibration-images.")
@click.option("--calib-samples", type=int, default=16, show_default=True, help="UNet calibration samples (w8a8).")
@click.option("--resolution", type=int, default=None, help="Pixels for calibration, gates and static shapes "
              "(default: the model's native resolution).")
@click.option("--static-batch", type=int, default=1, show_default=True, help="Batch of static-shape targets.")
@click.option("--gate-resolution", type=int, default=None, help="Pixels of the held-out gate inputs (default: "
              "--resolution); lower it to make the gates of SD-size models affordable on a slow CPU.")
@click.option("--gate-samples", type=int, default=8, show_default=True, help="Held-out samples per output gate.")
@click.option("--zo-directions", type=int, default=32, show_default=True, help="Random directions of the ZO gate.")
@click.option("--chunk", type=int, default=None, help="Tensors per calibration pass (lower = less memory, slower).")
@click.option("--no-gate", is_flag=True, help="Keep the model even when a fidelity gate is missed.")
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
@click.option("--seed", type=int, default=0, show_default=True)
@friendly_errors
def quantize(exported, out, scheme, target, calib_images, calib_samples, resolution, static_batch, gate_resolution,
             gate_samples, zo_directions, chunk, no_gate, force, seed):
    """Quantize the exported model EXPORTED into OUT (same layout; fidelity gates in manifest.json)."""
    from export.quantize import QuantizeConfig, quantize_model

    config = QuantizeConfig(scheme=scheme, target=target, calib_images=calib_images, calib_samples=calib_samples,
                            resolution=resolution, static_batch=static_batch, chunk=chunk,
                            gate_resolution=gate_resolution, gate_samples=gate_samples,
                            zo_directions=zo_directions, gate=not no_gate, force=force, seed=seed)
    quantize_model(exported, out, config)
