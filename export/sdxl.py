"""SDXL parts of the export (layout: zo_runtime/model_dir.py): two embeds-input text encoders and a UNet with
SDXL's added conditioning, each loaded by streaming and exported with one copy of its weights.

Memory: each model is built on the meta device and filled by plain file reads (export/weights.py); Linear
weights are pre-transposed and external tensors streamed into model.onnx_data (export/large_onnx.py). So the
UNet export holds its 10.3 GB of fp32 weights once, not the ~2.2x that Optimum's path costs (SD 1.5: a 3.4 GB
UNet peaked at 7.4 GB). The VAE (84M parameters) goes through Optimum as for SD 1.x/2.x.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import large_onnx
from .weights import load_into

# SDXL's added time ids, in the order the pipeline concatenates them: original size + crop top-left + target size.
TIME_IDS = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
VAE_TRACE_PX = 256   # the VAE encoder is traced at 256 px, not its 1024 px sample_size (same graph, ~16x less memory)


class XLUNet(nn.Module):
    """UNet2DConditionModel with added_cond_kwargs flattened into graph inputs; returns out_sample."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}      # (B, p), (B, 6)
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


def load_clip(folder: Path, with_projection: bool) -> nn.Module:
    """CLIPTextModel(WithProjection) from a component folder, streamed (meta build + file reads)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    config = CLIPTextConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = cls(config)
    model = load_into(model, folder, ignore=("position_ids",))   # old checkpoints saved the position-id buffer
    emb = model.text_model.embeddings        # non-persistent buffer: rebuilt, not loaded
    emb.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)),
                        persistent=False)
    return model


def load_unet(folder: Path) -> nn.Module:
    from diffusers import UNet2DConditionModel
    config = UNet2DConditionModel.load_config(folder)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return load_into(unet, folder)


def export_text(folder: Path, dst: Path, cfg) -> dict:
    """text_encoder (CLIP ViT-L): inputs_embeds -> hidden_states[-2]."""
    from .text_encoder import export_penultimate_encoder
    model = load_clip(folder / "text_encoder", with_projection=False)
    export_penultimate_encoder(model, dst / "text_encoder", cfg.opset)
    return {"vocab_size": int(model.config.vocab_size), "embedding_dim": int(model.config.hidden_size)}


def export_text_2(folder: Path, dst: Path, cfg) -> dict:
    """text_encoder_2 (OpenCLIP bigG): inputs_embeds, pool_index -> hidden_states[-2], text_embeds."""
    from .text_encoder import export_penultimate_encoder
    model = load_clip(folder / "text_encoder_2", with_projection=True)
    export_penultimate_encoder(model, dst / "text_encoder_2", cfg.opset)
    c = model.config
    # transformers' pooling rule (CLIPTextTransformer.forward): eos_token_id 2 marks pre-#24773 configs,
    # which pool at argmax(ids); SDXL base ships such configs, so prompts with a learned token (ids above the
    # EOS) pool at that token, in diffusers and here alike.
    rule = "argmax" if c.eos_token_id == 2 else "first_eos"
    return {"vocab_size_2": int(c.vocab_size), "embedding_dim_2": int(c.hidden_size),
            "pooled_dim": int(c.projection_dim), "pool_rule": rule, "eos_token_id_2": int(c.eos_token_id)}


def export_unet(folder: Path, dst: Path, cfg) -> None:
    """unet: sample, timestep, encoder_hidden_states (B, 77, d1 + d2), text_embeds (B, p), time_ids (B, 6)."""
    from .attention import use_sliced_attention
    unet = load_unet(folder / "unet")
    if cfg.attention == "sliced":
        use_sliced_attention(unet)
    large_onnx.pretranspose_linears(unet)
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - len(TIME_IDS) * c.addition_time_embed_dim
    side = 4 * 2 ** (len(c.block_out_channels) - 1)       # small latents: tracing cost, not export size
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, c.in_channels, side, side, generator=g), torch.tensor(500.0),
            torch.randn(2, 77, c.cross_attention_dim, generator=g), torch.randn(2, pooled, generator=g),
            torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2))
    axes = {"sample": {0: "batch_size", 2: "height", 3: "width"},
            "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
            "text_embeds": {0: "batch_size"}, "time_ids": {0: "batch_size"},
            "out_sample": {0: "batch_size", 2: "height", 3: "width"}}
    large_onnx.export(XLUNet(unet).eval(), args, dst / "unet" / "model.onnx", list(UNET_INPUTS), ["out_sample"],
                      axes, cfg.opset)


def copy_tokenizers(folder: Path, dst: Path, cfg) -> dict:
    """tokenizer/ (pad <|endoftext|>) and tokenizer_2/ (pad "!"): the same CLIP BPE, different padding."""
    from transformers import CLIPTokenizer
    facts = {}
    for sub, key in (("tokenizer", "pad_token"), ("tokenizer_2", "pad_token_2")):
        tok = CLIPTokenizer.from_pretrained(folder / sub)
        tok.save_pretrained(dst / sub)
        facts[key] = str(tok.pad_token)
        facts["tokenizer_max_length"] = min(facts.get("tokenizer_max_length", 10 ** 9), int(tok.model_max_length))
    return facts


def model_facts(configs: dict) -> dict:
    """Manifest keys only SDXL has (the rest come from onnx_export._model_facts)."""
    unet, vae, index = configs["unet"], configs["vae"], configs["model_index"]
    return {"family": "sdxl", "addition_time_embed_dim": int(unet["addition_time_embed_dim"]),
            "time_ids": list(TIME_IDS), "cross_attention_dim": int(unet["cross_attention_dim"]),
            "force_upcast": bool(vae.get("force_upcast", True)),
            "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}
