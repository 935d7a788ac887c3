"""Learned-token files: diffusers `{token: (k, d)}` and A1111 safetensors; never unpickles."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .io_utils import atomic_write


def vector_names(token: str, k: int) -> list[str]:
    """Tokens for a k-vector placeholder, named like diffusers: sks, sks_1, ..., sks_{k-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, k)]


def save_learned_embeds(path: str | Path, token: str, vectors: np.ndarray) -> Path:
    """Write diffusers' format {token: float32 (k, d)} atomically (A1111 reads it too)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or not np.isfinite(vectors).all():
        raise ValueError(f"learned vectors for {token!r} must be a finite (k, d) array, got shape {vectors.shape}")
    return atomic_write(path, lambda p: save_file({token: np.ascontiguousarray(vectors)}, str(p),
                                                  metadata={"format": "diffusers-textual-inversion"}))


def load_learned_embeds(path: str | Path, dim: int | None = None, token: str | None = None) -> tuple[str, np.ndarray]:
    """(token, float32 (k, d)) from a diffusers or A1111 safetensors file; ValueError names the fix."""
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
    vec = np.asarray(vec, dtype=np.float32)
    vec = vec[None] if vec.ndim == 1 else vec
    if vec.ndim != 2:
        raise ValueError(f"{path}: embedding has shape {vec.shape}, expected (k, d)")
    if dim is not None and vec.shape[1] != dim:
        raise ValueError(f"{path}: embedding size {vec.shape[1]} does not match this model's {dim} "
                         "(SD 1.x uses 768, SD 2.x 1024): use an embedding trained for this model family")
    if not np.isfinite(vec).all():
        raise ValueError(f"{path}: embedding contains NaN or inf values; retrain or use an earlier checkpoint")
    return name, vec
