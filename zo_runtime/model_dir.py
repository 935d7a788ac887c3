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

SDXL (manifest family "sdxl") adds a second text encoder and changes what the first one returns:
    text_encoder/model.onnx       inputs_embeds (B, 77, d1) -> last_hidden_state (B, 77, d1): hidden_states[-2],
                                  the penultimate layer's output (no final LayerNorm), which SDXL conditions on
    text_encoder_2/model.onnx     inputs_embeds (B, 77, d2), pool_index (B,) int64 -> last_hidden_state
                                  (B, 77, d2) = hidden_states[-2], text_embeds (B, p) = the projection of the
                                  final-LayerNorm state at pool_index; external data (model.onnx_data) if > 2 GB
    text_encoder_2/token_embeddings.npy   (vocab, d2)
    tokenizer_2/                  the same CLIP BPE, padded with manifest pad_token_2 ("!")
    unet/model.onnx               + text_embeds (B, p), time_ids (B, 6) f32 (manifest time_ids names them);
                                  encoder_hidden_states (B, 77, d1 + d2) = both last_hidden_states concatenated
pool_index: the position transformers pools at. manifest pool_rule "argmax": argmax of the token ids (configs
with eos_token_id 2, SDXL base's: the EOS, or a learned token whose id is above it); "first_eos": the first EOS.
zo_runtime.text.pool_index computes it. The UNet's pooled input is encoder 2's text_embeds; an empty negative
prompt is all-zero conditioning when force_zeros_for_empty_prompt (SDXL base: true).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
SUBMODELS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")          # SD 1.x / 2.x
XL_SUBMODELS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
# Keys every manifest carries (export writes them; quantize adds `scheme`, `gates`, `static_shapes`).
MANIFEST_KEYS = (
    "format", "family", "embedding_dim", "vocab_size", "max_length", "latent_channels",
    "vae_scale_factor", "scaling_factor", "prediction_type", "num_train_timesteps",
    "beta_schedule", "beta_start", "beta_end", "native_resolution", "pad_token", "opset",
    "scheme", "versions", "files",
)
# Keys an SDXL manifest carries besides MANIFEST_KEYS.
XL_MANIFEST_KEYS = (
    "embedding_dim_2", "vocab_size_2", "pad_token_2", "pooled_dim", "pool_rule", "eos_token_id_2",
    "addition_time_embed_dim", "time_ids", "cross_attention_dim", "force_upcast", "force_zeros_for_empty_prompt",
)
POOL_RULES = ("argmax", "first_eos")
# Input names each graph must have (what zoodip feeds it); OnnxModel(expect=...) refuses a graph without them.
INPUTS = {"text_encoder": ("inputs_embeds",), "text_encoder_2": ("inputs_embeds", "pool_index"),
          "unet": ("sample", "timestep", "encoder_hidden_states"), "vae_encoder": ("sample",),
          "vae_decoder": ("latent_sample",)}
# Manifest numbers zoodip does arithmetic with, and the ranges in which that arithmetic means something.
RANGES = {"embedding_dim": (1, 8192), "vocab_size": (1, 10_000_000), "max_length": (2, 1024), "latent_channels": (1, 64),
          "vae_scale_factor": (1, 64), "num_train_timesteps": (100, 100_000), "native_resolution": (8, 8192),
          "scaling_factor": (1e-6, 1e3), "beta_start": (1e-8, 0.5), "beta_end": (1e-8, 0.999)}


def _check_values(mpath: Path, manifest: dict) -> None:
    """ValueError naming the key when a manifest number is out of the range zoodip's arithmetic needs."""
    for key, (lo, hi) in RANGES.items():
        value = manifest.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
        if not ok:
            raise ValueError(f"{mpath}: {key} is {value!r}, outside [{lo:g}, {hi:g}]: the manifest is damaged or was "
                             "edited; re-run `zoodip export --force`")
    if manifest["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ValueError(f"{mpath}: prediction_type {manifest['prediction_type']!r} is not epsilon or v_prediction; "
                         "re-run `zoodip export --force`")
    if manifest["native_resolution"] % (manifest["vae_scale_factor"] * 8):
        raise ValueError(f"{mpath}: native_resolution {manifest['native_resolution']} is not a multiple of "
                         f"8 x vae_scale_factor {manifest['vae_scale_factor']}; re-run `zoodip export --force`")
FORMAT = "zoodip-onnx/1"


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """{relative posix path: sha256} of every file under root except the manifest itself."""
    return {p.relative_to(root).as_posix(): sha256(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def verify_files(root: Path, manifest: dict) -> list[str]:
    """Relative paths whose sha256 no longer matches the manifest (or that are missing)."""
    bad = []
    for rel, digest in manifest.get("files", {}).items():
        p = root / rel
        if not p.is_file() or sha256(p) != digest:
            bad.append(rel)
    return bad


def submodels_for(family: str) -> tuple[str, ...]:
    """The ONNX graphs a model folder of this family holds (in export order)."""
    return XL_SUBMODELS if family == "sdxl" else SUBMODELS


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
        keys = MANIFEST_KEYS + (XL_MANIFEST_KEYS if manifest.get("family") == "sdxl" else ())
        missing = [k for k in keys if k not in manifest]
        if missing or manifest.get("format") != FORMAT:
            raise ValueError(f"{mpath} is not a {FORMAT} manifest (missing {missing}); re-export with this zoodip version")
        _check_values(mpath, manifest)
        if manifest.get("family") == "sdxl" and manifest["pool_rule"] not in POOL_RULES:
            raise ValueError(f"{mpath}: pool_rule {manifest['pool_rule']!r} is not one of {POOL_RULES}; "
                             "re-export with this zoodip version")
        for sub in submodels_for(manifest["family"]):
            if not (root / sub / "model.onnx").is_file():
                raise ValueError(f"{root / sub / 'model.onnx'} is missing; re-run `zoodip export --force`")
        return cls(root, manifest)

    def verify(self) -> None:
        """ValueError naming every file whose sha256 differs from the manifest's (damaged or replaced)."""
        bad = verify_files(self.root, self.manifest)
        if bad:
            raise ValueError(f"{self.root}: {', '.join(bad)} differ from what the manifest recorded (damaged, edited or "
                             "missing); export or quantize the model again")

    def onnx(self, sub: str) -> Path:
        return self.root / sub / "model.onnx"

    @property
    def family(self) -> str:
        return str(self.manifest["family"])

    @property
    def is_xl(self) -> bool:
        return self.family == "sdxl"

    @property
    def submodels(self) -> tuple[str, ...]:
        return submodels_for(self.family)

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """("text_encoder",), or ("text_encoder", "text_encoder_2") for SDXL."""
        return tuple(s for s in self.submodels if s.startswith("text_encoder"))

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    def tokenizer_of(self, sub: str = "text_encoder") -> tuple[Path, str]:
        """(tokenizer folder, pad token) of one text encoder."""
        second = sub == "text_encoder_2"
        return (self.root / ("tokenizer_2" if second else "tokenizer"),
                str(self.manifest["pad_token_2" if second else "pad_token"]))

    @property
    def dim(self) -> int:
        """Width of the (first) text encoder's token embeddings: 768 SD 1.x and SDXL's CLIP-L, 1024 SD 2.x."""
        return int(self.manifest["embedding_dim"])

    @property
    def dims(self) -> tuple[int, ...]:
        """Token-embedding width of each text encoder: (d,), or (d1, d2) for SDXL (768, 1280)."""
        m = self.manifest
        return (self.dim, int(m["embedding_dim_2"])) if self.is_xl else (self.dim,)

    @property
    def static_shapes(self) -> dict | None:
        """{'batch': int, 'height': px, 'width': px} for static-shape (NPU) models, else None."""
        return self.manifest.get("static_shapes")

    def token_table(self, sub: str = "text_encoder") -> np.ndarray:
        """(vocab, d) token embeddings of one text encoder, memory-mapped (never copied)."""
        path = self.root / sub / "token_embeddings.npy"
        try:
            table = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"{path} is damaged ({err}); re-run `zoodip export --force`") from None
        if table.ndim != 2 or table.dtype.kind != "f":
            raise ValueError(f"{path} holds a {table.dtype} array of shape {table.shape}, not the (vocab, d) token "
                             "table; re-run `zoodip export --force`")
        return table

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
