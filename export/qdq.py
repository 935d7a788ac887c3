"""QDQ graphs (w8a8: Optimum's ORTQuantizer; QNN: onnxruntime's QNN config) and fixed shapes for static targets."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx

from zo_runtime.model_dir import ModelDir

from .model_files import TWO_GB, weight_bytes


def qdq_optimum(src: Path, dst: Path, ranges) -> None:
    """Static QDQ, per-channel INT8 weights, UINT8 activations, with our ranges (Optimum's ORTQuantizer)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # ORTQuantizer looks for a transformers config; never online
    logging.getLogger("optimum.onnxruntime.quantization").setLevel(logging.ERROR)   # "could not load the config"
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    qconfig = AutoQuantizationConfig.avx512_vnni(is_static=True, per_channel=True)   # u8 activations, s8 weights
    quantizer = ORTQuantizer.from_pretrained(src.parent, file_name=src.name)
    quantizer.quantize(qconfig, dst.parent, file_suffix=None, calibration_tensors_range=ranges,
                       use_external_data_format=weight_bytes(src) > TWO_GB)
    (dst.parent / "ort_config.json").unlink(missing_ok=True)   # Optimum's record; the manifest has ours


def qdq_qnn(src: Path, dst: Path, calibrate) -> None:
    """QNN HTP: uint16 activations, uint8 weights, QNN's overrides; opset < 21 gets com.microsoft Q/DQ (QNN takes it).

    calibrate(op_types) -> TensorsData: ranges of the tensors of the op types QNN's config quantizes.
    """
    from onnxruntime.quantization import QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    qc = get_qnn_qdq_config(str(src), calibration_data_reader=None, activation_type=QuantType.QUInt16,
                            weight_type=QuantType.QUInt8)
    cache = dst.parent / "calibration.json"
    save_tensors_data(calibrate(qc.op_types_to_quantize), cache)
    try:
        quantize_static(str(src), str(dst), None, quant_format=qc.quant_format, op_types_to_quantize=qc.op_types_to_quantize,
                        per_channel=qc.per_channel, activation_type=qc.activation_type, weight_type=qc.weight_type,
                        nodes_to_exclude=qc.nodes_to_exclude, use_external_data_format=weight_bytes(src) > TWO_GB,
                        calibrate_method=qc.calibrate_method, extra_options=qc.extra_options,
                        calibration_cache_path=str(cache))
    finally:
        cache.unlink(missing_ok=True)


def static_input_shapes(sub: str, src: ModelDir, shapes: dict) -> dict[str, list[int]]:
    """Fixed input and output shapes of one submodel: batch, 77 tokens, fixed pixels and latents."""
    B, H, W = shapes["batch"], shapes["height"], shapes["width"]
    m = src.manifest
    f, C, d, T = (int(m[k]) for k in ("vae_scale_factor", "latent_channels", "embedding_dim", "max_length"))
    latent = [B, C, H // f, W // f]
    unet = {"sample": latent, "encoder_hidden_states": [B, T, sum(src.dims)], "out_sample": latent}
    te2 = {}
    if src.is_xl:   # the second encoder's width and pooled projection, the UNet's added conditioning
        d2, p = int(m["embedding_dim_2"]), int(m["pooled_dim"])
        te2 = {"inputs_embeds": [B, T, d2], "pool_index": [B], "last_hidden_state": [B, T, d2], "text_embeds": [B, p]}
        unet.update(text_embeds=[B, p], time_ids=[B, len(m["time_ids"])])
    return {"text_encoder": {"inputs_embeds": [B, T, d], "last_hidden_state": [B, T, d]}, "text_encoder_2": te2,
            "unet": unet,
            "vae_encoder": {"sample": [B, 3, H, W], "latent_parameters": [B, 2 * C, H // f, W // f]},
            "vae_decoder": {"latent_sample": latent, "sample": [B, 3, H, W]}}[sub]


def fix_static_shapes(path: Path, sub: str, src: ModelDir, shapes: dict) -> None:
    """Pin the dims of inputs/outputs in place (graph only; external weights stay where they are)."""
    from onnxruntime.tools.onnx_model_utils import make_input_shape_fixed

    model = onnx.load(str(path), load_external_data=False)
    fixed = static_input_shapes(sub, src, shapes)
    for vi in model.graph.input:
        if vi.name in fixed:
            make_input_shape_fixed(model.graph, vi.name, fixed[vi.name])
    for vi in model.graph.output:
        if vi.name in fixed:
            for dim, value in zip(vi.type.tensor_type.shape.dim, fixed[vi.name]):
                dim.Clear()
                dim.dim_value = value
    onnx.save(model, str(path))
