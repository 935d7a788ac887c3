"""Training prompts: diffusers' textual-inversion templates, or per-image captions from a file."""
from __future__ import annotations

import json
from pathlib import Path

# The templates of diffusers' textual_inversion.py (imagenet_templates_small), also used by ZOODiP.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)
# imagenet_style_templates_small, for --templates style.
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}",
    "a dirty painting in the style of {}", "a dark painting in the style of {}", "a picture in the style of {}",
    "a cool painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a cropped painting in the style of {}",
    "a good painting in the style of {}", "a close-up painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}", "a small painting in the style of {}",
    "a weird painting in the style of {}", "a large painting in the style of {}",
)
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def templates(kind: str) -> tuple[str, ...]:
    if kind not in TEMPLATES:
        raise ValueError(f"templates must be one of {sorted(TEMPLATES)}, got {kind!r}")
    return TEMPLATES[kind]


def load_captions(path: str | Path, image_names: list[str]) -> dict[str, str]:
    """{image file name: caption with '{}' for the token} from JSON or `name<TAB>caption` lines.

    Every training image needs a caption; ValueError names the first one without.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            caps = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); expected {{\"image.jpg\": \"a photo of {{}}\"}}") from err
        if not isinstance(caps, dict):
            raise ValueError(f"{path} must hold a JSON object {{\"image.jpg\": \"a photo of {{}}\"}}")
    else:
        caps = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            name, sep, cap = line.partition("\t")
            if not sep:
                raise ValueError(f"{path}:{n}: expected `image-file<TAB>caption`, got {line!r}")
            caps[name.strip()] = cap.strip()
    out = {}
    for name in image_names:
        cap = caps.get(name, caps.get(Path(name).stem))
        if cap is None:
            raise ValueError(f"{path} has no caption for {name}; add a line `{name}<TAB>a photo of {{}} ...`")
        if "{}" not in cap:
            raise ValueError(f"{path}: the caption for {name} has no '{{}}' where the learned token goes: {cap!r}")
        try:
            cap.format("sks")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"{path}: the caption for {name} has a stray brace field ({err!r}) in {cap!r}: only "
                             "'{}' marks the token; write other braces as '{{' and '}}'") from None
        out[name] = cap
    return out
