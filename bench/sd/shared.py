"""What the SD-scale benchmarks share: the goals they check, the step's passes, and the photos they train on."""
from __future__ import annotations

from pathlib import Path

# The goals, checked in the JSON so the tables can say met / not met.
GOAL_RSS_RATIO = 5.0          # torch_ti peak RSS / zoodip peak RSS at 512 px
GOAL_STEP_SLACK = 0.05        # a zoodip step <= (n+1) UNet forwards + 5%
N_QUERIES = 2                 # the reference n: a step is n+1 = 3 passes, batched into one UNet call or three
# Photos every contender trains on: procedural toy-world scenes (memory and speed do not depend on content;
# a replica's random weights cannot judge quality anyway), written once by default_photos().
DEFAULT_IMAGES = Path("runs/bench-photos")


def default_photos(folder: Path = DEFAULT_IMAGES, n: int = 5) -> Path:
    """`folder` with n procedural 512 px photos in it (written when missing); returns the folder."""
    folder = Path(folder)
    if folder.is_dir() and any(folder.glob("*.png")):
        return folder
    from PIL import Image

    from models.toyworld import world
    folder.mkdir(parents=True, exist_ok=True)
    images, _ = world.make_dataset(n, seed=3)
    for i, img in enumerate(images):
        Image.fromarray(img).resize((512, 512), Image.Resampling.BICUBIC).save(folder / f"{i:02d}.png")
    return folder
