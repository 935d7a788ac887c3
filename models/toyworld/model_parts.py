"""Architecture of the toy SD pipeline and small training utilities (torch + diffusers, dev side)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from zo_runtime.assets import CLIP_BPE

TOKENIZER_DIR = CLIP_BPE   # the tokenizer zoodip ships
SCHEDULE = dict(  # SD 1.x training schedule, so export/quantize/ZO code paths match SD 1.5
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False)


@dataclass(frozen=True)
class ArchConfig:
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 3 blocks = factor 4: 64 px -> 16x16 latents; 16 ch at
    #                                              full res keeps decoding cheap (~70M MACs per image)
    latent_channels: int = 4  # SD's latent width, so pipelines and ZO code need no special case
    text_width: int = 128  # 49,408 x 128 embedding = 12.6 MB fp16; the budget-dominant table
    text_layers: int = 3  # trial size; the captions have <= 16 tokens of a tiny grammar
    text_heads: int = 4  # 32-dim heads
    text_ffn: int = 256  # 2x width, not CLIP's 4x: 77 positions per caption make the MLP costly
    unet_channels: tuple[int, ...] = (32, 64, 128)  # 16 -> 8 -> 4 spatial; ~1/4 of the trial's FLOPs, because
    #                                               the 2 cores are shared by several sessions
    unet_layers: int = 1  # one resnet per level (two on the way up)
    unet_heads: int = 4  # attention heads in every transformer block
    norm_groups: int = 8  # GroupNorm groups; must divide every channel count above
    sample_size: int = 16  # latent side: 64 px / factor 4


def make_vae(a: ArchConfig):
    from diffusers import AutoencoderKL
    n = len(a.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=a.latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=a.vae_channels, layers_per_block=1, norm_num_groups=a.norm_groups,
                         sample_size=64)


def make_text_encoder(a: ArchConfig):
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=a.text_width, intermediate_size=a.text_ffn,
                         num_hidden_layers=a.text_layers, num_attention_heads=a.text_heads,
                         max_position_embeddings=77, projection_dim=a.text_width,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModel(cfg)


def make_unet(a: ArchConfig):
    from diffusers import UNet2DConditionModel
    n = len(a.unet_channels)
    # cross-attention at every level, 16x16 included: the background word must reach every pixel
    return UNet2DConditionModel(sample_size=a.sample_size, in_channels=a.latent_channels,
                                out_channels=a.latent_channels, block_out_channels=a.unet_channels,
                                down_block_types=("CrossAttnDownBlock2D",) * n,
                                up_block_types=("CrossAttnUpBlock2D",) * n, layers_per_block=a.unet_layers,
                                cross_attention_dim=a.text_width, attention_head_dim=a.unet_heads,
                                norm_num_groups=a.norm_groups)


def load_tokenizer():
    """The real CLIP BPE tokenizer (49,408 tokens), padded with <|endoftext|> like SD 1.x."""
    from transformers import CLIPTokenizer
    folder = Path(os.environ.get("ZOODIP_CLIP_TOKENIZER", TOKENIZER_DIR))
    if not (folder / "vocab.json").is_file():
        raise ValueError(f"no vocab.json in {folder}; set ZOODIP_CLIP_TOKENIZER to the clip-bpe-49408 folder")
    # model_max_length=77: the pipeline pads prompts to it (the bare vocab files carry no limit)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=77)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Ema:
    """Exponential moving average of several modules' parameters, with diffusers' warmup of the decay."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.modules, self.decay, self.num_updates = modules, decay, 0
        self.shadow = [p.detach().clone() for m in modules for p in m.parameters()]

    def params(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules for p in m.parameters()]

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params()], 1 - d)

    @contextlib.contextmanager
    def swapped(self):
        """Temporarily load the EMA weights into the modules."""
        live = [p.detach().clone() for p in self.params()]
        with torch.no_grad():
            for p, s in zip(self.params(), self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params(), live):
                    p.copy_(s)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "num_updates": self.num_updates}

    def load_state_dict(self, sd: dict) -> None:
        self.shadow, self.num_updates = [s.clone() for s in sd["shadow"]], sd["num_updates"]


def save_checkpoint(path: Path, step: int, modules: dict, opt, extra: dict) -> None:
    """Atomic save (write then rename): a kill mid-write never corrupts the last checkpoint."""
    state = {"step": step, "opt": opt.state_dict() if opt else None, "extra": extra,
             **{k: m.state_dict() for k, m in modules.items()}}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_extra(path: Path) -> dict:
    """The `extra` dict of a checkpoint (e.g. seconds already spent), {} if there is none."""
    return torch.load(path, weights_only=False).get("extra", {}) if path.is_file() else {}


def load_checkpoint(path: Path, modules: dict, opt) -> int:
    """Restore modules (and optimizer) if `path` exists; returns the step to resume from (0 if none)."""
    if not path.is_file():
        return 0
    state = torch.load(path, weights_only=False)
    for k, m in modules.items():
        m.load_state_dict(state[k])
    if opt is not None and state["opt"] is not None:
        opt.load_state_dict(state["opt"])
    return int(state["step"])


def assemble_pipeline(vae_dir: Path, text, unet, sampler: str = "ddim"):
    """StableDiffusionPipeline around in-memory modules; sampler 'pndm' (SD 1.5's shipped config) or 'ddim'."""
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
    if sampler not in ("ddim", "pndm"):
        raise ValueError(f"sampler must be 'ddim' or 'pndm', got {sampler!r}")
    scheduler = PNDMScheduler(**{k: v for k, v in SCHEDULE.items() if k != "clip_sample"},
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    scheduler.register_to_config(clip_sample=False)  # as SD 1.5 ships it; DDIM would clip latents to [-1, 1]
    if sampler == "ddim":
        scheduler = DDIMScheduler.from_config(scheduler.config)
    pipe = StableDiffusionPipeline(vae=AutoencoderKL.from_pretrained(vae_dir), text_encoder=text,
                                   tokenizer=load_tokenizer(), unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
