"""`zoodip train` and `zoodip personalize` (export -> quantize -> train -> samples, reusing finished stages)."""
from __future__ import annotations

from pathlib import Path

import click

from ._common import friendly_errors, provider_option, provider_options_option

# Same defaults as zo_runtime.train.TrainConfig (tests/test_train.py checks they agree).
DEFAULTS = dict(queries=2, mu=1e-3, tau=128, nu=1e-3, t_range=(500, 900), lr=5e-3, steps=30000, num_vectors=1,
                estimator="rge", templates="object", seed=0, unet_batch="single", save_every=500, sample_every=0,
                latent="sample", directions="gaussian", betas=(0.9, 0.999), subspace_cap=0.17, prior_mix=0.1,
                lr_schedule="constant", lr_final=0.1, average=0.0, prior_prompts=4, guide_share=0.5,
                normalize="coordinate", prior_power=1.0, prior_rank=0, prior_refresh=0)


def train_options(fn):
    """The options shared by train and personalize (one place, so both stay in step)."""
    d = DEFAULTS
    opts = [
        click.option("--images", type=click.Path(path_type=Path), required=True, help="Folder of 3-5 photos of the subject."),
        click.option("--token", required=True, help="New placeholder token, e.g. sks (must not be in the vocabulary)."),
        click.option("--init", required=True, help="One existing token to start from, e.g. dog."),
        click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder."),
        click.option("--queries", type=int, default=d["queries"], show_default=True, help="n: perturbations per step (n+1 forward passes)."),
        click.option("--mu", type=float, default=d["mu"], show_default=True, help="Perturbation size (SD 2.x: 1e-2)."),
        click.option("--tau", type=int, default=d["tau"], show_default=True, help="Subspace history length / refresh period."),
        click.option("--nu", type=float, default=d["nu"], show_default=True, help="Subspace keeps components explaining > 1-nu."),
        click.option("--t-range", type=(int, int), default=d["t_range"], show_default=True, metavar="LO HI",
                     help="PUTS timestep range [LO, HI); 0 1000 = plain uniform."),
        click.option("--lr", type=float, default=d["lr"], show_default=True, help="ZO-Adam learning rate."),
        click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default=d["lr_schedule"],
                     show_default=True, help="cosine: decay lr over --steps to --lr-final x lr."),
        click.option("--lr-final", type=float, default=d["lr_final"], show_default=True,
                     help="cosine: the last lr as a share of --lr."),
        click.option("--average", type=float, default=d["average"], show_default=True,
                     help="Save the EMA of the iterates with this decay (0.998 ~ last 500 steps); 0: last iterate."),
        click.option("--steps", type=int, default=d["steps"], show_default=True, help="Training steps."),
        click.option("--num-vectors", type=int, default=d["num_vectors"], show_default=True, help="Vectors per token (sks, sks_1, ...)."),
        click.option("--resolution", type=int, default=None, help="Training resolution in px [default: the model's native]."),
        click.option("--estimator", type=click.Choice(["rge", "spsa"]), default=d["estimator"], show_default=True,
                     help="rge: one-sided, n+1 passes; spsa: two-sided, 2n passes."),
        click.option("--no-subspace", is_flag=True, help="Turn Subspace Gradient off."),
        click.option("--subspace-cap", type=float, default=d["subspace_cap"], show_default=True,
                     help="Largest share of the embedding dims Subspace Gradient may remove (1 = uncapped)."),
        click.option("--directions", type=click.Choice(["gaussian", "orthogonal", "vocab", "jacobian", "guided"]),
                     default=d["directions"], show_default=True,
                     help="Perturbations: N(0, I); sweeps of a random orthonormal basis; N(0, S) with S the token "
                     "rows' covariance (vocab) or the text encoder's J^T J at the start (jacobian); or part of each "
                     "query along the optimizer's momentum (guided)."),
        click.option("--prior-words", type=click.Path(path_type=Path), default=None,
                     help="vocab directions: a text file of words whose rows give S [default: the whole table]."),
        click.option("--prior-mix", type=float, default=d["prior_mix"], show_default=True,
                     help="vocab/jacobian directions: share of the identity mixed into S (keeps every direction reachable)."),
        click.option("--prior-prompts", type=int, default=d["prior_prompts"], show_default=True,
                     help="jacobian directions: templates whose J^T J is summed (d+1 text-encoder passes each)."),
        click.option("--prior-power", type=float, default=d["prior_power"], show_default=True,
                     help="vocab/jacobian directions: z ~ N(0, S^power); -1 with jacobian = Gauss-Newton (queries "
                     "where the text encoder is flat)."),
        click.option("--prior-rank", type=int, default=d["prior_rank"], show_default=True,
                     help="vocab/jacobian directions: k > 0 spreads queries evenly over S's top-k directions "
                     "(--prior-mix of the rest); 0: z ~ N(0, S^power)."),
        click.option("--prior-refresh", type=int, default=d["prior_refresh"], show_default=True,
                     help="jacobian directions: rebuild J^T J at the current vector every this many steps "
                     "(<= --tau; text-encoder passes only); 0: at the start only."),
        click.option("--guide-share", type=float, default=d["guide_share"], show_default=True,
                     help="guided directions: share of each query's energy along the momentum."),
        click.option("--normalize", type=click.Choice(["coordinate", "global"]), default=d["normalize"],
                     show_default=True, help="ZO-Adam second moment per coordinate (reference) or one for all "
                     "(keeps each step's direction)."),
        click.option("--beta1", type=float, default=d["betas"][0], show_default=True,
                     help="ZO-Adam first-moment decay: higher averages more directions per update."),
        click.option("--templates", type=click.Choice(["object", "style"]), default=d["templates"], show_default=True,
                     help="Prompt templates (diffusers' textual inversion lists)."),
        click.option("--captions", type=click.Path(path_type=Path), default=None,
                     help="Per-image captions: JSON {image: caption} or `image<TAB>caption` lines, '{}' = token."),
        click.option("--latent", type=click.Choice(["sample", "mean"]), default=d["latent"], show_default=True,
                     help="x0 per step: a VAE posterior sample (reference) or its mean."),
        click.option("--seed", type=int, default=d["seed"], show_default=True, help="Seed of every random draw."),
        provider_option, provider_options_option,
        click.option("--unet-batch", type=click.Choice(["batch", "single"]), default=d["unet_batch"], show_default=True,
                     help="UNet passes of a step one by one (least memory) or as one batch (may be faster on GPUs/NPUs)."),
        click.option("--save-every", type=int, default=d["save_every"], show_default=True, help="Checkpoint period (steps); 0: end only."),
        click.option("--sample-every", type=int, default=d["sample_every"], show_default=True, help="Sample grid period (steps); 0: off."),
        click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.npz."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _config(kw: dict):
    from zo_runtime.providers import parse_options
    from zo_runtime.train import TrainConfig

    return TrainConfig(
        token=kw["token"], init=kw["init"], queries=kw["queries"], mu=kw["mu"], tau=kw["tau"], nu=kw["nu"],
        t_range=kw["t_range"], lr=kw["lr"], steps=kw["steps"], num_vectors=kw["num_vectors"],
        estimator=kw["estimator"], subspace=not kw["no_subspace"], templates=kw["templates"],
        directions=kw["directions"], betas=(kw["beta1"], DEFAULTS["betas"][1]), subspace_cap=kw["subspace_cap"],
        lr_schedule=kw["lr_schedule"], lr_final=kw["lr_final"], average=kw["average"],
        prior_words=str(kw["prior_words"]) if kw["prior_words"] else None, prior_mix=kw["prior_mix"],
        prior_prompts=kw["prior_prompts"], prior_power=kw["prior_power"], guide_share=kw["guide_share"],
        normalize=kw["normalize"], prior_rank=kw["prior_rank"], prior_refresh=kw["prior_refresh"],
        captions=str(kw["captions"]) if kw["captions"] else None, seed=kw["seed"], resolution=kw["resolution"],
        latent=kw["latent"], unet_batch=kw["unet_batch"], provider=kw["provider"],
        provider_options=tuple(parse_options(kw["provider_options"]).items()), save_every=kw["save_every"],
        sample_every=kw["sample_every"], resume=kw["resume"])


def _run_train(model: Path, kw: dict, cfg) -> Path:
    from zo_runtime.train import train as run

    try:
        return run(model, kw["images"], kw["out"], cfg)
    except FloatingPointError as err:   # diverged: say so in one line, the checkpoint is intact
        raise click.ClickException(str(err)) from err


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@train_options
@friendly_errors
def train(model, **kw):
    """Learn a token for the subject in --images on MODEL (an exported or quantized zoodip folder)."""
    path = _run_train(model, kw, _config(kw))
    click.echo(f"learned embedding: {path}")


def _exported(model: Path, out: Path) -> Path:
    """MODEL itself if it is a zoodip folder, else its export under OUT/model-onnx (reused when complete)."""
    if (model / "manifest.json").is_file():
        click.echo(f"[1/4] export: {model} is already a zoodip model folder")
        return model
    try:
        from export.onnx_export import export_model
    except ImportError as err:
        raise click.ClickException(f"{model} needs exporting, which needs the export extra "
                                   f"(`pip install zoodip[export]`): {err}") from err
    click.echo(f"[1/4] export: {model} -> {out / 'model-onnx'}")
    return Path(export_model(model, out / "model-onnx"))


def _quantized(model: Path, out: Path, scheme: str | None, images: Path) -> Path:
    """The quantized model (OUT/model-<scheme>), or the float model when quantization is unavailable or off."""
    import json

    current = json.loads((model / "manifest.json").read_text()).get("scheme", "fp32")
    if scheme in ("none", "fp32") or current != "fp32":
        click.echo(f"[2/4] quantize: skipped (model scheme {current}, --scheme {scheme})")
        return model
    try:
        from export.quantize import QuantizeConfig, quantize_model
    except ImportError as err:
        click.echo(f"[2/4] quantize: skipped, the quantize stage is unavailable here ({err}); training the float model")
        return model
    # Calibrate on the user's own photos: real inputs of exactly the kind training will see.
    qcfg = QuantizeConfig(**({"scheme": scheme} if scheme else {}), calib_images=str(images))
    target = out / f"model-{qcfg.scheme}"
    click.echo(f"[2/4] quantize: {model} -> {target} ({qcfg.scheme})")
    return Path(quantize_model(model, target, qcfg))


def _samples(model: Path, embeds: Path, cfg, out: Path) -> None:
    try:
        from zo_runtime.generate import GenerateConfig, generate
    except ImportError as err:
        click.echo(f"[4/4] samples: skipped, generation is unavailable here ({err})")
        return
    if (out / "grid.png").is_file() and (out / "grid.png").stat().st_mtime >= embeds.stat().st_mtime:
        click.echo(f"[4/4] samples: {out / 'grid.png'} is up to date")
        return
    placeholder = " ".join([cfg.token] + [f"{cfg.token}_{i}" for i in range(1, cfg.num_vectors)])
    click.echo(f"[4/4] samples -> {out}")
    generate(model, [embeds], f"a photo of {placeholder}", out,
             GenerateConfig(n=4, provider=cfg.provider, provider_options=cfg.provider_options))


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--scheme", default=None,
              help="Quantization scheme (w8a8, w8, w4, fp16) or none [default: zoodip quantize's default].")
@train_options
@friendly_errors
def personalize(model, scheme, **kw):
    """One command: export MODEL (if needed), quantize, train, and draw a sample grid; all under --out."""
    import dataclasses
    import json

    out = kw["out"]
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(_config(kw), resume=True)    # idempotent: a finished run is reused
    exported = _exported(model, out)
    quantized = _quantized(exported, out, scheme, kw["images"])
    ck = out / "checkpoint.npz"
    done = (ck.is_file() and (out / "learned_embeds.safetensors").is_file()
            and json.loads((out / "config.json").read_text())["config"]["steps"] == cfg.steps
            and _checkpoint_step(ck) >= cfg.steps)
    if done:
        click.echo(f"[3/4] train: {out / 'learned_embeds.safetensors'} is finished ({cfg.steps} steps); reusing it")
        embeds = out / "learned_embeds.safetensors"
    else:
        click.echo(f"[3/4] train: {quantized} on {kw['images']} -> {out}")
        embeds = _run_train(quantized, kw, cfg)
    _samples(quantized, embeds, cfg, out / "samples")
    click.echo(f"done: {embeds}")


def _checkpoint_step(path: Path) -> int:
    import numpy as np

    with np.load(path) as z:
        return int(z["step"])
