"""Memory-lean attention for export: the (B, H, T, T) score matrix is never whole in the ONNX graph.

diffusers' AttnProcessor computes all heads' scores at once; onnxruntime then materializes (B*H, T, T) fp32
scores and probabilities (SD 1.5 at 512 px: 8 x 4096 x 4096 = 0.5 GiB each, per batch row). This processor
loops over heads (and, for one-head attention such as the VAE's mid block, over query chunks), so ORT holds
one (B, T/k, T) slice at a time and frees it before the next.

Why not diffusers' SlicedAttnProcessor: it slices the (B*H) axis with a Python loop whose length is the traced
batch times heads, so a graph traced at batch 2 silently leaves rows of a batch-3 call at zero. Heads and query
chunks are batch-independent; chunk bounds are traced from the runtime token count, so any resolution works.
"""
from __future__ import annotations

import torch

QUERY_CHUNKS = 8    # one-head attention: 4096 queries -> 8 x 512, the same slice size as 8 heads


class HeadSlicedAttnProcessor:
    """Drop-in for diffusers' AttnProcessor (self- and cross-attention); numerically the same attention."""

    def __init__(self, query_chunks: int = QUERY_CHUNKS):
        self.query_chunks = query_chunks

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("HeadSlicedAttnProcessor does not take attention masks: export with attention='full'")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)  # (B, T, C)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states), out_dim=4)   # (B, H, T, d)
        k = attn.head_to_batch_dim(attn.to_k(context), out_dim=4)         # (B, H, S, d)
        v = attn.head_to_batch_dim(attn.to_v(context), out_dim=4)         # (B, H, S, d)
        heads = [self._one_head(attn, q[:, h], k[:, h], v[:, h]) for h in range(attn.heads)]
        out = torch.stack(heads, dim=1)                                   # (B, H, T, d)
        out = out.permute(0, 2, 1, 3).flatten(2)                          # (B, T, H*d)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _one_head(self, attn, q, k, v):
        """q (B, T, d), k and v (B, S, d) -> (B, T, d); one-head layers also split T into query chunks."""
        chunks = self.query_chunks if attn.heads == 1 else 1
        if chunks == 1:
            return _attend(attn, q, k, v)
        n = q.shape[1]   # traced as a graph value, so the bounds follow the runtime resolution
        bounds = [(n * i) // chunks for i in range(chunks + 1)]
        return torch.cat([_attend(attn, q[:, a:b], k, v) for a, b in zip(bounds[:-1], bounds[1:])], dim=1)


def _attend(attn, q, k, v):
    scores = torch.matmul(q.float() if attn.upcast_attention else q, k.transpose(-1, -2)) * attn.scale  # (B, T, S)
    probs = scores.float().softmax(dim=-1) if attn.upcast_softmax else scores.softmax(dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


def use_sliced_attention(model) -> int:
    """Sets HeadSlicedAttnProcessor on every Attention layer of a diffusers model; returns how many."""
    count = len(model.attn_processors)
    model.set_attn_processor(HeadSlicedAttnProcessor())
    return count
