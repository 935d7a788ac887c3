"""Export a diffusers SD 1.x/2.x/SDXL model to zoodip's ONNX folder (layout: zo_runtime/model_dir.py).

SD 1.x/2.x: UNet and VAE go through Optimum's ONNX configs (the same graphs `optimum-cli export onnx` writes);
the text encoder is custom: token embeddings in, so textual inversion can feed learned rows without torch.
SDXL (export/sdxl.py): both text encoders embeds-in, the UNet with text_embeds/time_ids, weights streamed so
the 2.6B-parameter UNet is held once; the VAE as above.
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from zo_runtime.io_utils import atomic_write_json
from zo_runtime.model_dir import MANIFEST, ModelDir

from . import source as src
from ._fs import swap_in, umask_modes

GIB = 1 << 30
ATTENTION = ("sliced", "full")


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 17             # LayerNormalization is native from 17; ORT's quantizer and NPU EPs handle it
    force: bool = False         # re-export even if OUT already holds a complete export
    config: str | None = None   # diffusers folder giving the configs of a single-file checkpoint (offline)
    disk_margin: float = 1.25   # free space wanted = margin * (weights + one UNet copy the exporter re-saves)
    attention: str = "sliced"   # per-head attention slices: peak activation memory on CPU/NPU; "full": plain graph

    def __post_init__(self):
        if self.attention not in ATTENTION:
            raise ValueError(f"attention {self.attention!r} is unknown: use one of {', '.join(ATTENTION)}")
        if not 14 <= self.opset <= 20:
            raise ValueError(f"opset {self.opset} is out of range: use 14..20 (17 is the tested default)")
        if self.disk_margin < 1:
            raise ValueError("disk_margin must be >= 1")


def export_model(source: str | Path, out: str | Path, *, force: bool = False, opset: int = 17,
                 config: str | Path | None = None, attention: str = "sliced") -> Path:
    """Export SOURCE (diffusers folder, hub id or .safetensors file) to OUT; returns OUT."""
    cfg = ExportConfig(opset=opset, force=force, config=str(config) if config else None, attention=attention)
    out = Path(out).expanduser().resolve()  # resolved: 'a/missing/../b' must not be created half-way
    if _reusable(out, cfg.force):
        made_from = ModelDir.open(out).manifest.get("source", "?")
        print(f"{out} already holds a complete zoodip export (of {made_from}); reusing it (pass --force to re-export)")
        return out
    if src.is_single_file(source):
        parent = _check_writable(out)
        tmp_src = Path(tempfile.mkdtemp(prefix=f".{out.name}.src.", dir=parent))
        try:
            folder = src.single_file_to_folder(Path(source).expanduser(), cfg.config, tmp_src / "diffusers")
            gc.collect()
            return _export_folder(folder, out, cfg, str(source))
        finally:
            shutil.rmtree(tmp_src, ignore_errors=True)
    return _export_folder(src.resolve(source), out, cfg, str(source))


def _reusable(out: Path, force: bool) -> bool:
    if not out.exists():
        return False
    if not out.is_dir():
        raise FileExistsError(f"{out} is a file: pick a folder name for OUT")
    if force:
        return False
    if (out / MANIFEST).is_file():
        try:
            ModelDir.open(out)
            return True
        except ValueError:
            pass
    if any(out.iterdir()):
        raise FileExistsError(f"{out} exists but is not a complete zoodip export: pass --force to replace it "
                              "or choose another OUT")
    return False


def _check_writable(out: Path) -> Path:
    """The nearest existing ancestor of OUT (where the temp folder goes), if we may write there."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {parent}: choose an OUT folder you can write to, or fix its permissions")
    return parent


def _check_disk(folder: Path, parent: Path, margin: float) -> None:
    sizes = src.weight_bytes(folder)
    need = int(margin * (sum(sizes.values()) + sizes["unet"])) + 64 * (1 << 20)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise OSError(28, f"not enough disk space in {parent}: the export needs about {need / GIB:.1f} GiB, "
                          f"{free / GIB:.1f} GiB free; free some space or choose another OUT")


def _export_folder(folder: Path, out: Path, cfg: ExportConfig, source: str) -> Path:
    configs = src.check_architecture(folder)
    parent = _check_writable(out)
    _check_disk(folder, parent, cfg.disk_margin)
    parent_out = out.parent
    parent_out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent_out))
    try:
        facts = _export_all(folder, tmp, configs, cfg)
        facts["source"] = source
        from .manifest import build_manifest
        manifest = build_manifest(tmp, facts, cfg.opset)
        manifest["attention"] = cfg.attention  # extra key: how the UNet/VAE attention was traced
        atomic_write_json(tmp / MANIFEST, manifest)
        umask_modes(tmp)
        ModelDir.open(tmp)  # the contract the runtime checks, checked before OUT appears
        swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported {source} -> {out}")
    return out


def _export_all(folder: Path, dst: Path, configs: dict, cfg: ExportConfig) -> dict:
    """One submodel at a time, each freed before the next (peak memory: the UNet and its graph)."""
    xl = configs["family"] == "sdxl"
    if xl:
        from zo_runtime.session import fix_malloc_mmap_threshold
        from . import sdxl
        fix_malloc_mmap_threshold()   # every freed multi-MB weight goes back to the OS, not to a fragmented heap
        steps = [("text_encoder", sdxl.export_text), ("text_encoder_2", sdxl.export_text_2),
                 ("unet", sdxl.export_unet), ("vae", lambda *a: _export_vae(*a, trace_px=sdxl.VAE_TRACE_PX)),
                 ("tokenizer", sdxl.copy_tokenizers)]
    else:
        steps = [("text_encoder", _export_text), ("unet", _export_unet), ("vae", _export_vae),
                 ("tokenizer", _copy_tokenizer)]
    facts = {}
    with tqdm(steps, desc="export", unit="part") as bar:
        for name, step in bar:
            bar.set_postfix_str(name)
            facts.update(step(folder, dst, cfg) or {})
            gc.collect()
    facts.update(_model_facts(configs, facts))
    if xl:
        facts.update(sdxl.model_facts(configs))
    sched_dir = dst / "scheduler"
    sched_dir.mkdir()
    shutil.copy2(folder / "scheduler" / "scheduler_config.json", sched_dir / "scheduler_config.json")
    return facts


def _load(cls, folder: Path, sub: str):
    import torch
    # transformers renamed torch_dtype to dtype; diffusers still takes torch_dtype.
    dtype_key = "torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"
    kwargs = {"subfolder": sub, dtype_key: torch.float32, "low_cpu_mem_usage": True}
    names = {p.name for p in (folder / sub).iterdir()}
    has_fp32 = bool(names & {"diffusion_pytorch_model.safetensors", "model.safetensors",
                             "diffusion_pytorch_model.bin", "pytorch_model.bin"})
    if not has_fp32 and any((folder / sub).glob("*.fp16.safetensors")):
        kwargs["variant"] = "fp16"  # fp16-only folders: load the fp16 weights, upcast to fp32
    return cls.from_pretrained(folder, **kwargs).float().eval()


def _export_text(folder: Path, dst: Path, cfg: ExportConfig) -> dict:
    from transformers import CLIPTextModel
    from .text_encoder import export_text_encoder
    model = _load(CLIPTextModel, folder, "text_encoder")
    export_text_encoder(model, dst / "text_encoder", cfg.opset)
    facts = {"vocab_size": int(model.config.vocab_size), "embedding_dim": int(model.config.hidden_size)}
    del model
    return facts


def _export_unet(folder: Path, dst: Path, cfg: ExportConfig) -> None:
    from diffusers import UNet2DConditionModel
    from optimum.exporters.onnx.convert import export
    from optimum.exporters.onnx.model_configs import UNetOnnxConfig
    unet = _load(UNet2DConditionModel, folder, "unet")
    _set_attention(unet, cfg.attention)
    # Attributes Optimum's UNet config reads (set the same way by its get_diffusion_models_for_export).
    unet.config.requires_aesthetics_score = False
    unet.config.time_cond_proj_dim = unet.config.get("time_cond_proj_dim")
    unet.config.text_encoder_projection_dim = None
    unet.config.export_model_type = "unet"
    onnx_cfg = UNetOnnxConfig(unet.config, task="semantic-segmentation", int_dtype="int64", float_dtype="fp32")
    # Its outputs are declared fully dynamic, so skip the axes fix: it would load the whole graph into onnxruntime.
    export(model=unet, config=onnx_cfg, output=dst / "unet" / "model.onnx", opset=cfg.opset,
           disable_dynamic_axes_fix=True)
    del unet


def _export_vae(folder: Path, dst: Path, cfg: ExportConfig, trace_px: int | None = None) -> None:
    """Encoder -> latent_parameters (mean, logvar); decoder latent_sample -> sample (Optimum's VAE split).

    trace_px: image size of the encoder's dummy input (Optimum takes the config's sample_size: SDXL's 1024 px
    costs ~3 GB of activations to trace, the graph is the same at any size); None keeps sample_size.
    """
    from diffusers import AutoencoderKL
    from optimum.exporters.onnx.convert import export
    from optimum.exporters.onnx.model_configs import VaeDecoderOnnxConfig, VaeEncoderOnnxConfig
    vae = _load(AutoencoderKL, folder, "vae")
    if trace_px:
        vae.register_to_config(sample_size=trace_px)
    _set_attention(vae, cfg.attention)
    opset = cfg.opset
    vae.config.export_model_type = "vae-encoder"
    vae.forward = lambda sample: {"latent_parameters": vae.encode(x=sample)["latent_dist"].parameters}
    export(model=vae, config=VaeEncoderOnnxConfig(vae.config, task="semantic-segmentation"),
           output=dst / "vae_encoder" / "model.onnx", opset=opset)
    vae.config.export_model_type = "vae-decoder"
    vae.forward = lambda latent_sample: vae.decode(z=latent_sample)
    export(model=vae, config=VaeDecoderOnnxConfig(vae.config, task="semantic-segmentation"),
           output=dst / "vae_decoder" / "model.onnx", opset=opset)
    del vae


def _set_attention(model, attention: str) -> None:
    """"sliced": every Attention layer (self and cross) traced one head / query chunk at a time."""
    if attention == "sliced":
        from .attention import use_sliced_attention
        use_sliced_attention(model)


def _copy_tokenizer(folder: Path, dst: Path, cfg: ExportConfig) -> dict:
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tok.save_pretrained(dst / "tokenizer")
    return {"pad_token": str(tok.pad_token), "tokenizer_max_length": int(tok.model_max_length)}


def _model_facts(configs: dict, facts: dict) -> dict:
    unet, vae, text, sched = configs["unet"], configs["vae"], configs["text_encoder"], configs["scheduler"]
    vae_factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    return {
        "family": configs["family"],
        "max_length": min(int(text.get("max_position_embeddings", 77)), facts.pop("tokenizer_max_length")),
        "latent_channels": int(vae.get("latent_channels", 4)),
        "vae_scale_factor": vae_factor,
        "scaling_factor": float(vae.get("scaling_factor", 0.18215)),
        "prediction_type": sched.get("prediction_type", "epsilon"),
        "num_train_timesteps": int(sched.get("num_train_timesteps", 1000)),
        "beta_schedule": sched.get("beta_schedule", "scaled_linear"),
        "beta_start": float(sched.get("beta_start", 0.00085)),
        "beta_end": float(sched.get("beta_end", 0.012)),
        "native_resolution": int(unet["sample_size"]) * vae_factor,
        "unet_sample_size": int(unet["sample_size"]),
        "scheduler_class": sched.get("_class_name"),
    }
