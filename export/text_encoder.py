"""The embedding-input CLIP text encoder: token embeddings in, last_hidden_state out.

Textual inversion optimizes rows of the token table, so the graph starts after the table lookup:
`table[input_ids]` fed to it reproduces CLIPTextModel(input_ids).last_hidden_state.

SDXL conditions on hidden_states[-2] of both encoders (the penultimate layer's output, no final LayerNorm), and
on the second encoder's pooled projection. transformers pools at a position found from the ids (configs with
eos_token_id 2, SDXL's: argmax of the ids; newer configs: the first EOS); an embeds-input graph has no ids, so
the position is an input, `pool_index` (B,) int64, computed by the runtime (zo_runtime/text.py) with the rule
the manifest records. The graph then computes exactly transformers' pooled output, whichever rule applies.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT, OUTPUT = "inputs_embeds", "last_hidden_state"
POOL_INDEX, POOLED = "pool_index", "text_embeds"   # SDXL's second encoder: pooling position in, projection out


class EmbedsTextEncoder(nn.Module):
    """CLIPTextTransformer.forward minus the token lookup and the pooled output."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.tm = text_model  # transformers CLIPTextTransformer (CLIPTextModel.text_model)

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        h, mask = _embed(self.tm, inputs_embeds)
        out = self.tm.encoder(inputs_embeds=h, attention_mask=None, causal_attention_mask=mask)
        return self.tm.final_layer_norm(out[0])  # (B, L, d)


class PenultimateTextEncoder(nn.Module):
    """SDXL: hidden_states[-2] (B, L, d); with a projection also text_embeds (B, p) pooled at pool_index."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.tm = model.text_model
        self.proj = getattr(model, "text_projection", None)   # CLIPTextModelWithProjection only

    def forward(self, inputs_embeds: torch.Tensor, pool_index: torch.Tensor | None = None):
        h, mask = _embed(self.tm, inputs_embeds)
        layers = self.tm.encoder.layers
        for layer in layers[:-1]:
            h = layer(h, None, mask)[0]
        if self.proj is None:
            return h                                                      # (B, L, d)
        last = self.tm.final_layer_norm(layers[-1](h, None, mask)[0])     # (B, L, d): last_hidden_state
        idx = pool_index.view(-1, 1, 1).expand(-1, 1, last.shape[-1])     # (B, 1, d)
        return h, self.proj(last.gather(1, idx)[:, 0])                    # (B, L, d), (B, p); [:, 0]: no If node


def _embed(text_model: nn.Module, inputs_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position embeddings added (B, L, d), and CLIP's causal mask (B, 1, L, L): 0 on/below the diagonal, min above."""
    B, L, _ = inputs_embeds.shape
    h = text_model.embeddings(inputs_embeds=inputs_embeds)
    mask = torch.full((L, L), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)
    return h, mask[None, None].expand(B, 1, L, L)


def export_text_encoder(text_encoder, out_dir: Path, opset: int) -> Path:
    """Write out_dir/model.onnx (inputs_embeds -> last_hidden_state) and token_embeddings.npy (vocab, d) f32."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text_encoder = text_encoder.float().eval()
    # Eager attention traces to plain MatMul/Softmax, which every execution provider and quantizer handles.
    text_encoder.config._attn_implementation = "eager"
    table = text_encoder.get_input_embeddings().weight.detach().cpu().numpy().astype(np.float32)  # (V, d)
    np.save(out_dir / "token_embeddings.npy", table)
    cfg = text_encoder.config
    dummy = torch.from_numpy(table[np.arange(cfg.max_position_embeddings) % table.shape[0]][None].copy())  # (1, 77, d)
    wrapper = EmbedsTextEncoder(text_encoder.text_model).eval()
    path = out_dir / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(wrapper, (dummy,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch_size"}, OUTPUT: {0: "batch_size"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    return path


def export_penultimate_encoder(text_encoder, out_dir: Path, opset: int) -> Path:
    """SDXL encoder -> out_dir/model.onnx (+ model.onnx_data over 2 GB) and token_embeddings.npy (vocab, d) f32.

    Inputs inputs_embeds (B, 77, d) [, pool_index (B,) int64]; outputs last_hidden_state = hidden_states[-2]
    (B, 77, d) [, text_embeds (B, p)]. Exported with one copy of the weights (export/large_onnx.py).
    """
    from . import large_onnx
    out_dir.mkdir(parents=True, exist_ok=True)
    text_encoder.config._attn_implementation = "eager"
    table = text_encoder.get_input_embeddings().weight.detach().numpy().astype(np.float32)   # (V, d)
    np.save(out_dir / "token_embeddings.npy", table)
    wrapper = PenultimateTextEncoder(text_encoder).eval()
    L = text_encoder.config.max_position_embeddings
    dummy = torch.from_numpy(table[np.arange(L) % table.shape[0]][None].repeat(2, 0))   # (2, 77, d)
    pooled = wrapper.proj is not None
    del table
    large_onnx.pretranspose_linears(wrapper)
    names = [INPUT] + ([POOL_INDEX] if pooled else [])
    outputs = [OUTPUT] + ([POOLED] if pooled else [])
    args = (dummy, torch.tensor([L - 1, 3])) if pooled else (dummy,)
    axes = {n: {0: "batch_size"} for n in names + outputs}
    return large_onnx.export(wrapper, args, out_dir / "model.onnx", names, outputs, axes, opset)
