"""`zoodip generate`, `zoodip evaluate`, `zoodip export-metrics`: thin wrappers over the library."""
from __future__ import annotations

import click

from zo_runtime.generate import GenerateConfig

from ._common import friendly_errors, provider_option, provider_options_option
from ._options import build_config, config_options, settings_epilog

SCHEDULERS = click.Choice(["ddim", "euler", "euler-a", "dpm++2m"])


@click.command(epilog=settings_epilog(GenerateConfig))
@click.argument("model", type=click.Path())
@click.option("--embeds", "embeds", multiple=True, type=click.Path(),
              help="Learned-embeds .safetensors (diffusers, A1111, or SDXL clip_l/clip_g), repeatable.")
@click.option("--prompt", required=True, help="Use the learned token in it, e.g. 'a photo of sks on the beach'.")
@click.option("--out", required=True, type=click.Path(), help="Output folder.")
@config_options(GenerateConfig)
@friendly_errors
def generate(model, embeds, prompt, out, sets, **kw):
    """Generate images with learned tokens (torch-free): OUT/000.png ... and OUT/grid.png (earlier images in OUT
    are kept: a new run then writes to OUT/2/, OUT/3/, ... unless --force)."""
    from zo_runtime.generate import generate as run

    cfg = build_config(GenerateConfig, kw, sets)
    path = run(model, list(embeds), prompt, out, cfg)
    click.echo(f"wrote {cfg.n} images and grid.png to {path}")


@click.command(help="DreamBooth-protocol evaluation (CLIP-I, CLIP-T, DINO) of a learned token.")
@click.argument("model", type=click.Path())
@click.option("--embeds", required=True, type=click.Path(), help="Learned-embeds .safetensors.")
@click.option("--subject", required=True, type=click.Path(),
              help="Folder of the subject's real photos (e.g. photos/dog).")
@click.option("--metrics", "metrics_dir", default=None, type=click.Path(),
              help="Folder written by `zoodip export-metrics` (clip/, dino/); passed to --scorer too.")
@click.option("--scorer", default=None, metavar="MODULE:FACTORY",
              help="Plug-in metric: FACTORY(metrics_dir, provider, options) returns a zo_runtime.evaluate.Scorer "
                   "(default: CLIP-I, CLIP-T, DINO).")
@click.option("--templates", default=None, type=click.Path(),
              help="Prompt templates, one per line, {0} = token, {1} = class word (default: DreamBooth's 25).")
@click.option("--out", required=True, type=click.Path(), help="Output folder: results.json, contact_sheet.png.")
@click.option("--class-word", default=None,
              help="Subject class (dog, backpack, ...); default looked up in prompts_and_classes.txt.")
@click.option("--prompts-file", default=None, type=click.Path(),
              help="DreamBooth prompts_and_classes.txt; default the copy zoodip ships (zo_runtime/assets).")
@click.option("--kind", type=click.Choice(["auto", "object", "live"]), default="auto", show_default=True,
              help="Prompt list; auto: live for dogs and cats, as in DreamBooth.")
@click.option("-k", "per_prompt", default=5, show_default=True, help="Images per prompt.")
@click.option("--prompts", "num_prompts", default=25, show_default=True, help="Use the first N prompts.")
@click.option("--steps", default=50, show_default=True, help="Denoising steps (protocol: 50).")
@click.option("--guidance", default=7.5, show_default=True)
@click.option("--scheduler", type=SCHEDULERS, default="ddim", show_default=True)
@click.option("--seed", default=0, show_default=True)
@provider_option
@provider_options_option
@friendly_errors
def evaluate(model, embeds, subject, metrics_dir, scorer, templates, out, class_word, prompts_file, kind, per_prompt,
             num_prompts, steps, guidance, scheduler, seed, provider, provider_options):
    from zo_runtime.evaluate import EvaluateConfig, evaluate as run, load_scorer, read_templates
    from zo_runtime.providers import parse_options
    cfg = EvaluateConfig(per_prompt=per_prompt, num_prompts=num_prompts, steps=steps, guidance=guidance,
                         scheduler=scheduler, seed=seed, kind=kind, class_word=class_word,
                         prompts_file=prompts_file, provider=provider,
                         provider_options=tuple(parse_options(provider_options).items()))
    if metrics_dir is None and scorer is None:
        raise click.UsageError("pass --metrics DIR (from `zoodip export-metrics`) or a --scorer plug-in")
    plug = load_scorer(scorer, metrics_dir, provider, dict(cfg.provider_options)) if scorer else None
    lines = read_templates(templates)[:num_prompts] if templates else None
    path = run(model, embeds, subject, metrics_dir, out, cfg, scorer=plug, templates=lines, class_word=class_word)
    click.echo(f"wrote {path}")


@click.command(name="export-metrics", help="Export CLIP (image+text) and DINO metric models to ONNX: OUT/clip, OUT/dino.")
@click.argument("out", type=click.Path())
@click.option("--clip", "clip_id", default="openai/clip-vit-base-patch32", show_default=True,
              help="Hub id or local folder of a CLIPModel.")
@click.option("--dino", "dino_id", default="facebook/dino-vits16", show_default=True,
              help="Hub id or local folder of a ViTModel (DINO) or Dinov2Model (e.g. facebook/dinov2-base).")
@click.option("--force", is_flag=True, help="Re-export even if OUT is complete.")
@friendly_errors
def export_metrics(out, clip_id, dino_id, force):
    from export.metrics_export import export_metric_models
    path = export_metric_models(out, clip_id, dino_id, force=force)
    click.echo(f"wrote {path}")
