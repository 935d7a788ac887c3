"""`zoodip providers` and `zoodip verify`: what this machine runs, and whether a model folder is intact."""
from __future__ import annotations

import click

from ._common import friendly_errors


@click.command()
def providers():
    """Show onnxruntime, its execution providers, and what --provider auto picks."""
    import onnxruntime as ort

    from zo_runtime import providers as prov

    click.echo(f"onnxruntime {ort.__version__} ({ort.get_device()})")
    have = prov.available()
    for short, ep in prov.PROVIDERS.items():
        mark = "yes" if short in have else f"no  (install {prov.PACKAGES[short]})"
        click.echo(f"  {short:9s} {ep:28s} {mark}")
    click.echo(f"--provider auto -> {prov.resolve('auto')}")


@click.command()
@click.argument("model", type=click.Path())
@friendly_errors
def verify(model):
    """Check MODEL's files against the sha256 its manifest recorded (a damaged copy or download)."""
    from zo_runtime.model_dir import ModelDir

    folder = ModelDir.open(model)
    folder.verify()
    click.echo(f"{folder.root}: {len(folder.manifest.get('files', {}))} files match the manifest")
