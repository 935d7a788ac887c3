"""Learned-token files: diffusers `{token: (k, d)}`, A1111 safetensors and A1111's SDXL `{clip_l, clip_g}`;
never unpickles.

SDXL files hold one tensor per text encoder: clip_l (k, 768) for CLIP ViT-L, clip_g (k, 1280) for OpenCLIP
bigG. In memory they are one (k, d1 + d2) array, [clip_l | clip_g] (zo_runtime.text.SdxlTextEncoder). diffusers
loads each half into its encoder:
    state = safetensors.torch.load_file(path)
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from .io_utils import atomic_write


def vector_names(token: str, k: int) -> list[str]:
    """Tokens for a k-vector placeholder, named like diffusers: sks, sks_1, ..., sks_{k-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, k)]


XL_KEYS = ("clip_l", "clip_g")   # A1111's SDXL embedding keys: first (ViT-L) and second (bigG) text encoder


def save_learned_embeds(path: str | Path, token: str, vectors: np.ndarray, split: tuple[int, int] | None = None) -> Path:
    """Write diffusers' format {token: float32 (k, d)} atomically (A1111 reads it too).

    split (d1, d2): an SDXL token (k, d1 + d2) = [clip_l | clip_g], written as A1111's SDXL format
    {clip_l: (k, d1), clip_g: (k, d2)} with the token name in the file's metadata.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or not np.isfinite(vectors).all():
        raise ValueError(f"learned vectors for {token!r} must be a finite (k, d) array, got shape {vectors.shape}")
    if split is None:
        tensors, meta = {token: np.ascontiguousarray(vectors)}, {"format": "diffusers-textual-inversion"}
    else:
        if sum(split) != vectors.shape[1]:
            raise ValueError(f"SDXL vectors must be (k, {split[0]} + {split[1]}), got {vectors.shape}")
        tensors = {XL_KEYS[0]: np.ascontiguousarray(vectors[:, :split[0]]),
                   XL_KEYS[1]: np.ascontiguousarray(vectors[:, split[0]:])}
        meta = {"format": "sdxl-textual-inversion", "token": token}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_learned_embeds(path: str | Path, dim: int | None = None, token: str | None = None,
                        split: tuple[int, int] | None = None) -> tuple[str, np.ndarray]:
    """(token, float32 (k, d)) from a diffusers or A1111 safetensors file; ValueError names the fix.

    split (d1, d2): the model is SDXL; the file must hold clip_l (k, d1) and clip_g (k, d2), returned as one
    (k, d1 + d2) array. Without split, an SDXL file is refused (it does not fit a one-encoder model).
    """
    path = Path(path)
    if path.suffix in (".pt", ".bin", ".ckpt", ".pth"):
        raise ValueError(f"{path}: pickled files are never loaded (they can run code). Convert it once with torch: "
                         "`python -c \"import torch,safetensors.torch as s; d=torch.load('IN',weights_only=True); "
                         "s.save_file({k: v.float().contiguous() for k, v in d.items()}, 'OUT.safetensors')\"` "
                         "(for A1111 files save d['string_to_param']['*'] under its token name)")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
    if set(XL_KEYS) <= set(data) or split is not None:
        return _load_xl(path, data, split, token)
    if "emb_params" in data:                      # A1111 safetensors
        name, vec = token or path.stem, data["emb_params"]
    elif any(k.startswith("string_to_param") for k in data):   # A1111 state dict flattened
        key = next(k for k in data if k.startswith("string_to_param"))
        name, vec = token or path.stem, data[key]
    elif len(data) == 1:                          # diffusers {token: (k, d) or (d,)}
        name, vec = next(iter(data.items()))
        name = token or name
    else:
        raise ValueError(f"{path}: unknown embedding layout with keys {sorted(data)[:5]}; expected one "
                         "{token: (k, d)} tensor (diffusers) or emb_params / string_to_param (A1111)")
    vec = _checked(path, vec, dim)
    return name, vec


def _checked(path: Path, vec, dim: int | None, what: str = "embedding") -> np.ndarray:
    """float32 (k, d) of the expected width, finite."""
    vec = np.asarray(vec, dtype=np.float32)
    vec = vec[None] if vec.ndim == 1 else vec
    if vec.ndim != 2:
        raise ValueError(f"{path}: {what} has shape {vec.shape}, expected (k, d)")
    if dim is not None and vec.shape[1] != dim:
        raise ValueError(f"{path}: {what} size {vec.shape[1]} does not match this model's {dim} "
                         "(SD 1.x uses 768, SD 2.x 1024, SDXL clip_l 768 + clip_g 1280): use an embedding "
                         "trained for this model family")
    if not np.isfinite(vec).all():
        raise ValueError(f"{path}: {what} contains NaN or inf values; retrain or use an earlier checkpoint")
    return vec


def _load_xl(path: Path, data: dict, split: tuple[int, int] | None, token: str | None) -> tuple[str, np.ndarray]:
    """An SDXL file {clip_l (k, d1), clip_g (k, d2)} -> (token, (k, d1 + d2)) for a model with widths split."""
    if split is None:
        raise ValueError(f"{path} is an SDXL embedding (clip_l and clip_g), but this model has one text encoder: "
                         "use an embedding trained for SD 1.x/2.x, or an SDXL model")
    if not set(XL_KEYS) <= set(data):
        raise ValueError(f"{path}: this SDXL model needs an embedding with clip_l ({split[0]}) and clip_g "
                         f"({split[1]}) tensors (A1111's SDXL format); the file has {sorted(data)[:5]}")
    parts = [_checked(path, data[k], d, k) for k, d in zip(XL_KEYS, split)]
    if len(parts[0]) != len(parts[1]):
        raise ValueError(f"{path}: clip_l has {len(parts[0])} vectors and clip_g {len(parts[1])}; they must match")
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
    return token or meta.get("token") or path.stem, np.concatenate(parts, axis=1)
