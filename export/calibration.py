"""Real inputs for quantization (prompts, photos -> latents, noised UNet inputs) and streaming MinMax ranges.

Calibration and gates both draw from `real_inputs`: the same prompts/photos pipeline, split into a
calibration part and a held-out part, so the gates never see what calibration saw.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization.calibrate import CalibraterBase, CalibrationMethod, TensorsData
from tqdm import tqdm

from zo_runtime.image_io import load_rgb
from zo_runtime.model_dir import ModelDir
from zo_runtime.session import OnnxModel
from zo_runtime.text import TextEncoder, pool_index

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Where `zoodip quantize` looks when --calib-images is not given (outside any repository, so it works for
# an installed zoodip): put a few of your own photos there, e.g. the ones you will personalize on.
DEFAULT_CALIB_DIR = Path(os.environ.get("ZOODIP_CALIB_IMAGES", Path.home() / ".cache" / "zoodip" / "calibration-images"))
PLACEHOLDER = "sks"  # the TI placeholder calibration prompts carry; its row starts as the class word
# Textual-Inversion templates (diffusers' TI script) and the DreamBooth evaluation prompts
# (zo_runtime/assets/dreambooth/prompts_and_classes.txt; {0} placeholder, {1} class word).
TI_TEMPLATES = ("a photo of a {0}", "a rendering of a {0}", "a cropped photo of the {0}", "the photo of a {0}",
                "a photo of a clean {0}", "a close-up photo of a {0}", "a bright photo of the {0}",
                "a good photo of a {0}", "a photo of one {0}", "a rendition of the {0}")
DREAMBOOTH_PROMPTS = (
    "a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach", "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric", "a {0} {1} on top of a wooden floor", "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background", "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest", "a {0} {1} wearing a red hat", "a {0} {1} in a chef outfit",
    "a {0} {1} with the Eiffel Tower in the background", "a {0} {1} floating on top of water",
    "a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}")
# DreamBooth class words (all single CLIP tokens, so each can initialize the placeholder row).
CLASS_WORDS = ("dog", "cat", "backpack", "clock", "vase", "teapot", "toy", "sneaker", "bowl", "candle", "glasses")


def read_dreambooth_prompts(path: str | Path) -> tuple[str, ...]:
    """The `'...'.format(unique_token, class_token)` prompts of prompts_and_classes.txt, deduplicated."""
    text = Path(path).read_text(encoding="utf-8")
    prompts = tuple(dict.fromkeys(re.findall(r"'([^']*\{0\}[^']*)'\.format", text)))
    if not prompts:
        raise ValueError(f"{path} has no `'...{{0}} {{1}}...'.format(...)` prompt lines (DreamBooth format)")
    return prompts


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration images folder {folder} does not exist: pass --calib-images DIR "
                                f"(a few real photos, e.g. your training photos) or fill {DEFAULT_CALIB_DIR}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"{folder} has {len(files)} images; calibration and held-out gates need at least 2 photos")
    return files


@dataclass
class RealInputs:
    """Real inputs of one split; shapes for N prompts, M photos (D = d, or d1 + d2 for SDXL)."""

    prompts: list[str]
    token_embeds: np.ndarray   # (N, 77, d) text-encoder inputs, placeholder row = class word
    cond: np.ndarray           # (N, 77, D) fp32 text-encoder outputs (SDXL: both encoders' hidden_states[-2])
    uncond: np.ndarray         # (1, 77, D) fp32 text-encoder output of the empty prompt
    images: np.ndarray         # (M, 3, H, W) in [-1, 1]
    latents: np.ndarray        # (M, C, h, w) scaled VAE latents x0 (mean * scaling_factor)
    scaling_factor: float
    class_vector: np.ndarray   # (D,) initial placeholder row(s) (mean of the class word's token rows, per encoder)
    # SDXL only (None otherwise): the second encoder's inputs and pooled outputs, and the UNet's time ids.
    token_embeds_2: np.ndarray | None = None   # (N, 77, d2)
    pool_index: np.ndarray | None = None       # (N,) int64 where encoder 2 pools
    pooled: np.ndarray | None = None           # (N, p) text_embeds
    uncond_pooled: np.ndarray | None = None    # (1, p)
    time_ids: np.ndarray | None = None         # (1, 6): original = target = the resolution, no crop

    def text_inputs(self, i: int | None) -> dict[str, np.ndarray]:
        """The UNet's text inputs (batch 1) for prompt i, or for the empty prompt (i None)."""
        out = {"encoder_hidden_states": self.uncond if i is None else self.cond[i][None]}
        if self.pooled is not None:
            out["text_embeds"] = self.uncond_pooled if i is None else self.pooled[i][None]
            out["time_ids"] = self.time_ids
        return out


def _prompts(prompt_file: Path | None, seed: int) -> list[tuple[str, str]]:
    """(prompt with placeholder, class word) pairs: TI templates and DreamBooth prompts, shuffled."""
    db = read_dreambooth_prompts(prompt_file) if prompt_file else DREAMBOOTH_PROMPTS
    rng = np.random.default_rng(seed)
    pairs = []
    for i, word in enumerate(CLASS_WORDS):
        pairs += [(t.format(PLACEHOLDER), word) for t in TI_TEMPLATES[i % 2::2]]
        pairs += [(p.format(PLACEHOLDER, word), word) for p in db[i % 3::3]]
    return [pairs[i] for i in rng.permutation(len(pairs))]


def _class_vector(text: TextEncoder, word: str) -> np.ndarray:
    """(d,) mean of the word's token rows (no BOS/EOS/padding)."""
    ids = text.tokenizer(word)[0]
    rows = [i for i in ids if i not in (text.tokenizer.bos_id, text.tokenizer.eos_id, text.tokenizer.pad_id)]
    return np.asarray(text.table[rows], np.float32).mean(0)


def _encode(text: TextEncoder, embeds: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
    """Every output of one encoder over (N, 77, d) embeds, 8 prompts per run."""
    outs = [text.run(embeds[i:i + 8], ids[i:i + 8]) for i in range(0, len(embeds), 8)]
    return [np.concatenate(parts) for parts in zip(*outs)]


def _text_inputs(model: ModelDir, pairs: list[tuple[str, str]]) -> dict:
    """Token embeddings and fp32 outputs of every text encoder for the prompts and for "" (RealInputs fields)."""
    # One placeholder per class word would need many tokens; re-point the single row per prompt instead.
    encoders = [TextEncoder(model, sub=sub) for sub in model.text_encoders]
    for text in encoders:
        text.add_tokens([PLACEHOLDER], np.zeros((1, text.dim), np.float32))
    pid = encoders[0].tokenizer.token_id(PLACEHOLDER)
    embeds, ids, vectors = [[] for _ in encoders], [[] for _ in encoders], {}
    for prompt, word in pairs:
        vectors.setdefault(word, [_class_vector(text, word) for text in encoders])
        for k, text in enumerate(encoders):
            text.set_vectors([pid], vectors[word][k][None])
            ids[k].append(text.tokenizer([prompt])[0])
            embeds[k].append(text.token_embeds(ids[k][-1][None])[0])
    embeds, ids = [np.stack(e) for e in embeds], [np.stack(i) for i in ids]           # (N, 77, d_i), (N, 77)
    outs = [_encode(text, e, i) for text, e, i in zip(encoders, embeds, ids)]
    empty = [text.tokenizer([""]) for text in encoders]
    blank = [text.run(text.token_embeds(i), i) for text, i in zip(encoders, empty)]
    first = CLASS_WORDS[0] if CLASS_WORDS[0] in vectors else next(iter(vectors))
    out = {"token_embeds": embeds[0], "cond": np.concatenate([o[0] for o in outs], axis=-1),
           "uncond": np.concatenate([b[0] for b in blank], axis=-1),
           "class_vector": np.concatenate(vectors[first])}
    if model.is_xl:
        out.update(token_embeds_2=embeds[1], pooled=outs[1][1], uncond_pooled=blank[1][1],
                   pool_index=pool_index(ids[1], *encoders[1].pool_rule))
    return out


def real_inputs(model: ModelDir, images: list[Path], resolution: int, n_prompts: int, held_out: bool,
                prompt_file: Path | None = None, seed: int = 0) -> RealInputs:
    """Encode real prompts and photos with the fp32 model; held_out picks the disjoint gate split."""
    pairs = _prompts(prompt_file, seed)
    half = len(pairs) // 2
    pairs = (pairs[half:] if held_out else pairs[:half])[:n_prompts]
    # Every 3rd photo is held out (at least one), so gates see photos calibration did not.
    held = set(range(0, len(images), 3))
    chosen = [p for i, p in enumerate(images) if (i in held) == held_out]
    text = _text_inputs(model, pairs)
    pixels = np.stack([load_rgb(p, resolution) for p in chosen]).astype(np.float32)  # (M, H, W, 3)
    pixels = pixels.transpose(0, 3, 1, 2) / 127.5 - 1.0                               # (M, 3, H, W) in [-1, 1]
    vae = OnnxModel(model.onnx("vae_encoder"))
    C = int(model.manifest["latent_channels"])
    sf = float(model.manifest["scaling_factor"])
    latents = np.concatenate([vae.run({vae.session.get_inputs()[0].name: pixels[i:i + 1]})[0][:, :C]
                              for i in range(len(pixels))]) * sf                       # mean of the posterior
    if model.is_xl:   # SDXL micro-conditioning of square, uncropped photos at this resolution
        text["time_ids"] = np.array([[resolution, resolution, 0, 0, resolution, resolution]], np.float32)
    return RealInputs([p for p, _ in pairs], images=pixels, latents=latents.astype(np.float32), scaling_factor=sf,
                      **text)


def unet_samples(inputs: RealInputs, alphas_cumprod: np.ndarray, n: int, seed: int,
                 t_range: tuple[int, int] = (0, 1000)) -> Iterator[tuple[np.ndarray, int, dict, np.ndarray]]:
    """n (x_t (1,C,h,w), t, text inputs (batch 1), eps), t stratified over t_range; every other one unconditional."""
    rng = np.random.default_rng(seed)
    lo, hi = t_range
    edges = np.linspace(lo, hi, n + 1)
    for i in range(n):
        t = int(rng.integers(int(edges[i]), max(int(edges[i + 1]), int(edges[i]) + 1)))
        x0 = inputs.latents[i % len(inputs.latents)][None]
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        a = alphas_cumprod[t]
        x_t = (np.sqrt(a) * x0 + np.sqrt(1 - a) * eps).astype(np.float32)
        cond = inputs.text_inputs(None if i % 2 else (i // 2) % len(inputs.cond))
        yield x_t, t, cond, eps


def unet_feeds(session_inputs, x_t: np.ndarray, t: int, cond) -> dict[str, np.ndarray]:
    """UNet feed dict in the graph's declared names/dtypes; timestep shaped to its declared rank.

    cond: (B, 77, D) encoder_hidden_states, or a dict of text inputs by name (SDXL: + text_embeds, time_ids).
    """
    cond = cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}
    names = [i.name for i in session_inputs]
    ts = next(i for i in session_inputs if "time" in i.name and i.name not in cond)
    tdtype = np.int64 if "int64" in ts.type else (np.float16 if "float16" in ts.type else np.float32)
    tval = np.full((x_t.shape[0],) * len(ts.shape), t, dtype=tdtype)
    sample = next(n for n in names if n == "sample" or "sample" in n)
    feeds = {sample: x_t, ts.name: tval}
    for key, value in cond.items():
        name = key if key in names else next(n for n in names if "encoder" in n)
        feeds[name] = np.ascontiguousarray(np.broadcast_to(value, (x_t.shape[0],) + value.shape[1:]))
    return feeds


def calibration_feeds(sub: str, inputs: RealInputs, alphas_cumprod: np.ndarray, n: int, seed: int,
                      session_inputs) -> list[dict[str, np.ndarray]]:
    """Feed dicts of one submodel for calibration or gates (batch 1 each)."""
    first = session_inputs[0].name
    if sub == "text_encoder":
        return [{first: inputs.token_embeds[i % len(inputs.token_embeds)][None]} for i in range(n)]
    if sub == "text_encoder_2":
        N = len(inputs.token_embeds_2)
        return [{"inputs_embeds": inputs.token_embeds_2[i % N][None], "pool_index": inputs.pool_index[i % N][None]}
                for i in range(n)]
    if sub == "vae_encoder":
        return [{first: inputs.images[i % len(inputs.images)][None]} for i in range(n)]
    if sub == "vae_decoder":
        return [{first: inputs.latents[i % len(inputs.latents)][None] / inputs.scaling_factor} for i in range(n)]
    return [unet_feeds(session_inputs, x, t, c) for x, t, c, _ in unet_samples(inputs, alphas_cumprod, n, seed)]


def calibration_tensors(model: onnx.ModelProto, op_types: list[str] | None = None) -> list[str]:
    """The tensors onnxruntime's MinMaxCalibrater would calibrate (same selection, called on a shape-inferred graph)."""
    chooser = SimpleNamespace(op_types_to_calibrate=op_types)
    tensors, _ = CalibraterBase.select_tensors_to_calibrate(chooser, model)
    return sorted(tensors)


def _graph_with_types(path: Path) -> onnx.ModelProto:
    """The graph without weight data (external tensors stay references), shape-inferred for dtypes."""
    model = onnx.load(str(path), load_external_data=False)
    return onnx.shape_inference.infer_shapes(model)


def _augment(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """Copy of `model` that also outputs scalar ReduceMin/ReduceMax of each tensor (nothing else kept).

    Each pair sits right after the node producing its tensor, so with priority-based execution the tensor is
    freed as soon as its normal consumers are done (SD 1.5 VAE decoder at 256 px: 2.56 -> 1.12 GB peak).
    """
    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    del aug.graph.output[:]
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    reductions: dict[str, list[onnx.NodeProto]] = {}
    for name in tensors:
        for op in ("ReduceMin", "ReduceMax"):
            out = f"{name}__{op}"
            # keepdims=0 and no axes: reduce over everything to a scalar (all opsets).
            reductions.setdefault(name, []).append(onnx.helper.make_node(op, [name], [out], keepdims=0, name=out))
            aug.graph.output.append(onnx.helper.make_tensor_value_info(out, types[name], []))
    nodes = [r for i in model.graph.input for r in reductions.pop(i.name, [])]
    for node in model.graph.node:
        nodes.append(node)
        nodes += [r for o in node.output for r in reductions.pop(o, [])]
    nodes += [r for rs in reductions.values() for r in rs]
    del aug.graph.node[:]
    aug.graph.node.extend(nodes)
    return aug


def _session(aug: onnx.ModelProto, source: Path) -> ort.InferenceSession:
    """Session on the augmented graph, loaded from memory; external weights are read from the source folder."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.enable_cpu_mem_arena = False              # the arena keeps the peak of every shape: memory is the point
    # The default order runs many ReduceMin/Max late, so their (B, heads, 4096, 4096) inputs stay alive:
    # priority-based order (with _augment's placement) frees each tensor right after its reduction
    # (tiny UNet at 96^2 latents: 1.38 -> 0.41 GB; SD 1.5 UNet at 512 px: 12.6 -> 6.2 GB).
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.add_session_config_entry("session.disable_prepacking", "1")  # no second, pre-packed copy of weights
    # A graph loaded from bytes finds model.onnx_data here (links or copies of 3.4 GB files are not needed).
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(source.parent.resolve()))
    return ort.InferenceSession(aug.SerializeToString(), so, providers=["CPUExecutionProvider"])


def stream_minmax(model_path: str | Path, feeds: Iterable[dict], n: int | None = None,
                  op_types: list[str] | None = None, chunk: int | None = None, desc: str = "calibrate",
                  tensors: list[str] | None = None) -> TensorsData:
    """MinMax activation ranges, one sample at a time, reduced immediately (onnxruntime's MinMax result).

    Memory: the Python side never holds weights (graph only); the session holds one copy (no prepacking,
    no arena); each run returns 2 scalars per tensor. `chunk` tensors per pass if one augmented graph is
    still too large (then the samples run once per chunk, so `feeds` must be re-iterable). `tensors`: these
    tensors instead of those onnxruntime's calibrator would pick for `op_types`.
    """
    model_path = Path(model_path)
    graph = _graph_with_types(model_path)
    tensors = sorted(tensors) if tensors is not None else calibration_tensors(graph, op_types)
    feeds = list(feeds) if chunk else feeds
    lo = {t: np.float32(np.inf) for t in tensors}
    hi = {t: np.float32(-np.inf) for t in tensors}
    chunks = [tensors[i:i + chunk] for i in range(0, len(tensors), chunk)] if chunk else [tensors]
    for part in chunks:
        sess = _session(_augment(graph, part), model_path)
        names = [o.name for o in sess.get_outputs()]
        for feed in tqdm(feeds, total=n or (len(feeds) if hasattr(feeds, "__len__") else None),
                         desc=f"{desc} ({len(part)} tensors)", unit="sample", leave=False):
            for name, value in zip(names, sess.run(names, feed)):
                t, op = name.rsplit("__", 1)
                if op == "ReduceMin":
                    lo[t] = min(lo[t], np.float32(value))
                else:
                    hi[t] = max(hi[t], np.float32(value))
        del sess
    ranges = {t: (np.array(lo[t], np.float32), np.array(hi[t], np.float32)) for t in tensors if np.isfinite(lo[t])}
    return TensorsData(CalibrationMethod.MinMax, ranges)
