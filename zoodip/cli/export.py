"""`zoodip export` and `zoodip replica`: thin wrappers over export/ (imported inside, so --help never loads torch)."""
from __future__ import annotations

import click

from ._common import friendly_errors

REPLICAS = ("sd15", "sd21", "sdxl", "tiny", "tiny-v", "tiny-sdxl")   # export.replica.KINDS (test_house checks)


@click.command()
@click.argument("model")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Re-export even if OUT already holds a complete export.")
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset (14..20).")
@click.option("--config", "config", default=None, type=click.Path(exists=True, file_okay=False),
              help="For a single-file .safetensors MODEL: a local diffusers folder with its configs.")
@click.option("--attention", default="sliced", show_default=True, type=click.Choice(("sliced", "full")),
              help="sliced: UNet/VAE attention one head (or query chunk) at a time, for a lower peak memory; "
                   "full: the plain graph.")
@friendly_errors
def export(model, out, force, opset, config, attention):
    """Export MODEL (diffusers folder, hub id or .safetensors, SD 1.x / 2.x / XL) to OUT in zoodip's ONNX layout."""
    from export.onnx_export import export_model
    path = export_model(model, out, force=force, opset=opset, config=config, attention=attention)
    click.echo(str(path))


@click.command()
@click.argument("kind", type=click.Choice(REPLICAS))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random weights.")
@friendly_errors
def replica(kind, out, seed):
    """Write a random-weight diffusers folder with the exact SD 1.5 / SD 2.1 / SDXL base configs (benchmarks only; images are noise)."""
    from export.replica import write_replica
    click.echo(str(write_replica(kind, out, seed=seed)))
