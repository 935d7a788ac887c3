"""`zoodip train` and `zoodip personalize`: options generated from TrainConfig, one library call each."""
from __future__ import annotations

from pathlib import Path

import click

from zo_runtime.train_config import TrainConfig

from ._common import friendly_errors
from ._options import build_config, config_options, settings_epilog
from .cluster import address_option, no_extra, workers_option

SCHEMES = ("w8a8", "w8", "w4", "fp16", "w8-fast", "none")   # export.quantize.SCHEMES + none (kept here: --help imports no torch)


def _io_options(fn):
    fn = click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")(fn)
    return click.option("--images", type=click.Path(path_type=Path), required=True,
                        help="Folder of 3-5 photos of the subject.")(fn)


@click.command(epilog=settings_epilog(TrainConfig))
@click.argument("model", type=click.Path(path_type=Path))
@_io_options
@config_options(TrainConfig)
@address_option
@workers_option("for a step's passes, ZOODIP_THREADS threads each (default 1) [default: n + 1, as CPUs allow]")
@friendly_errors
def train(model, images, out, sets, address, workers, **kw):
    """Learn a token for the subject in --images on MODEL (an exported or quantized zoodip folder)."""
    cfg = build_config(TrainConfig, kw, sets)
    if address is None and workers is None:
        from zo_runtime.train import train as run

        path = run(model, images, out, cfg)
    else:
        path = _on_cluster(model, images, out, cfg, address, workers)
    click.echo(f"learned embedding: {path}")


def _on_cluster(model, images, out, cfg: TrainConfig, address: str | None, workers: int | None) -> Path:
    """The same run with its passes on Ray workers (zoodip.cluster.queries)."""
    import os

    from zoodip.cluster import ClusterConfig
    from zoodip.cluster.queries import train as run

    cluster = ClusterConfig(address=address, workers=workers, threads=int(os.environ.get("ZOODIP_THREADS") or 1))
    try:
        return run(model, images, out, cfg, cluster)
    except ModuleNotFoundError as err:
        raise no_extra(err) from None


@click.command(epilog=settings_epilog(TrainConfig))
@click.argument("model", type=click.Path(path_type=Path))
@_io_options
@click.option("--scheme", type=click.Choice(SCHEMES), default=None,
              help="Quantization scheme, or none to train the float model [default: zoodip quantize's default].")
@config_options(TrainConfig)
@friendly_errors
def personalize(model, images, out, scheme, sets, **kw):
    """One command: export MODEL (if needed), quantize, train, and draw a sample grid; all under --out."""
    from zoodip.personalize import personalize as run

    embeds = run(model, images, out, build_config(TrainConfig, kw, sets), scheme=scheme, say=click.echo)
    click.echo(f"done: {embeds}")
