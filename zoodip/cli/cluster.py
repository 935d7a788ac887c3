"""`zoodip train-many`, and the cluster options of `zoodip train`: thin maps onto zoodip.cluster."""
from __future__ import annotations

from pathlib import Path

import click

from ._common import friendly_errors

address_option = click.option(
    "--address", default=None, metavar="auto|HOST:PORT",
    help="Ray cluster to run on [default: a local Ray instance on this machine, loopback only].")


def workers_option(what: str):
    return click.option("--workers", type=int, default=None, help=f"Ray workers {what}.")


def no_extra(err: ModuleNotFoundError) -> click.ClickException:
    """The missing `ray` extra as one line (anything else missing is a bug and keeps its traceback)."""
    if "zoodip[ray]" not in str(err):
        raise err
    return click.ClickException(str(err))


@click.command("train-many")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("jobs", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder of the subjects' folders.")
@address_option
@workers_option("[default: the cluster's CPUs // --threads]")
@click.option("--threads", type=int, default=1, show_default=True,
              help="onnxruntime threads per worker (same count, same floats as `zoodip train`).")
@click.option("--retries", type=int, default=2, show_default=True,
              help="Times a subject whose worker died is resumed from its checkpoint on another worker.")
@friendly_errors
def train_many(model, jobs, out, address, workers, threads, retries):
    """Train every subject of JOBS (JSONL: one {"images", "token", "init", "out"?, any setting} a line) on MODEL
    across Ray workers; OUT/<subject>/ as `zoodip train --out` writes it, OUT/summary.json and summary.md."""
    from zoodip.cluster import ClusterConfig
    from zoodip.cluster.subjects import train_many as run

    cluster = ClusterConfig(address=address, workers=workers, threads=threads, retries=retries)
    try:
        path = run(model, jobs, out, cluster)
    except ModuleNotFoundError as err:
        raise no_extra(err) from None
    click.echo(f"summary: {path}")
