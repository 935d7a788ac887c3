"""Where the weights come from: a local diffusers folder, a hub id, or a single-file checkpoint; checked before any work."""
from __future__ import annotations

import json
import re
from pathlib import Path

SUPPORTED = ("SD 1.x (CLIP ViT-L/14 text encoder), SD 2.x (OpenCLIP-H text encoder, epsilon or v-prediction) and "
             "SDXL base (CLIP ViT-L + OpenCLIP bigG)")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
XL_COMPONENTS = COMPONENTS + ("text_encoder_2", "tokenizer_2")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Hub files an export needs: fp32 safetensors weights and configs; never pickles, flax, onnx, fp16 or non-EMA copies.
_HUB_ALLOW = ["model_index.json", *(f"{c}/*" for c in XL_COMPONENTS)]
_HUB_IGNORE = ["*.bin", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.pb", "*.fp16.*", "*non_ema*"]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is unreadable ({err}): the diffusers folder is damaged; re-download it") from err


def is_single_file(source: str | Path) -> bool:
    return str(source).endswith((".safetensors", ".ckpt", ".pt", ".bin"))


def resolve(source: str | Path) -> Path:
    """A local diffusers folder (downloading a hub id first); FileNotFoundError/ValueError naming the fix."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file, not a model: pass a diffusers folder, a .safetensors checkpoint or a hub id")
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return _download(text)
    raise FileNotFoundError(f"{path} does not exist: pass a diffusers folder (with unet/, vae/, text_encoder/), "
                            "a .safetensors checkpoint, or a Hugging Face hub id such as runwayml/stable-diffusion-v1-5")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_ALLOW, ignore_patterns=_HUB_IGNORE))
    except Exception as err:  # offline, unknown repo, gated repo: all end the same way for the user
        raise ValueError(f"{repo_id} is not a local folder and could not be fetched from the Hugging Face Hub "
                         f"({type(err).__name__}); check the id and the network, or pass a local diffusers folder") from err


def check_architecture(folder: Path) -> dict:
    """Refuse anything but SD 1.x/2.x/SDXL-base text-to-image; return the component configs.

    {unet, vae, text_encoder, scheduler, model_index} (+ text_encoder_2 for SDXL) and "family" (sd1, sd2, sdxl).
    """
    if (folder / "manifest.json").is_file():
        raise ValueError(f"{folder} is already a zoodip ONNX export: pass the diffusers folder it came from, "
                         "or use it directly with the other zoodip commands")
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    pipe_cls = index.get("_class_name", "")
    xl = "XL" in pipe_cls or "text_encoder_2" in index
    if xl and (pipe_cls != "StableDiffusionXLPipeline" or not index.get("text_encoder")):
        raise ValueError(f"{folder} is an SDXL {pipe_cls or 'variant'} without both text encoders (a refiner or "
                         f"img2img-only pipeline), which is not supported: zoodip exports {SUPPORTED}")
    if not (folder / "unet").is_dir():
        what = f" ({pipe_cls}, a transformer-based model)" if "transformer" in index else ""
        raise ValueError(f"{folder} has no unet/ folder{what}: pass a diffusers Stable Diffusion folder; "
                         f"zoodip exports {SUPPORTED}")
    for comp in XL_COMPONENTS if xl else COMPONENTS:
        if not (folder / comp).is_dir():
            kind = "StableDiffusionXLPipeline (SDXL)" if xl else "StableDiffusionPipeline"
            raise ValueError(f"{folder} has no {comp}/ folder: pass a complete diffusers {kind} folder; "
                             f"zoodip exports {SUPPORTED}")
    texts = ("text_encoder", "text_encoder_2") if xl else ("text_encoder",)
    cfg = {c: _read_json(folder / c / "config.json") for c in ("unet", "vae", *texts)}
    cfg["scheduler"] = _read_json(folder / "scheduler" / "scheduler_config.json")
    cfg["model_index"] = index
    reason = _xl_reason(cfg) if xl else _sd_reason(cfg)
    if reason:
        raise ValueError(f"{folder} is not a supported architecture ({reason}): zoodip exports {SUPPORTED}")
    cfg["family"] = "sdxl" if xl else family(cfg["text_encoder"])
    return cfg


def _unet_reason(unet: dict) -> str | None:
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        return f"its UNet is {unet.get('_class_name')}"
    if unet.get("in_channels") != 4 or unet.get("out_channels", 4) != 4:
        return f"its UNet has {unet.get('in_channels')} input channels (inpainting/depth/upscaler variants need 4)"
    if unet.get("class_embed_type") or unet.get("num_class_embeds"):
        return "its UNet is class-conditioned (e.g. the x4 upscaler)"
    return None


def _sd_reason(cfg: dict) -> str | None:
    unet, text = cfg["unet"], cfg["text_encoder"]
    if unet.get("addition_embed_type") == "text_time":
        return "its UNet takes SDXL text_time conditioning but the pipeline has one text encoder"
    if reason := _unet_reason(unet):
        return reason
    if "CLIPTextModel" not in (text.get("architectures") or ["CLIPTextModel"]):
        return f"its text encoder is {text.get('architectures')}, not a CLIP text model"
    if unet.get("cross_attention_dim") != text.get("hidden_size"):
        return "its UNet cross-attention width differs from the text encoder width"
    return None


def _xl_reason(cfg: dict) -> str | None:
    """SDXL base: text_time UNet fed by both encoders' hidden states and the second one's pooled projection."""
    unet, t1, t2 = cfg["unet"], cfg["text_encoder"], cfg["text_encoder_2"]
    if reason := _unet_reason(unet):
        return reason
    if unet.get("addition_embed_type") != "text_time":
        return f"its UNet's addition_embed_type is {unet.get('addition_embed_type')!r}, not SDXL's 'text_time'"
    if "CLIPTextModelWithProjection" not in (t2.get("architectures") or ["CLIPTextModelWithProjection"]):
        return f"its second text encoder is {t2.get('architectures')}, not CLIPTextModelWithProjection"
    if unet.get("cross_attention_dim") != t1.get("hidden_size", 0) + t2.get("hidden_size", 0):
        return "its UNet cross-attention width differs from the two text encoders' widths together"
    added = t2.get("projection_dim", 0) + 6 * unet.get("addition_time_embed_dim", 0)
    if unet.get("projection_class_embeddings_input_dim") != added:
        return ("its UNet's added-embedding width is not pooled + 6 time ids (an aesthetic-score refiner "
                "takes 5 time ids)")
    return None


def family(text_cfg: dict) -> str:
    """sd2 for OpenCLIP text encoders (gelu), sd1 for OpenAI CLIP (quick_gelu)."""
    return "sd2" if text_cfg.get("hidden_act") == "gelu" else "sd1"


def weight_bytes(folder: Path) -> dict[str, int]:
    """Bytes of weights per component (what the export will roughly write)."""
    sizes = {}
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if not (folder / comp).is_dir():
            continue
        files = [p for p in (folder / comp).iterdir() if p.suffix in (".safetensors", ".bin")]
        # A folder may hold fp32 and fp16 variants; the export writes fp32, so count the largest.
        sizes[comp] = max((p.stat().st_size for p in files), default=0)
    return sizes


def single_file_to_folder(checkpoint: Path, config: str | Path | None, dest: Path) -> Path:
    """Convert a single-file SD checkpoint to a diffusers folder at dest, resolving its config offline."""
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} does not exist: pass the path of a .safetensors checkpoint")
    if checkpoint.suffix != ".safetensors":
        raise ValueError(f"{checkpoint} is a pickle checkpoint, which zoodip refuses to load: "
                         "convert it to .safetensors or pass a diffusers folder")
    import torch
    from diffusers import StableDiffusionPipeline
    kwargs = {"config": str(config)} if config else {}
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(checkpoint), torch_dtype=torch.float32,
                                                        local_files_only=True, **kwargs)
    except Exception as err:  # diffusers raises several types when the config cannot be resolved offline
        raise ValueError(f"could not load {checkpoint} as an SD 1.x/2.x checkpoint offline ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''}); pass --config with a local diffusers "
                         "folder of the same architecture (e.g. one written by `zoodip replica`), or export a "
                         "diffusers folder instead") from err
    pipe.save_pretrained(dest, safe_serialization=True)
    del pipe
    return dest
