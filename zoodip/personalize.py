"""One call from a model and photos to a learned token: export -> quantize -> train -> samples.

Each stage is reused when its output under OUT is complete, so a second call (or a call after an
interruption) continues where the first stopped. Library function; `zoodip personalize` is its CLI.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Callable

from zo_runtime import schedule
from zo_runtime.model_dir import ModelDir
from zo_runtime.train import CHECKPOINT, TrainConfig, checkpoint_step, train


def personalize(model: str | Path, images: str | Path, out: str | Path, cfg: TrainConfig,
                scheme: str | None = None, say: Callable[[str], None] = print) -> Path:
    """Export MODEL (if needed), quantize it (scheme; None: zoodip quantize's default), train cfg.token on
    IMAGES and draw a sample grid, all under OUT; returns OUT/learned_embeds.safetensors."""
    out, model, images = Path(out), Path(model), Path(images)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, resume=True)          # idempotent: a finished or killed run is continued
    exported = _exported(model, out, say)
    quantized = _quantized(exported, out, scheme, images, say)
    embeds = out / "learned_embeds.safetensors"
    steps = _planned_steps(quantized, cfg)
    if _finished(out, steps):
        say(f"[3/4] train: {embeds} is finished ({steps} steps); reusing it")
    else:
        say(f"[3/4] train: {quantized} on {images} -> {out}")
        embeds = train(quantized, images, out, cfg)
    _samples(quantized, embeds, cfg, out / "samples", say)
    return embeds


def _planned_steps(model: Path, cfg: TrainConfig) -> int:
    """The steps training will run: --steps, else the schedule's as train resolves them (less an init search's)."""
    if cfg.steps is not None:
        return cfg.steps
    with warnings.catch_warnings():                     # train itself warns about mu, once
        warnings.simplefilter("ignore")
        return schedule.resolve(cfg, ModelDir.open(model).manifest).steps


def _finished(out: Path, steps: int) -> bool:
    ck, config = out / CHECKPOINT, out / "config.json"
    return (ck.is_file() and (out / "learned_embeds.safetensors").is_file() and config.is_file()
            and json.loads(config.read_text())["config"]["steps"] == steps and checkpoint_step(ck) >= steps)


def _exported(model: Path, out: Path, say) -> Path:
    """MODEL itself if it is a zoodip folder, else its export under OUT/model-onnx (reused when complete)."""
    if (model / "manifest.json").is_file():
        say(f"[1/4] export: {model} is already a zoodip model folder")
        return model
    try:
        from export.onnx_export import export_model
    except ImportError as err:
        raise ValueError(f"{model} needs exporting, which needs the export extra "
                         f"(`pip install zoodip[export]`): {err}") from err
    say(f"[1/4] export: {model} -> {out / 'model-onnx'}")
    return Path(export_model(model, out / "model-onnx"))


def _quantized(model: Path, out: Path, scheme: str | None, images: Path, say) -> Path:
    """The quantized model (OUT/model-<scheme>), or the float model when quantization is unavailable or off."""
    current = json.loads((model / "manifest.json").read_text()).get("scheme", "fp32")
    if scheme in ("none", "fp32") or current != "fp32":
        say(f"[2/4] quantize: skipped (model scheme {current}, --scheme {scheme})")
        return model
    try:
        from export.quantize import QuantizeConfig, quantize_model
    except ImportError as err:
        say(f"[2/4] quantize: skipped, the quantize stage is unavailable here ({err}); training the float model")
        return model
    # Calibrate on the user's own photos: real inputs of exactly the kind training will see.
    qcfg = QuantizeConfig(**({"scheme": scheme} if scheme else {}), calib_images=str(images))
    target = out / f"model-{qcfg.scheme}"
    say(f"[2/4] quantize: {model} -> {target} ({qcfg.scheme})")
    return Path(quantize_model(model, target, qcfg))


def _samples(model: Path, embeds: Path, cfg: TrainConfig, out: Path, say) -> None:
    from zo_runtime.embeds import vector_names
    from zo_runtime.generate import GenerateConfig, generate

    if (out / "grid.png").is_file() and (out / "grid.png").stat().st_mtime >= embeds.stat().st_mtime:
        say(f"[4/4] samples: {out / 'grid.png'} is up to date")
        return
    say(f"[4/4] samples -> {out}")
    generate(model, [embeds], f"a photo of {' '.join(vector_names(cfg.token, cfg.num_vectors))}", out,
             GenerateConfig(n=4, provider=cfg.provider, provider_options=cfg.provider_options, force=True))
