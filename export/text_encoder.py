"""The embedding-input CLIP text encoder: token embeddings in, last_hidden_state out.

Textual inversion optimizes rows of the token table, so the graph starts after the table lookup:
`table[input_ids]` fed to it reproduces CLIPTextModel(input_ids).last_hidden_state.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT, OUTPUT = "inputs_embeds", "last_hidden_state"


class EmbedsTextEncoder(nn.Module):
    """CLIPTextTransformer.forward minus the token lookup and the pooled output."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.tm = text_model  # transformers CLIPTextTransformer (CLIPTextModel.text_model)

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        B, L, _ = inputs_embeds.shape
        h = self.tm.embeddings(inputs_embeds=inputs_embeds)  # (B, L, d) + position embeddings
        # Causal mask as CLIP builds it: 0 on and below the diagonal, dtype-min above; (B, 1, L, L).
        mask = torch.full((L, L), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)
        mask = mask[None, None].expand(B, 1, L, L)
        out = self.tm.encoder(inputs_embeds=h, attention_mask=None, causal_attention_mask=mask)
        return self.tm.final_layer_norm(out[0])  # (B, L, d)


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
