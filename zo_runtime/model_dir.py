"""The exported-model folder: fixed layout, manifest, and clear errors for wrong folders.

Layout (written by `zoodip export`, kept by `zoodip quantize`):
    manifest.json                 see MANIFEST_KEYS
    text_encoder/model.onnx       inputs_embeds f32 (B, 77, d) -> last_hidden_state (B, 77, d)
    text_encoder/token_embeddings.npy   (vocab, d) f32/f16, memory-mapped at run time
    unet/model.onnx               sample (B, C, h, w), timestep scalar, encoder_hidden_states (B, 77, d)
                                  -> out_sample (B, C, h, w); external data (model.onnx_data) if > 2 GB
    vae_encoder/model.onnx        sample (B, 3, H, W) in [-1, 1] -> latent_parameters (B, 2C, h, w) (mean, logvar)
    vae_decoder/model.onnx        latent_sample (B, C, h, w) -> sample (B, 3, H, W)
    tokenizer/                    vocab.json, merges.txt (+ files transformers writes)
    scheduler/scheduler_config.json
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
SUBMODELS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
# Keys every manifest carries (export writes them; quantize adds `scheme`, `gates`, `static_shapes`).
MANIFEST_KEYS = (
    "format", "family", "embedding_dim", "vocab_size", "max_length", "latent_channels",
    "vae_scale_factor", "scaling_factor", "prediction_type", "num_train_timesteps",
    "beta_schedule", "beta_start", "beta_end", "native_resolution", "pad_token", "opset",
    "scheme", "versions", "files",
)
FORMAT = "zoodip-onnx/1"


@dataclass(frozen=True)
class ModelDir:
    """A validated exported or quantized model folder."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> "ModelDir":
        root = Path(path)
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist: pass a folder written by `zoodip export` or `zoodip quantize`")
        mpath = root / MANIFEST
        if not mpath.is_file():
            hint = (" It looks like a diffusers folder: run `zoodip export " f"{root} OUT` first."
                    if (root / "model_index.json").is_file() else "")
            raise ValueError(f"{root} has no {MANIFEST}, so it is not a zoodip model folder.{hint}")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{mpath} is corrupt ({err}); re-run `zoodip export --force`") from err
        missing = [k for k in MANIFEST_KEYS if k not in manifest]
        if missing or manifest.get("format") != FORMAT:
            raise ValueError(f"{mpath} is not a {FORMAT} manifest (missing {missing}); re-export with this zoodip version")
        for sub in SUBMODELS:
            if not (root / sub / "model.onnx").is_file():
                raise ValueError(f"{root / sub / 'model.onnx'} is missing; re-run `zoodip export --force`")
        return cls(root, manifest)

    def onnx(self, sub: str) -> Path:
        return self.root / sub / "model.onnx"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def static_shapes(self) -> dict | None:
        """{'batch': int, 'height': px, 'width': px} for static-shape (NPU) models, else None."""
        return self.manifest.get("static_shapes")

    def token_table(self) -> np.ndarray:
        """(vocab, d) token embeddings, memory-mapped (never copied)."""
        return np.load(self.root / "text_encoder" / "token_embeddings.npy", mmap_mode="r")

    def train_mu(self, default: float) -> float:
        """The mu to train at when the user sets none: the manifest's train_defaults (w8-fast), else `default`."""
        return float(self.manifest.get("train_defaults", {}).get("mu", default))

    def mu_warning(self, mu: float) -> str | None:
        """Why training at `mu` is outside what this model's quantization validated (None: inside, or unknown).

        Rounding noise in the finite differences shrinks as mu grows, so a mu at or above the smallest validated
        one is covered; folders quantized before `zo_validated_mus` existed say nothing.
        """
        validated = self.manifest.get("zo_validated_mus")
        if validated is None:
            return None
        scheme = self.manifest.get("scheme")
        if not validated:
            return (f"{self.root} ({scheme}) passed its ZO gate at no mu: its finite differences may be rounding "
                    "noise. Re-quantize with --scheme w8")
        if mu >= min(validated) * (1 - 1e-9):
            return None
        corr = self.manifest.get("gates", {}).get("zo", {}).get(f"{mu:g}", {}).get("corr")
        seen = f" (ZO correlation {corr:.2f} there)" if corr is not None else ""
        return (f"--mu {mu:g} is below the smallest mu {self.root} ({scheme}) was validated for, {min(validated):g}"
                f"{seen}: its int8 rounding may drown the finite differences. Pass --mu {min(validated):g} "
                "(or leave --mu unset), or train on a --scheme w8 model")

    def alphas_cumprod(self) -> np.ndarray:
        """(T,) float64 cumulative alphas of the training noise schedule (SD: scaled_linear)."""
        m = self.manifest
        return alphas_cumprod(m["beta_schedule"], float(m["beta_start"]), float(m["beta_end"]),
                              int(m["num_train_timesteps"]))


def alphas_cumprod(schedule: str, beta_start: float, beta_end: float, T: int) -> np.ndarray:
    """(T,) float64 cumprod(1 - beta) for diffusers' scaled_linear or linear beta schedules."""
    if schedule == "scaled_linear":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    elif schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    else:
        raise ValueError(f"beta schedule {schedule!r} is not supported (scaled_linear, linear)")
    return np.cumprod(1.0 - betas)
