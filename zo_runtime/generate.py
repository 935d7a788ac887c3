"""Torch-free text-to-image with learned tokens: text encoder -> UNet with CFG -> VAE decoder (onnxruntime).

`Generator` opens the sessions once and is reused by `zoodip generate`, training samples and evaluation;
`generate()` is the stage function: prompt in, a folder of PNGs (with metadata) and a grid out.
SDXL as diffusers' StableDiffusionXLPipeline: both encoders' penultimate states concatenated, encoder 2's pooled
text_embeds, micro-conditioning time ids (original size, crop top-left, target size), and all-zero
unconditional inputs for an empty negative prompt (force_zeros_for_empty_prompt).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import image_io as im
from .config import setting
from .embeds import load_learned_embeds, vector_names
from .latents import check_size
from .model_dir import INPUTS, ModelDir
from .schedulers import NAMES, NoiseSchedule, make_scheduler
from .session import OnnxModel
from .text import SdxlTextEncoder, TextEncoder

# SDXL's time ids in the order its UNet reads them (the manifest's `time_ids` must say the same).
TIME_IDS = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")


@dataclass(frozen=True)
class GenerateConfig:
    """Settings of one `zoodip generate` run (the CLI's options are generated from these fields)."""

    n: int = setting(4, "Images to generate: enough to judge a token, one UNet batch of 8 with CFG.", cli=True,
                     flag="-n")
    steps: int = setting(30, "Denoising steps: DDIM converges by ~25-30 on SD; the DreamBooth protocol uses 50.",
                         cli=True)
    guidance: float = setting(7.5, "Classifier-free guidance scale, SD's usual; <= 1 turns it off (no unconditional "
                              "pass).", cli=True)
    negative: str = setting("", "Negative (unconditional) prompt, as diffusers uses it.", cli=True)
    scheduler: str = setting("ddim", "Sampler: ddim is deterministic and matched to diffusers; euler-a adds noise "
                             "per step.", cli=True, choices=NAMES)
    seed: int = setting(0, "Image i starts from seed + i, so any single image can be remade alone.", cli=True)
    height: int | None = setting(None, "Pixels [default: the model's native size, or its static shape].", cli=True)
    width: int | None = setting(None, "Pixels [default: the model's native size, or its static shape].", cli=True)
    provider: str = setting("auto", "Execution provider: auto, cpu, cuda, dml, openvino, qnn, coreml.", cli=True)
    provider_options: tuple[tuple[str, str], ...] = setting(
        (), "Provider option KEY=VALUE, repeatable (e.g. device_type=CPU for openvino).", cli=True,
        metavar="KEY=VALUE", flag="--provider-option")
    force: bool = setting(False, "Write over the images of an earlier run in OUT (without it they are kept and "
                          "this run goes to a new numbered subfolder).", cli=True)
    # SDXL micro-conditioning (other models refuse them): the size the model is told the source photo had, the
    # crop it is told was taken, and the size it aims for.
    original_size: tuple[int, int] | None = setting(None, "SDXL: (height, width) the photo is said to have had "
                                                    "[default: the output size].")
    crop_top_left: tuple[int, int] = setting((0, 0), "SDXL: (top, left) of the crop it is said to be; (0, 0): "
                                             "uncropped, as diffusers (nonzero asks for cut-off subjects).")
    target_size: tuple[int, int] | None = setting(None, "SDXL: (height, width) aimed for [default: the output size].")
    large_resolution: bool = setting(False, "Allow --height/--width above 2x the model's native size (memory and "
                                     "time grow with the pixels).")
    progress: bool = setting(True, "Show a progress bar over the denoising steps.")

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"-n must be >= 1, got {self.n}")
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.scheduler not in NAMES:
            raise ValueError(f"--scheduler {self.scheduler!r} is unknown: choose one of {', '.join(NAMES)}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"--guidance must be a finite number >= 0 (7.5 is usual), got {self.guidance}")
        for side in (self.height, self.width):
            if side is not None and (side < 8 or side % 8):
                raise ValueError(f"--height/--width must be positive multiples of 8, got {side}")
        for size in (self.original_size, self.target_size, self.crop_top_left):
            if size is not None and (len(size) != 2 or min(size) < 0):
                raise ValueError(f"SDXL sizes and crops are two non-negative numbers (height, width), got {size}")


def _batch_dim(model: OnnxModel, name: str) -> int | None:
    """The fixed batch size of a static-shape input, or None when the batch axis is dynamic."""
    dim = model.inputs[name].shape[0] if model.inputs[name].shape else None
    return dim if isinstance(dim, int) else None


def _run_batched(model: OnnxModel, name: str, x: np.ndarray, extra: dict | None = None,
                 rows: int | None = None, fixed: dict | None = None) -> np.ndarray:
    """Run `model` over x's batch (and `extra`'s) in chunks of `rows` (the static batch), padding the last one;
    `fixed` inputs are fed as they are to every chunk."""
    rows = rows or _batch_dim(model, name) or len(x)
    outs = []
    for start in range(0, len(x), rows):
        chunk = x[start:start + rows]
        real = len(chunk)
        if real < rows:     # a static-batch model needs full batches: pad with copies, drop them after
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], rows - real, axis=0)])
        feeds = {name: chunk, **(fixed or {})}
        for key, value in (extra or {}).items():
            v = value[start:start + rows]
            feeds[key] = v if len(v) == rows else np.concatenate([v, np.repeat(v[-1:], rows - len(v), axis=0)])
        outs.append(model.run(feeds)[0][:real])
    return np.concatenate(outs)


class Generator:
    """Sessions opened once; learned tokens spliced into the text encoder's embedding rows."""

    def __init__(self, model_dir: str | Path | ModelDir, embeds_files=(), provider: str = "auto",
                 provider_options: dict | None = None, text_encoder: TextEncoder | None = None):
        self.model = model_dir if isinstance(model_dir, ModelDir) else ModelDir.open(model_dir)
        m = self.model.manifest
        self.xl = self.model.is_xl
        if self.xl and tuple(m["time_ids"]) != TIME_IDS:
            raise ValueError(f"{self.model.root}: time ids {m['time_ids']} are not SDXL's {TIME_IDS}; re-export it")
        # A trainer passes its own TextEncoder so samples see its current vectors without a second session.
        self.text = text_encoder or (SdxlTextEncoder if self.xl else TextEncoder)(self.model, provider, provider_options)
        self.unet = OnnxModel(self.model.onnx("unet"), provider, provider_options, expect=INPUTS["unet"])
        self.vae = OnnxModel(self.model.onnx("vae_decoder"), provider, provider_options, expect=INPUTS["vae_decoder"])
        self.schedule = NoiseSchedule.from_model(self.model)
        self.latent_channels = int(m["latent_channels"])
        self.vae_factor = int(m["vae_scale_factor"])
        self.scaling = float(m["scaling_factor"])
        self.static = self.model.static_shapes
        self.expand: dict[str, str] = {}          # multi-vector token -> "tok tok_1 ..." (as diffusers does)
        self.embeds: list[str] = []               # file names, for the PNG metadata
        for f in embeds_files:
            self.add_embeds(f)

    def add_embeds(self, path: str | Path, token: str | None = None) -> str:
        """Load a learned-embeds file and splice its rows in; returns the token to use in prompts."""
        name, vectors = load_learned_embeds(path, dim=self.text.dim, token=token,
                                            split=self.text.dims if self.xl else None)
        if name in self.expand:
            raise ValueError(f"{path}: token {name!r} was already loaded from another --embeds file; "
                             "each file needs its own token")
        self.set_token(name, vectors)
        self.embeds.append(Path(path).name)
        return name

    def set_token(self, token: str, vectors: np.ndarray) -> None:
        """Add a (k, d) token, or overwrite its rows if present (training samples of a moving embedding)."""
        vectors = np.asarray(vectors, np.float32).reshape(-1, self.text.dim)
        names = vector_names(token, len(vectors))
        if token in self.expand:
            ids = [self.text.tokenizer.token_id(t) for t in names]
            if None in ids:
                raise ValueError(f"token {token!r} was registered with fewer vectors than {len(vectors)}")
            self.text.set_vectors(ids, vectors)
        else:
            self.text.add_tokens(names, vectors)
        self.expand[token] = " ".join(names)

    def prompt_text(self, prompt: str) -> str:
        """Expand multi-vector tokens in a prompt ('sks' -> 'sks sks_1 sks_2'), like diffusers' TI loader."""
        for token, full in self.expand.items():
            if full != token and full not in prompt:          # already spelled out: leave it
                prompt = re.sub(re.escape(token) + r"(?!_\d)", full, prompt)
        return prompt

    def size(self, height: int | None, width: int | None, allow_large: bool = False) -> tuple[int, int]:
        """Pixel size: asked, else static shape, else native; static-shape models accept only theirs."""
        native = int(self.model.manifest["native_resolution"])
        if self.static:
            want = (int(self.static["height"]), int(self.static["width"]))
            if (height or want[0], width or want[1]) != want:
                raise ValueError(f"this static-shape model only generates {want[0]}x{want[1]} px "
                                 f"(asked {height}x{width}); drop --height/--width or quantize without a static target")
            return want
        h, w = height or native, width or native
        if h % self.vae_factor or w % self.vae_factor:
            raise ValueError(f"height/width must be multiples of {self.vae_factor}, got {h}x{w}")
        for side, what in ((h, "--height"), (w, "--width")):
            check_size(self.model, side, what, allow_large)
        return h, w

    def encode(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> (B, 77, d) encoder_hidden_states (SDXL: d1 + d2)."""
        return self.conditioning(prompts)["encoder_hidden_states"]

    def conditioning(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """Prompts -> the UNet's text inputs: encoder_hidden_states (B, 77, d) [, SDXL text_embeds (B, p)],
        in chunks of the text encoder's static batch if it has one."""
        texts = [self.prompt_text(p) for p in prompts]
        if self.xl:
            rows = _batch_dim(self.text.encoders[0].session, "inputs_embeds")
            hidden, pooled = self.text(texts, rows)
            return {"encoder_hidden_states": hidden, "text_embeds": pooled}
        embeds = self.text.token_embeds(self.text.tokenizer(texts))
        return {"encoder_hidden_states": _run_batched(self.text.session, "inputs_embeds", embeds)}

    def time_ids(self, height: int, width: int, cfg: GenerateConfig, batch: int) -> np.ndarray:
        """(batch, 6) SDXL time ids for an image of height x width px (TIME_IDS order), as diffusers builds them."""
        row = [*(cfg.original_size or (height, width)), *cfg.crop_top_left, *(cfg.target_size or (height, width))]
        return np.tile(np.asarray(row, np.float32), (batch, 1))

    def _timestep(self, t: float, batch: int) -> np.ndarray:
        """The UNet's timestep input: a scalar, or one value per batch row, as the graph declares it."""
        shape = self.unet.inputs["timestep"].shape
        if not shape:
            return np.asarray(t, dtype=np.float32)
        return np.full((shape[0] if isinstance(shape[0], int) else batch,), t, dtype=np.float32)

    def unet_rows(self, batch: int) -> int:
        """Rows per UNet call: the static batch, else the whole guidance batch in ONE call."""
        return _batch_dim(self.unet, "sample") or batch

    def denoise(self, latents: np.ndarray, cond, uncond, cfg: GenerateConfig,
                rngs: list[np.random.Generator]) -> np.ndarray:
        """(n, C, h, w) unit-normal latents -> (n, C, h, w) clean latents; uncond None = no guidance.

        cond, uncond: (n, 77, d) encoder_hidden_states, or `conditioning()` dicts (SDXL: with text_embeds).
        """
        sched = make_scheduler(cfg.scheduler, self.schedule, cfg.steps)
        x = latents * np.float32(sched.init_noise_sigma)
        n = len(x)
        cond = _as_inputs(cond)
        # [uncond; cond] on the batch axis: (2n, 77, d), (2n, p)
        text = cond if uncond is None else {k: np.concatenate([_as_inputs(uncond)[k], v]) for k, v in cond.items()}
        if self.xl:
            h, w = (side * self.vae_factor for side in x.shape[-2:])
            text["time_ids"] = self.time_ids(h, w, cfg, 2 * n if uncond is not None else n)   # (2n, 6)
        rows = self.unet_rows(len(text["encoder_hidden_states"]))
        for i, t in enumerate(tqdm(sched.timesteps, desc="denoise", unit="step", disable=not cfg.progress,
                                   leave=False)):
            inp = sched.scale_model_input(x, i)
            inp = inp if uncond is None else np.concatenate([inp, inp])           # (2n, C, h, w)
            out = _run_batched(self.unet, "sample", inp, text, rows=rows, fixed={"timestep": self._timestep(t, rows)})
            if uncond is not None:
                out = out[:n] + np.float32(cfg.guidance) * (out[n:] - out[:n])   # CFG
            noise = None
            if cfg.scheduler == "euler-a":    # per-image noise keeps image i independent of n
                noise = np.stack([r.standard_normal(x.shape[1:], dtype=np.float32) for r in rngs])
            x = sched.step(out.astype(np.float32), i, x, noise=noise)
        return x

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(n, C, h, w) latents -> (n, H, W, 3) uint8 through the VAE decoder."""
        return im.to_uint8(_run_batched(self.vae, "latent_sample", (latents / self.scaling).astype(np.float32)))

    def sample(self, prompt: str, cfg: GenerateConfig, latents: np.ndarray | None = None) -> np.ndarray:
        """cfg.n images (n, H, W, 3) uint8 for one prompt; `latents` (n, C, h, w) overrides the seeded noise."""
        h, w = self.size(cfg.height, cfg.width, cfg.large_resolution)
        shape = (self.latent_channels, h // self.vae_factor, w // self.vae_factor)
        rngs = [np.random.default_rng(cfg.seed + i) for i in range(cfg.n)]
        if latents is None:
            latents = np.stack([r.standard_normal(shape, dtype=np.float32) for r in rngs])
        elif latents.shape != (cfg.n, *shape):
            raise ValueError(f"latents must have shape {(cfg.n, *shape)}, got {latents.shape}")
        if not self.xl and (cfg.original_size or cfg.target_size or tuple(cfg.crop_top_left) != (0, 0)):
            raise ValueError("original size, crop and target size are SDXL micro-conditioning; this model is "
                             f"{self.model.family}: drop them")
        guided = cfg.guidance > 1.0       # diffusers skips the unconditional pass at guidance <= 1
        # SDXL base: an empty negative prompt is all-zero conditioning, not the encoded "" (diffusers' default).
        zeros = guided and not cfg.negative and bool(self.model.manifest.get("force_zeros_for_empty_prompt"))
        prompts = [prompt] * cfg.n + ([cfg.negative] * cfg.n if guided and not zeros else [])
        text = self.conditioning(prompts)                                          # (n or 2n, 77, d) ...
        cond = {k: v[:cfg.n] for k, v in text.items()}
        uncond = None
        if guided:
            uncond = {k: (np.zeros_like(v) if zeros else text[k][cfg.n:]) for k, v in cond.items()}
        return self.decode(self.denoise(np.asarray(latents, np.float32), cond, uncond, cfg, rngs))

    def metadata(self, prompt: str, cfg: GenerateConfig, index: int) -> dict:
        meta = {"prompt": prompt, "negative": cfg.negative, "seed": cfg.seed + index, "steps": cfg.steps,
                "scheduler": cfg.scheduler, "guidance": cfg.guidance, "model": self.model.root.name,
                "scheme": str(self.model.manifest.get("scheme")), "embeds": self.embeds, "software": "zoodip"}
        if self.xl:   # None: the output size
            meta.update(original_size=cfg.original_size, crop_top_left=list(cfg.crop_top_left),
                        target_size=cfg.target_size)
        return meta


def _as_inputs(text) -> dict[str, np.ndarray]:
    """UNet text inputs as a dict: a bare (n, 77, d) array is encoder_hidden_states (SD 1.x/2.x)."""
    return dict(text) if isinstance(text, dict) else {"encoder_hidden_states": text}


def free_folder(out_dir: Path, force: bool) -> Path:
    """out_dir, or when it holds an earlier run's images (and not force) its first free numbered subfolder."""
    out_dir = Path(out_dir)
    if force or not (out_dir / "grid.png").exists() and not (out_dir / "000.png").exists():
        return out_dir
    k = 2
    while (out_dir / str(k)).exists():
        k += 1
    return out_dir / str(k)


def write_images(gen: Generator, images: np.ndarray, prompt: str, cfg: GenerateConfig, out_dir: Path) -> Path:
    """DIR/000.png ... with metadata in text chunks, and DIR/grid.png; returns DIR (free_folder: earlier
    images in OUT are kept unless cfg.force)."""
    out_dir = free_folder(out_dir, cfg.force)
    for i, image in enumerate(images):
        im.save_png(out_dir / f"{i:03d}.png", image, gen.metadata(prompt, cfg, i))
    im.save_grid(out_dir / "grid.png", list(images), meta={**gen.metadata(prompt, cfg, 0), "seed": cfg.seed})
    return out_dir


def generate(model_dir: str | Path, embeds_files, prompt: str, out_dir: str | Path,
             cfg: GenerateConfig = GenerateConfig()) -> Path:
    """Generate cfg.n images of `prompt` with the learned tokens of `embeds_files`; returns out_dir."""
    if not prompt.strip():
        raise ValueError("--prompt is empty: say what to draw, e.g. 'a photo of sks dog on the beach'")
    gen = Generator(model_dir, embeds_files, cfg.provider, dict(cfg.provider_options))
    return write_images(gen, gen.sample(prompt, cfg), prompt, cfg, Path(out_dir))
