"""Export the evaluation models (CLIP image + text towers, DINO / DINOv2) to ONNX for torch-free metrics.

Layout of OUT (read by zo_runtime/evaluate.py):
    manifest.json        sources, versions, sha256 of every file
    clip/image.onnx      pixel_values f32 (B, 3, S, S) -> image_embeds (B, p), L2-normalized
    clip/text.onnx       input_ids int64 (B, 77) -> text_embeds (B, p), L2-normalized
    clip/tokenizer/      vocab.json, merges.txt (CLIP BPE; pad <|endoftext|>)
    clip/preprocess.json {"resize": S, "crop": S, "mean": [...], "std": [...]}
    dino/model.onnx      pixel_values f32 (B, 3, S, S) -> cls (B, h): the final-layer CLS token (after layernorm)
    dino/preprocess.json

torch.onnx (not Optimum's CLIP config): Optimum exports CLIP as one graph that needs images AND texts in every
call; the metrics embed photo sets and prompts separately, so each tower is its own small graph.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from zo_runtime.io_utils import atomic_write_json

from ._fs import swap_in

OPSET = 17                       # matches the SD export; LayerNormalization is native from 17
PARITY_ATOL = 1e-4               # max abs error vs torch on the export inputs; above it the export fails
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
FILES = ("clip/image.onnx", "clip/text.onnx", "clip/tokenizer/vocab.json", "clip/tokenizer/merges.txt",
         "clip/preprocess.json", "dino/model.onnx", "dino/preprocess.json")


class _ClipImage(torch.nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values):
        emb = self.clip.get_image_features(pixel_values=pixel_values)
        emb = getattr(emb, "pooler_output", emb)   # transformers versions differ in what they return
        return emb / emb.norm(dim=-1, keepdim=True)


class _ClipText(torch.nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids):
        emb = self.clip.get_text_features(input_ids=input_ids)
        emb = getattr(emb, "pooler_output", emb)
        return emb / emb.norm(dim=-1, keepdim=True)


class _Cls(torch.nn.Module):
    """DINO (ViTModel) and DINOv2 (Dinov2Model): the CLS token of the final, layer-normed hidden state."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


def _load(source: str, kind: str):
    """A CLIPModel or a DINO/DINOv2 backbone from a hub id or local folder; ValueError names the fix."""
    from transformers import AutoConfig, AutoModel, CLIPModel
    local = Path(source).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ValueError(f"{local} has no config.json: pass a transformers model folder or a hub id")
    try:
        config = AutoConfig.from_pretrained(str(local) if local.exists() else source)
    except OSError as err:
        raise ValueError(f"cannot load {source!r} ({err}); without network pass a local folder") from err
    path = str(local) if local.exists() else source
    if kind == "clip":
        if config.model_type != "clip":
            raise ValueError(f"{source} is a {config.model_type!r} model; --clip needs a CLIPModel (e.g. openai/clip-vit-base-patch32)")
        return CLIPModel.from_pretrained(path).eval(), path
    if config.model_type not in ("vit", "dinov2"):
        raise ValueError(f"{source} is a {config.model_type!r} model; --dino needs a DINO ViT (facebook/dino-vits16) "
                         "or DINOv2 (facebook/dinov2-base) model")
    return AutoModel.from_pretrained(path).eval(), path


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, in_name: str, out_name: str) -> None:
    """torch.onnx export with a dynamic batch axis, then a parity check on the example with onnxruntime."""
    import onnxruntime as ort
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module, (example,), str(path), input_names=[in_name], output_names=[out_name],
                          dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)
        want = module(example).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {in_name: example.numpy()})[0]
    err = float(np.abs(got - want).max())
    if err > PARITY_ATOL:
        raise RuntimeError(f"{path}: ONNX output differs from torch by {err:.2e} > {PARITY_ATOL}")


def export_clip(source: str, out: Path) -> None:
    """CLIP image and text towers + tokenizer + preprocessing into out/clip."""
    from transformers import CLIPTokenizer
    model, path = _load(source, "clip")
    size = int(model.config.vision_config.image_size)
    g = torch.Generator().manual_seed(0)
    _export(_ClipImage(model), torch.randn(2, 3, size, size, generator=g), out / "clip" / "image.onnx",
            "pixel_values", "image_embeds")
    ids = torch.randint(0, model.config.text_config.vocab_size - 1, (2, model.config.text_config.max_position_embeddings),
                        generator=g)
    _export(_ClipText(model), ids, out / "clip" / "text.onnx", "input_ids", "text_embeds")
    try:
        CLIPTokenizer.from_pretrained(path).save_pretrained(str(out / "clip" / "tokenizer"))
    except (OSError, TypeError, ValueError) as err:
        raise ValueError(f"{source}: no CLIP tokenizer files found ({err}); the folder needs vocab.json and merges.txt") from err
    atomic_write_json(out / "clip" / "preprocess.json", {"resize": size, "crop": size, "mean": CLIP_MEAN,
                                                         "std": CLIP_STD, "max_length": int(
                                                             model.config.text_config.max_position_embeddings)})


def export_dino(source: str, out: Path) -> None:
    """DINO / DINOv2 CLS-feature model + preprocessing into out/dino."""
    model, _ = _load(source, "dino")
    size = int(getattr(model.config, "image_size", 224))
    # DINOv2 checkpoints declare 518 (their position grid) but are evaluated at 224 like DINO: resize 256, crop 224.
    crop = 224 if model.config.model_type == "dinov2" and size == 518 else size
    resize = round(crop * 256 / 224)
    example = torch.randn(2, 3, crop, crop, generator=torch.Generator().manual_seed(1))
    _export(_Cls(model), example, out / "dino" / "model.onnx", "pixel_values", "cls")
    atomic_write_json(out / "dino" / "preprocess.json", {"resize": resize, "crop": crop, "mean": IMAGENET_MEAN,
                                                         "std": IMAGENET_STD, "model_type": model.config.model_type})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_metric_models(out: str | Path, clip: str = "openai/clip-vit-base-patch32",
                         dino: str = "facebook/dino-vits16", force: bool = False) -> Path:
    """Export CLIP and DINO to OUT (atomically: a temp folder renamed at the end); reuses a complete OUT."""
    out = Path(out).expanduser().resolve()
    if (out / "manifest.json").is_file() and all((out / f).is_file() for f in FILES) and not force:
        print(f"{out} already holds exported metric models; reusing them (pass --force to re-export)")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with torch.no_grad():          # a library call leaves the caller's grad mode as it was
            export_clip(clip, tmp)
            export_dino(dino, tmp)
        import onnx
        import transformers
        manifest = {"format": "zoodip-metrics/1", "clip": str(clip), "dino": str(dino), "opset": OPSET,
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "onnx": onnx.__version__},
                    "files": {f: _sha256(tmp / f) for f in FILES}}
        atomic_write_json(tmp / "manifest.json", manifest)
        os.chmod(tmp, 0o755)
        swap_in(tmp, out)   # an old OUT (--force) is removed only after the rename
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
