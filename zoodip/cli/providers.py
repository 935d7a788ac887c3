"""`zoodip providers`."""
from __future__ import annotations

import click


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
