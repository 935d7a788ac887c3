"""Training photos of one held-out toy-world concept: `python -m models.toyworld.concept OUT`.

Writes OUT/00.png ... and OUT/concept.json ({shape, color, pattern, init}); prints the init word
to pass as `zoodip train --init`. Torch-free (numpy + Pillow).
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from models.toyworld import world


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--index", default=0, show_default=True, help="Which held-out concept (0..N-1, seeded order).")
@click.option("--concept", default=None, metavar="SHAPE,COLOR,PATTERN", help="A held-out triple by name instead.")
@click.option("-n", "count", default=5, show_default=True, help="Images to write (the method uses 3-5).")
@click.option("--seed", default=0, show_default=True, help="Seed of the images' jitter and backgrounds.")
def main(out: Path, index: int, concept: str | None, count: int, seed: int):
    """Write `count` training images of a held-out concept to OUT and print its init word."""
    held = world.held_out_triples()
    if concept:
        triple = tuple(p.strip() for p in concept.split(","))
        if triple not in held:
            raise click.BadParameter(f"{concept!r} is not a held-out triple; e.g. {','.join(held[0])}")
    elif not 0 <= index < len(held):
        raise click.BadParameter(f"--index must be in 0..{len(held) - 1}")
    else:
        triple = held[index]
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(world.make_concept_images(triple, count, seed)):
        img.save(out / f"{i:02d}.png")
    shape, color, pattern = triple
    (out / "concept.json").write_text(json.dumps(
        {"shape": shape, "color": color, "pattern": pattern, "init": shape, "seed": seed}, indent=2) + "\n")
    click.echo(shape)


if __name__ == "__main__":
    main()
