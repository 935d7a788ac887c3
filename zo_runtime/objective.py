"""The objective a run minimizes: the diffusion loss of its token vectors, by forward passes only.

One step (method.md): draw image, prompt, t in the PUTS range and noise (common to all passes);
put v and v + mu z_i in the placeholder rows; text encoder as one batch; UNet as one batch (or one
by one); (P,) MSE losses. `Objective` holds what a run opens once (sessions, latents, prompts,
directions); the training loop (train.py) and workers elsewhere call `draw` and `losses` on it.

Where a step's losses are computed is one seam, an `Evaluator`: `Local` (this process, the default) or
workers elsewhere (zoodip.cluster), which open the objective with role "worker", recompute the step's
draws from (seed, step) and run the text encoder on all P points but the UNet only on their own passes,
so every loss is the float this process would compute.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol, Sequence

import numpy as np

from . import latents as lat, priors, prompts, schedule, zo
from .embeds import vector_names
from .model_dir import INPUTS, ModelDir
from .session import OnnxModel
from .text import SdxlTextEncoder, TextEncoder
from .train_config import TrainConfig

VALIDATION_STREAM = 3     # zo.step_rng's data and direction streams are 0 and 1
# What open_objective opens. all: everything, for one process. driver: no UNet (workers run it; the text
# encoder stays for the prompts and the Jacobian directions). worker: no directions (the driver draws the
# query points); its photos come as the driver's Latents, so a worker needs neither the images nor OUT.
ROLES = ("all", "driver", "worker")


def word_rows(text: TextEncoder, word: str, what: str = "--init") -> np.ndarray:
    """(d,) float32 row of one word: its token's row, or the sum of its BPE pieces' rows (e.g. cy + an)."""
    pieces = text.tokenizer.tokenize(word)
    if not pieces or len(word.split()) != 1:
        raise ValueError(f"{what}: {word!r} is not one word; each must be a single token: pick one word such as "
                         "'dog', 'toy' or 'cat' (an --init may join such words by +, e.g. dog+brown)")
    return np.sum([text.table[text.tokenizer.token_id(p)] for p in pieces], axis=0, dtype=np.float32)


def init_rows(text: TextEncoder, init: str, k: int) -> np.ndarray:
    """(k, d) float32 start: the row of the --init word, or the sum of the rows of words joined by + (e.g. what
    --init-candidates found), repeated for each of the k vectors."""
    v = np.sum([word_rows(text, w) for w in init.split("+")], axis=0, dtype=np.float32)
    return np.repeat(v[None], k, axis=0)


def place_tokens(text: TextEncoder, cfg: TrainConfig) -> tuple[list[str], np.ndarray]:
    """Add sks, sks_1, ... to the tokenizer at init_rows; returns (tokens, (k, d) v0)."""
    tokens = vector_names(cfg.token, cfg.num_vectors)
    v0 = init_rows(text, cfg.init, cfg.num_vectors)
    text.add_tokens(tokens, v0)    # ValueError if the placeholder already exists
    return tokens, v0


class Prompts:
    """Prompt draws, tokenized once per distinct prompt: (77,) ids, (77, d) base rows, rows where v goes."""

    def __init__(self, text: TextEncoder, tokens: list[str], names: list[str], cfg: TrainConfig):
        self.text, self.names, self.cache = text, names, {}
        self.ids = [text.tokenizer.token_id(t) for t in tokens]
        self.placeholder = " ".join(tokens)   # multi-vector prompts spell every vector, like diffusers
        self.templates = prompts.templates(cfg.templates)
        self.captions = prompts.load_captions(cfg.captions, names) if cfg.captions else None

    def draw(self, rng: np.random.Generator, image: int) -> tuple[str, np.ndarray, list[np.ndarray], dict]:
        """(prompt, (77, d) float32 token rows, [(r_j,) positions of vector j], extra text inputs) for the
        step's image (extra: SDXL's encoder-2 ids, which its pooling position comes from)."""
        if self.captions:
            return self._encode(self.captions[self.names[image]].format(self.placeholder))
        return self._encode(self.templates[int(rng.integers(len(self.templates)))].format(self.placeholder))

    def draw_template(self, i: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """((77, d) token rows, positions) of template i (captions: image i's caption)."""
        if self.captions:
            return self._encode(self.captions[self.names[i % len(self.names)]].format(self.placeholder))[1:3]
        return self._encode(self.templates[i].format(self.placeholder))[1:3]

    def _encode(self, prompt: str) -> tuple[str, np.ndarray, list[np.ndarray], dict]:
        if prompt not in self.cache:
            ids, base, extra = self.text.prompt_rows(prompt)
            rows = [np.flatnonzero(ids == i) for i in self.ids]
            if any(r.size == 0 for r in rows):
                raise ValueError(f"prompt {prompt!r} lost the placeholder when truncated to 77 tokens; shorten it")
            # (77, d) rows once per prompt; the placeholder rows are overwritten every step.
            self.cache[prompt] = (base, rows, extra or {})
        return (prompt, *self.cache[prompt])


@dataclass
class Objective:
    """The diffusion loss of a run's embedding vectors: sessions and fixed data, opened once."""

    cfg: TrainConfig          # resolved against the model (schedule.resolve)
    model: ModelDir
    text: TextEncoder | SdxlTextEncoder     # SDXL: both encoders, a vector is [clip_l | clip_g]
    unet: OnnxModel | None    # None on a driver whose workers run the UNet
    latents: lat.Latents
    prompts: Prompts
    tokens: list[str]
    v0: np.ndarray            # (k, d)
    alphas: np.ndarray        # (T,) cumulative alphas
    resolution: int
    unet_rows: int            # UNet batch per call: passes (batched) or 1
    text_rows: int            # text-encoder batch per call
    dirs: zo.Directions       # the queries' directions (priors.build; rebuilt every prior_refresh steps)
    prior_args: tuple         # (prompts, batch) directions are built from (priors.PromptRows)
    dirs_seconds: float       # time one build of the directions took (the plan amortizes refreshes)
    fingerprint: dict         # {"model": manifest sha256, "images": photos' sha256}: what a checkpoint was made on


def batch_dim(session: OnnxModel, name: str) -> int | None:
    dim = session.inputs[name].shape[0]
    return dim if isinstance(dim, int) else None


def batch_per_call(session: OnnxModel, name: str, passes: int, want: int, what: str) -> int:
    """Batch per call: `want` unless a static-shape model fixes it (to passes or to 1)."""
    fixed = batch_dim(session, name)
    if fixed is None or fixed == want:
        return want
    if fixed in (1, passes):
        return fixed
    raise ValueError(f"{session.path}: static batch {fixed} fits neither 1 nor the {passes} passes of a step; "
                     f"quantize the {what} with batch 1 or {passes} (or change --queries)")


class Sessions:
    """onnxruntime sessions kept open across runs on one model (a train-many worker trains many subjects).

    Only the text encoder and the UNet (the large ones); keyed by path, provider, options and threads."""

    def __init__(self):
        self.open: dict[tuple, OnnxModel] = {}

    def get(self, path: Path, provider: str, options: dict, expect: tuple[str, ...] = ()) -> OnnxModel:
        key = (str(Path(path).resolve()), provider, tuple(sorted(options.items())), os.environ.get("ZOODIP_THREADS"))
        if key not in self.open:
            self.open[key] = OnnxModel(path, provider, options, expect=expect)
        return self.open[key]


def _session(sessions: Sessions | None, model: ModelDir, sub: str, provider: str, options: dict) -> OnnxModel:
    """The submodel's session (kept open in `sessions` when given), checked for the layout's input names."""
    path, expect = model.onnx(sub), INPUTS[sub]
    return sessions.get(path, provider, options, expect) if sessions else OnnxModel(path, provider, options, expect=expect)


def open_objective(model_dir, images_dir, out: Path | None, cfg: TrainConfig, role: str = "all",
                   sessions: Sessions | None = None) -> Objective:
    """Open the model's sessions, encode the photos (cached in OUT) and resolve cfg against the model.

    role: see ROLES; a "worker" takes the driver's Latents as images_dir and its resolved cfg.
    sessions: reuse sessions already open on this model (None: open new ones)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    model = ModelDir.open(model_dir)
    cfg = cfg if role == "worker" else schedule.resolve(cfg, model.manifest)
    priors.check(cfg)
    res = lat.check_resolution(model, cfg.resolution, cfg.large_resolution)
    opts = dict(cfg.provider_options)
    latents = images_dir if isinstance(images_dir, lat.Latents) else \
        lat.encode_images(model, images_dir, res, out, cfg.provider, opts)
    if model.is_xl:                   # both encoders (kept sessions cover SD 1.x / 2.x's single one)
        if cfg.directions == "jacobian":
            raise ValueError("--directions jacobian is not built for SDXL's two text encoders yet: use --directions "
                             "gaussian (the fast schedule's choice for SDXL)")
        text = SdxlTextEncoder(model, cfg.provider, opts)
    else:
        text = TextEncoder(model, cfg.provider, opts, session=_session(sessions, model, "text_encoder",
                                                                       cfg.provider, opts))
    tokens, v0 = place_tokens(text, cfg)
    passes = cfg.zo.passes
    text_rows = batch_per_call(text.session, "inputs_embeds", passes, passes, "text encoder")
    drawer = Prompts(text, tokens, latents.names, cfg)
    # Before the UNet loads (a Jacobian's J is transient); a dynamic-batch text encoder takes 16 rows a call.
    draws = [drawer.draw_template(i) for i in range(min(cfg.prior_prompts, len(drawer.templates)))]
    batch = text_rows if batch_dim(text.session, "inputs_embeds") else 16
    t0 = time.perf_counter()
    dirs = zo.Gaussian() if role == "worker" else priors.build(cfg, text, (draws, batch), v0)  # workers get points
    dirs_seconds = time.perf_counter() - t0
    unet, unet_rows = None, 1              # a driver sends its passes to workers, one UNet pass per call
    if role != "driver":
        unet = _session(sessions, model, "unet", cfg.provider, opts)
        unet_rows = batch_per_call(unet, "sample", passes, passes if cfg.unet_batch == "batch" else 1, "UNet")
    return Objective(cfg, model, text, unet, latents, drawer, tokens, v0, model.alphas_cumprod(), res, unet_rows,
                     text_rows, dirs, (draws, batch), dirs_seconds,
                     {} if role == "worker" else fingerprint(model, images_dir))   # workers write no checkpoint


def fingerprint(model: ModelDir, images_dir) -> dict:
    """What a run is trained on: sha256 of the model's manifest (it holds every file's hash) and of the photos."""
    h = hashlib.sha256()
    for p in lat.list_images(images_dir):
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return {"model": hashlib.sha256((model.root / "manifest.json").read_bytes()).hexdigest()[:16],
            "images": h.hexdigest()[:16]}


def encode_text(run: Objective, emb: np.ndarray, extra: dict) -> dict[str, np.ndarray]:
    """(P, 77, d) token embeddings -> the UNet's text inputs (encoder_hidden_states (P, 77, d); SDXL: and
    text_embeds (P, p)), text_rows per call (a worker makes the same calls)."""
    return run.text.conditioning(emb, extra, run.text_rows)


def unet_losses(run: Objective, cond: dict[str, np.ndarray], x_t: np.ndarray, t: int, target: np.ndarray,
                sample: np.ndarray, calls: Sequence[int] | None = None, extra: dict | None = None) -> np.ndarray:
    """float64 MSE of UNet calls `calls` (call c: rows c*unet_rows ...; None: every call of the step).

    Each call's MSE is taken on that call's output alone, so a worker running some of the calls gets the
    very floats that one process running all of them gets. extra: SDXL's (1, 6) time_ids of the step's image."""
    rows = run.unet_rows
    calls = range(-(-len(cond["encoder_hidden_states"]) // rows)) if calls is None else calls
    ts = np.array(t, np.float32)
    if run.unet.inputs["timestep"].shape:                  # a (B,) timestep input instead of a scalar
        ts = np.full(rows, t, np.float32)
    sample[:] = x_t                                          # (rows, C, h, w), same x_t for every pass
    fixed = {"timestep": ts}
    if extra and "time_ids" in extra:
        fixed["time_ids"] = np.repeat(extra["time_ids"], rows, axis=0)      # (rows, 6)
    out = [np.zeros(0)]
    for c in calls:
        feeds = {k: v[c * rows:(c + 1) * rows] for k, v in cond.items()}
        pred = run.unet.run({"sample": sample, **fixed, **feeds})[0]          # (rows, C, h, w)
        diff = pred.astype(np.float32) - target
        out.append(np.mean(diff * diff, axis=(1, 2, 3), dtype=np.float64))
    return np.concatenate(out)


def losses(run: Objective, emb: np.ndarray, x_t: np.ndarray, t: int, target: np.ndarray,
           sample: np.ndarray, calls: Sequence[int] | None = None, extra: dict | None = None) -> np.ndarray:
    """(P,) float64 MSE of every pass (or of UNet calls `calls` only): text encoder on all P, then the UNet."""
    extra = extra or {}
    return unet_losses(run, encode_text(run, emb, extra), x_t, t, target, sample, calls, extra)


class Draw(NamedTuple):
    """A step's draws, common to all its passes."""

    prompt: str
    base: np.ndarray          # (77, d) token rows of the prompt
    rows: list                # [(r_j,) positions of vector j]
    t: int
    x_t: np.ndarray           # (1, C, h, w)
    target: np.ndarray        # (1, C, h, w) noise (or v)
    extra: dict               # SDXL: encoder 2's ids (pooling) and the image's (1, 6) time_ids; else empty


def draw(run: Objective, rng: np.random.Generator) -> Draw:
    """A step's draws, common to all its passes: image, flip, prompt, t, noise -> x_t and the target.

    rng: zo.step_rng(seed, step) in training, fixed_rng(seed, i, stream) for a fixed set."""
    cfg = run.cfg
    index, flip = int(rng.integers(len(run.latents.names))), bool(rng.random() < 0.5)
    prompt, base, rows, extra = run.prompts.draw(rng, index)
    if run.model.is_xl:
        extra = {**extra, "time_ids": run.latents.time_ids[index, int(flip)][None]}
    t = zo.sample_timestep(rng, *cfg.t_range)
    x0 = run.latents.sample(rng, index, flip, cfg.latent)                 # (1, C, h, w)
    eps = rng.standard_normal(x0.shape, dtype=np.float32)
    a = run.alphas[t]
    x_t = (np.sqrt(a) * x0 + np.sqrt(1 - a) * eps).astype(np.float32)
    if run.model.manifest["prediction_type"] == "v_prediction":
        return Draw(prompt, base, rows, t, x_t, (np.sqrt(a) * eps - np.sqrt(1 - a) * x0).astype(np.float32), extra)
    return Draw(prompt, base, rows, t, x_t, eps, extra)


def fixed_rng(seed: int, i: int, stream: int) -> np.random.Generator:
    """Draw i of a fixed set of draws on `stream` (validation, init search): apart from every training step's."""
    return np.random.default_rng([seed, i, stream])


def eval_losses(run: Objective, vectors: np.ndarray, rngs) -> list[float]:
    """Base loss of (k, d) vectors on each draw of `rngs` (fresh generators: same draws for any vectors)."""
    emb = np.empty((1, run.text.tokenizer.max_length, vectors.shape[1]), np.float32)
    sample = np.empty((run.unet_rows, *run.latents.mean.shape[2:]), np.float32)
    out = []
    for rng in rngs:
        d = draw(run, rng)
        emb[:] = d.base
        for j, r in enumerate(d.rows):
            emb[:, r] = vectors[j]
        out.append(float(np.mean([losses(run, emb[[0] * run.unet_rows], d.x_t, d.t, d.target, sample, None,
                                         d.extra)])))
    return out


def mean_in_order(values: Sequence[float]) -> float:
    """Their mean, summed left to right: the same float wherever each value was computed."""
    total = 0.0
    for v in values:
        total += v
    return total / len(values)


def eval_loss(run: Objective, vectors: np.ndarray, rngs) -> float:
    """Mean base loss of (k, d) vectors over the draws of `rngs`."""
    return mean_in_order(eval_losses(run, vectors, rngs))


def fixed_losses(run: Objective, vectors: np.ndarray, draws: Sequence[int], stream: int) -> list[float]:
    """Base losses of (k, d) vectors on draws `draws` of the fixed set on `stream` (fixed_rng)."""
    return eval_losses(run, vectors, (fixed_rng(run.cfg.seed, i, stream) for i in draws))


def validation_losses(run: Objective, vectors: np.ndarray, draws: Sequence[int]) -> list[float]:
    """Base losses of (k, d) vectors on draws `draws` (of 1 ... cfg.val_draws) of the fixed validation set."""
    return fixed_losses(run, vectors, draws, VALIDATION_STREAM)


def validation_loss(run: Objective, vectors: np.ndarray) -> float:
    """eval_loss over the run's fixed validation set (cfg.val_draws draws from cfg.seed)."""
    return mean_in_order(validation_losses(run, vectors, range(1, run.cfg.val_draws + 1)))


@dataclass
class Buffers:
    """Arrays a step reuses: (P, k d) query points, (P, 77, d) embeddings, (rows, C, h, w) UNet sample."""

    points: np.ndarray
    emb: np.ndarray
    sample: np.ndarray

    @classmethod
    def for_run(cls, run: Objective) -> "Buffers":
        P, (k, d) = run.cfg.zo.passes, run.v0.shape
        C, h, w = run.latents.mean.shape[2:]
        return cls(np.empty((P, k * d), np.float32), np.empty((P, run.text.tokenizer.max_length, d), np.float32),
                   np.empty((run.unet_rows, C, h, w), np.float32))


def point_losses(run: Objective, points: np.ndarray, drawn: tuple, buf: Buffers,
                 calls: Sequence[int] | None = None) -> np.ndarray:
    """(P,) losses of (P, k d) points on one step's draws: each point's vectors in the placeholder rows.

    calls: only these UNet calls (a worker's share; the text encoder still encodes all P points)."""
    P, (k, d) = len(points), run.v0.shape
    emb = buf.emb[:P]
    emb[:] = drawn.base
    for j, r in enumerate(drawn.rows):
        emb[:, r] = points.reshape(P, k, d)[:, j, None]
    return losses(run, emb, drawn.x_t, drawn.t, drawn.target, buf.sample, calls, drawn.extra)


class Evaluator(Protocol):
    """Where a run is opened and its losses computed: here (`Local`) or on workers (zoodip.cluster)."""

    def open(self, model_dir, images_dir, out: Path, cfg: TrainConfig) -> Objective:
        """The run's Objective (a driver's may leave the UNet to its workers)."""

    def losses(self, run: Objective, step: int, points: np.ndarray, drawn: tuple, buf: Buffers) -> np.ndarray:
        """(P,) losses of step `step`'s (P, D) query points; drawn = draw(run, zo.step_rng(seed, step))."""

    def validation_loss(self, run: Objective, vectors: np.ndarray) -> float:
        """validation_loss(run, vectors), wherever it is computed."""

    def fixed_loss(self, run: Objective, vectors: np.ndarray, draws: Sequence[int], stream: int) -> float:
        """mean_in_order(fixed_losses(run, vectors, draws, stream)), wherever it is computed."""


@dataclass
class Local:
    """Every pass in this process (zoodip train). sessions: keep the model open across runs (train-many)."""

    sessions: Sessions | None = None

    def open(self, model_dir, images_dir, out: Path, cfg: TrainConfig) -> Objective:
        return open_objective(model_dir, images_dir, out, cfg, sessions=self.sessions)

    def losses(self, run: Objective, step: int, points: np.ndarray, drawn: tuple, buf: Buffers) -> np.ndarray:
        return point_losses(run, points, drawn, buf)

    def validation_loss(self, run: Objective, vectors: np.ndarray) -> float:
        return validation_loss(run, vectors)

    def fixed_loss(self, run: Objective, vectors: np.ndarray, draws: Sequence[int], stream: int) -> float:
        return mean_in_order(fixed_losses(run, vectors, draws, stream))
