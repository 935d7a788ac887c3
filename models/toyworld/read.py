"""What the toy world's classifier reads in generated samples: `python -m models.toyworld.read SAMPLES CONCEPT`.

SAMPLES: a folder of `zoodip generate` images (000.png ...; grid.png is skipped). CONCEPT: the concept.json
that `models.toyworld.concept` wrote next to the training photos. Prints one line per attribute, e.g.
`shape circle 4/4, color red 2/4 (others: pink 2), pattern checkered 4/4`. Torch-free.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click
from PIL import Image

from models.toyworld.attributes import AttributeClassifier


def read(samples: Path, concept: dict) -> dict[str, Counter]:
    """Per attribute of the concept (shape, color, pattern): how many samples read as each value."""
    files = sorted(p for p in samples.glob("*.png") if p.name != "grid.png")
    if not files:
        raise click.ClickException(f"no samples (*.png other than grid.png) in {samples}; run zoodip generate first")
    preds = AttributeClassifier().predict([Image.open(p).convert("RGB") for p in files])
    return {k: Counter(p[k] for p in preds) for k in ("shape", "color", "pattern")}


@click.command()
@click.argument("samples", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("concept", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def main(samples: Path, concept: Path):
    """Print how many SAMPLES read as the CONCEPT's shape, color and pattern."""
    wanted = json.loads(concept.read_text())
    counts = read(samples, wanted)
    parts = []
    for key, c in counts.items():
        n, hit = sum(c.values()), c.get(wanted[key], 0)
        others = ", ".join(f"{v} {k}" for v, k in sorted(((v, k) for k, v in c.items() if k != wanted[key]),
                                                         reverse=True))
        parts.append(f"{key} {wanted[key]} {hit}/{n}" + (f" (others: {others})" if others else ""))
    click.echo("samples read as: " + "; ".join(parts))


if __name__ == "__main__":
    main()
