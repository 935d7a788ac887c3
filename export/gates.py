"""Fidelity gates after quantization, on held-out real inputs: outputs, conditioning, ZO finite differences."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from zo_runtime.session import OnnxModel

from .calibration import PLACEHOLDER, TI_TEMPLATES, RealInputs, unet_feeds, unet_samples

# 1. Output fidelity. Cosine 0.98 ~ an 11 degree angle between fp32 and quantized outputs: beyond it the
#    denoising trajectory drifts visibly within a few steps. PSNR 20 dB = RMS error at 10% of the output range
#    (apple's converter gates fp16 at far higher PSNR; INT8 activations commonly land at 20-30 dB).
OUTPUT_COSINE_MIN = 0.98
OUTPUT_PSNR_MIN_DB = 20.0
# 2. Conditioning fidelity. eps(cond) - eps(uncond) is all Textual Inversion learns from; 0.9 keeps its direction
#    within ~26 degrees. INT8 UNets can keep outputs close (gate 1) while wiping out this small difference.
COND_COSINE_MIN = 0.9
# 3. ZO fidelity. Pearson correlation of fp32 vs quantized finite differences over random directions: a ZO step
#    follows the quantized differences, so a correlation rho scales the useful signal by ~rho (steps by ~1/rho^2);
#    below 0.7 training needs over twice the steps or learns noise.
ZO_CORR_MIN = 0.7
PSNR_CAP_DB = 200.0       # identical outputs: a finite number keeps manifest.json plain JSON
ZO_T_RANGE = (500, 900)   # PUTS range of the method: where the text signal lives
ZO_SAMPLES = 4            # (x0, t, eps) draws shared round-robin by the directions (common random numbers)
PERTURBATIONS = ("unit", "train")   # gate 3's directions: unit vectors, or the trainer's N(0, I_d) draws


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def psnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """20 log10(range(ref) / rmse): range = max - min of the fp32 output."""
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    rmse = np.sqrt(np.mean((ref - test) ** 2))
    if rmse == 0:
        return PSNR_CAP_DB
    return float(min(20 * np.log10(max(ref.max() - ref.min(), 1e-30) / rmse), PSNR_CAP_DB))


def run_one(model: OnnxModel, feed: dict[str, np.ndarray], batch: int | None) -> np.ndarray:
    """Run a batch-1 feed; a static-batch model gets it repeated to its batch and row 0 back."""
    return run_all(model, feed, batch)[0]


def run_all(model: OnnxModel, feed: dict[str, np.ndarray], batch: int | None) -> list[np.ndarray]:
    """run_one, every output (row 0 of each)."""
    if batch and batch > 1:
        feed = {k: (np.repeat(v, batch, axis=0) if v.ndim and v.shape[0] == 1 else v) for k, v in feed.items()}
    return [out[:1] for out in model.run(feed)]


def output_fidelity(ref_path: Path, q_path: Path, feeds: list[dict], batch: int | None, desc: str) -> dict:
    """Gate 1 for one submodel: cosine and PSNR of all held-out outputs together (one session at a time)."""
    outs = []
    for path, b in ((ref_path, None), (q_path, batch)):
        model = OnnxModel(path)
        outs.append(np.concatenate([run_one(model, f, b) for f in tqdm(feeds, desc=f"gate {desc}", leave=False)]))
        del model
    return {"cosine": cosine(*outs), "psnr_db": psnr_db(*outs)}


def conditioning_fidelity(ref_path: Path, q_path: Path, inputs: RealInputs, alphas: np.ndarray, n: int,
                          seed: int, batch: int | None, q_provider: tuple = ("cpu", None)) -> dict:
    """Gate 2: cosine of eps(cond) - eps(uncond), quantized vs fp32, mean and worst over n held-out samples.

    q_provider: (provider, options) the quantized model runs on (the fp32 reference: onnxruntime's CPU).
    """
    samples = list(unet_samples(inputs, alphas, n, seed))
    diffs = []
    for path, b, prov in ((ref_path, None, ("cpu", None)), (q_path, batch, q_provider)):   # one UNet at a time
        m = OnnxModel(path, *prov)
        ins = m.session.get_inputs()
        d = []
        for i, (x_t, t, _, _) in enumerate(tqdm(samples, desc="gate cond", leave=False)):
            cond = inputs.text_inputs(i % len(inputs.cond))                   # (1, 77, D) [+ SDXL pooled, ids]
            uncond = inputs.text_inputs(None)
            d.append(run_one(m, unet_feeds(ins, x_t, t, cond), b) - run_one(m, unet_feeds(ins, x_t, t, uncond), b))
        diffs.append(d)                                                       # n x (1, C, h, w)
        del m
    cosines = [cosine(a, b) for a, b in zip(*diffs)]
    return {"cond_cosine": float(np.mean(cosines)), "cond_cosine_min": float(np.min(cosines))}


@dataclass(frozen=True)
class TIPrompt:
    """The ZO gate's prompt ('a photo of a sks'): token embeddings per text encoder, the placeholder at `slot`."""

    embeds: tuple[np.ndarray, ...]          # (1, 77, d_i) per text encoder (SDXL: two)
    slot: int                               # placeholder position; v (sum d_i,) = its rows, [clip_l | clip_g]
    pool_index: np.ndarray | None = None    # (1,) int64: SDXL encoder 2's pooling position
    time_ids: np.ndarray | None = None      # (1, 6): SDXL micro-conditioning

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(e.shape[-1] for e in self.embeds)


class DiffusionLoss:
    """L(v) = mean((eps_theta(x_t, t, TE(embeds with v at the placeholder)) - eps)^2) on fixed samples."""

    def __init__(self, te_paths: tuple[Path, ...], unet_path: Path, batch: int | None, prompt: TIPrompt,
                 samples: list, provider: tuple = ("cpu", None)):
        self.tes = [OnnxModel(p, *provider) for p in te_paths]
        self.unet = OnnxModel(unet_path, *provider)
        self.prompt, self.samples, self.batch = prompt, samples, batch

    def text_inputs(self, v: np.ndarray) -> dict[str, np.ndarray]:
        """v split across the encoders -> the UNet's text inputs (batch 1)."""
        p = self.prompt
        outs = []
        for te, base, part in zip(self.tes, p.embeds, np.split(v, np.cumsum(p.dims)[:-1])):
            e = base.copy()
            e[0, p.slot] = part
            feed = {"inputs_embeds": e, **({"pool_index": p.pool_index} if "pool_index" in te.inputs else {})}
            outs.append(run_all(te, feed, self.batch))
        cond = {"encoder_hidden_states": np.concatenate([o[0] for o in outs], axis=-1)}    # (1, 77, D)
        if p.time_ids is not None:
            cond.update(text_embeds=outs[-1][1], time_ids=p.time_ids)                       # (1, p), (1, 6)
        return cond

    def __call__(self, v: np.ndarray, k: int) -> float:
        x_t, t, _, eps = self.samples[k % len(self.samples)]
        feeds = unet_feeds(self.unet.session.get_inputs(), x_t, t, self.text_inputs(v))
        pred = run_one(self.unet, feeds, self.batch)
        return float(np.mean((pred.astype(np.float64) - eps) ** 2))


def finite_differences(loss: DiffusionLoss, v: np.ndarray, z: np.ndarray, mus, bar) -> dict:
    """{mu: (K,) (L(v + mu z_k) - L(v)) / mu}; direction k uses sample k mod S (common random numbers)."""
    base = [loss(v, k) for k in range(len(loss.samples))]
    bar.update(len(base))
    out = {}
    for mu in mus:
        out[mu] = np.array([(loss((v + mu * z[k]).astype(np.float32), k) - base[k % len(base)]) / mu
                            for k in range(len(z))])
        bar.update(len(z))
    return out


def zo_fidelity(ref: tuple, q: tuple, prompt: TIPrompt, samples: list, v: np.ndarray,
                mus: tuple[float, ...], directions: int, seed: int, q_provider: tuple = ("cpu", None),
                perturbation: str = "unit") -> dict:
    """Gate 3: corr over directions z of (L(v+mu z)-L(v))/mu, fp32 vs quantized, for each mu.

    ref, q: (text-encoder paths, UNet path, static batch or None); one pipeline is loaded at a time.
    v: (D,) the placeholder's vector (SDXL: both encoders' rows, perturbed together as one ZO vector).
    q_provider: (provider, options) of the quantized pipeline (the fp32 reference: onnxruntime's CPU).
    perturbation: "unit" (|z| = 1: steps of mu) or "train" (z ~ N(0, I_d) as `zoodip train` draws its
    queries: steps of mu |z| ~ mu sqrt(d), so the gate sees the rounding noise training sees at that mu).
    """
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation {perturbation!r}: choose one of {', '.join(PERTURBATIONS)}")
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((directions, v.size))
    if perturbation == "unit":
        z /= np.linalg.norm(z, axis=1, keepdims=True)                        # unit directions, (K, d)
    bar = tqdm(total=2 * (len(samples) + len(mus) * directions), desc="gate zo", unit="pass", leave=False)
    fds = []
    for (te, unet, batch), prov in ((ref, ("cpu", None)), (q, q_provider)):
        loss = DiffusionLoss(te, unet, batch, prompt, samples, prov)
        fds.append(finite_differences(loss, v, z, mus, bar))
        del loss
    bar.close()
    out = {}
    for mu in mus:
        a, b = fds[0][mu], fds[1][mu]
        corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
        out[f"{mu:g}"] = {"corr": corr, "fd_rms_fp32": float(np.sqrt(np.mean(a ** 2))),
                          "fd_rms_quant": float(np.sqrt(np.mean(b ** 2)))}
    return out


def ti_prompt(model, time_ids: np.ndarray | None) -> TIPrompt:
    """'a photo of a sks' for every text encoder of `model` (a ModelDir), the placeholder a new token.

    Token tables and tokenizers only: no text-encoder session is opened (SDXL's bigG is 2.8 GB in fp32).
    """
    from zo_runtime.text import pool_index
    from zo_runtime.tokenizer import ClipTokenizer
    embeds, slot, pooled_at = [], 0, None
    for sub in model.text_encoders:
        folder, pad = model.tokenizer_of(sub)
        tok = ClipTokenizer(folder, pad_token=pad, max_length=int(model.manifest["max_length"]))
        slot_id = tok.add_tokens([PLACEHOLDER])[0]
        ids = tok([TI_TEMPLATES[0].format(PLACEHOLDER)])                     # (1, 77)
        table = model.token_table(sub)
        embeds.append(np.asarray(table[np.minimum(ids, len(table) - 1)], np.float32))   # (1, 77, d_i)
        slot = int((ids[0] == slot_id).nonzero()[0][0])
        if sub == "text_encoder_2":
            pooled_at = pool_index(ids, model.manifest["pool_rule"], int(model.manifest["eos_token_id_2"]))
    return TIPrompt(tuple(embeds), slot, pooled_at, time_ids if model.is_xl else None)


def zo_samples(inputs: RealInputs, alphas: np.ndarray, seed: int) -> list:
    return list(unet_samples(inputs, alphas, ZO_SAMPLES, seed, t_range=ZO_T_RANGE))


def failures(gates: dict, zo_mus=None, zo_min: float | None = None) -> list[str]:
    """Human-readable list of missed gates (empty when all hold); VAE misses are handled by keeping it float.

    zo_mus: the mus whose ZO correlation decides (the training mu of a scheme validated at one); None: all.
    zo_min: the correlation they must reach (None: ZO_CORR_MIN).
    """
    zo_min = ZO_CORR_MIN if zo_min is None else zo_min
    bad = []
    for sub in ("text_encoder", "text_encoder_2", "unet"):
        g = gates.get(sub)
        if g and g["cosine"] < OUTPUT_COSINE_MIN:
            bad.append(f"{sub} output cosine {g['cosine']:.4f} < {OUTPUT_COSINE_MIN}")
        if g and g["psnr_db"] < OUTPUT_PSNR_MIN_DB:
            bad.append(f"{sub} output PSNR {g['psnr_db']:.1f} dB < {OUTPUT_PSNR_MIN_DB}")
    unet = gates.get("unet", {})
    if "cond_cosine" in unet and unet["cond_cosine"] < COND_COSINE_MIN:
        bad.append(f"unet conditioning cosine {unet['cond_cosine']:.4f} < {COND_COSINE_MIN}")
    for mu, z in gates.get("zo", {}).items():
        if zo_mus is not None and float(mu) not in {float(m) for m in zo_mus}:
            continue
        if z["corr"] < zo_min:
            bad.append(f"ZO finite-difference correlation at mu={mu} is {z['corr']:.3f} < {zo_min}")
    return bad


def thresholds() -> dict:
    return {"output_cosine_min": OUTPUT_COSINE_MIN, "output_psnr_min_db": OUTPUT_PSNR_MIN_DB,
            "cond_cosine_min": COND_COSINE_MIN, "zo_corr_min": ZO_CORR_MIN, "zo_t_range": list(ZO_T_RANGE)}


def vae_passes(g: dict) -> bool:
    return g["cosine"] >= OUTPUT_COSINE_MIN and g["psnr_db"] >= OUTPUT_PSNR_MIN_DB
