"""Quantize an exported zoodip model (w8a8, w8, w4, fp16; cpu/qnn/openvino/npu-static) behind fidelity gates.

Which tool does what, and why:
- w8a8 ranges: our own streaming MinMax (calibration.stream_minmax): onnxruntime's calibrator holds every
  weight several times over and was killed at 24 GB on the SD 1.5 UNet at 512 px.
- w8a8 QDQ graph, cpu/openvino/npu-static: Optimum's ORTQuantizer with a static AutoQuantizationConfig,
  fed the precomputed ranges (`calibration_tensors_range`); its `fit` is the calibrator we avoid.
- w8a8 for QNN: onnxruntime's get_qnn_qdq_config (uint16 activations, uint8 weights, QNN's overrides) and
  quantize_static reading our ranges from a calibration cache; Optimum has no QNN configuration.
- w8 / w4: weight_only.py: onnxruntime's MatMulNBitsQuantizer (8/4-bit MatMul, fp32 compute) and our INT8
  QDQ on Conv/Gemm weights; static targets get INT8 QDQ on every weight (portable to NPU providers);
  w4 puts 4 bits on the UNet/VAE MatMuls only (the text encoder stays 8-bit).
- fp16: onnxruntime.transformers.float16 with float32 inputs/outputs kept, so callers do not change.
- w8-fast: w8, fused attention (fused_attention.py) and int8 compute (int8_compute.py) on the UNet groups
  where the ZO signal survives; gate 3 with the trainer's own perturbations picks and records the training mu.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
from tqdm import tqdm

from zo_runtime.io_utils import atomic_write_json
from zo_runtime.model_dir import MANIFEST, ModelDir, file_hashes
from zo_runtime.plan import peak_rss_gb

from . import calibration as cal
from ._fs import swap_in, umask_modes
from . import gates as gt
from . import int8_compute as ic
from .fused_attention import fuse_attention
from . import model_files as mf
from . import qdq
from . import weight_only as wo

SCHEMES = ("w8a8", "w8", "w4", "fp16", "w8-fast")
TARGETS = ("cpu", "qnn", "openvino", "npu-static")
STATIC_TARGETS = ("qnn", "openvino", "npu-static")
VAES = ("vae_encoder", "vae_decoder")
# w8 MatMul block: 64 divides SD's 320/640/768/1280, and one fp32 scale per 64 weights costs 6% over INT8.
W8_BLOCK = 64
# w8-fast: int8 compute per UNet group (export.int8_compute), the rest as w8. Chosen from the per-group ZO
# study on the trained toy model and the kernel times on the SD 1.5 replica (docs/fast_pass.md).
FAST_PLAN = "attention=block,feed_forward=block"
# The training mus w8-fast tries: the manifest records the largest whose ZO correlation (the trainer's N(0, I_d)
# perturbations) reaches FAST_ZO_CORR_MIN (see training_mu). 1e-3 is the reference's SD 1.x mu, 1e-2 its SD 2.x/XL.
FAST_MUS = (1e-3, 3e-3, 1e-2)
# Stricter than gate 3's 0.7: int8 rounding is a cost w8 does not have, so it must leave ~90% of the signal
# (a correlation rho needs ~1/rho^2 the steps: 1.23x at 0.9).
FAST_ZO_CORR_MIN = 0.9
# MatMulNBits block of w8-fast's int8-compute MatMuls: MLAS quantizes the activations per block of K, so a
# smaller block rounds them more finely (32 divides SD's 320/640/768/1280 and the toy's 32...512).
FAST_BLOCK = 32
# Settings added after the quantize key was defined: left out of the key while unset, so folders quantized
# before them are still recognised as the same quantization.
LATE_SETTINGS = ("int8_plan", "train_mu", "zo_perturbation")


@dataclass(frozen=True)
class QuantizeConfig:
    scheme: str = "w8"                 # weight-only INT8: the published method's scheme and the gates' best (README table)
    target: str = "cpu"                # cpu: dynamic shapes; qnn/openvino/npu-static: fixed shapes for NPUs
    calib_images: str | None = None    # None: calibration.DEFAULT_CALIB_DIR (e.g. your own training photos)
    calib_samples: int = 16            # UNet calibration samples (x_t, t, prompt); >= 16 keeps MinMax ranges stable
    text_samples: int = 32             # text-encoder calibration prompts (cheap: 77 tokens each)
    gate_samples: int = 8              # held-out samples per output/conditioning gate
    zo_directions: int = 32            # random unit directions of the ZO gate (>= 32 for a stable correlation)
    zo_mus: tuple = (1e-3, 1e-2)       # SD 1.x and SD 2.x/XL smoothing of the method
    resolution: int | None = None      # px for calibration, gates and static shapes; None: the model's native size
    gate_resolution: int | None = None # px of the held-out gate inputs; None: `resolution`. Lower it for SD-size
                                       # models on slow CPUs (gates cost ~150 UNet passes); static targets: fixed
    static_batch: int = 1              # batch of static-shape models: 1 lets every caller loop
    block_size: int = 32               # w4 block: divides SD's 320/640/768/1280 (128 would not divide 320)
    matmul_accuracy_level: int = 1     # MatMulNBits compute: 1 = fp32; 4 = int8 is faster but wipes the ZO signal
    chunk: int | None = None           # tensors per calibration pass; None: all at once (fits 12 GB on SD 1.5)
    prompt_file: str | None = None     # DreamBooth prompts_and_classes.txt; None: the built-in copy of its prompts
    gate: bool = True                  # False (--no-gate): write the model even when a gate is missed
    force: bool = False                # replace an existing OUT
    seed: int = 0                      # noise, timesteps and directions of calibration and gates
    int8_plan: str | None = None       # w8-fast: "group=block|dynamic|static,..." (int8_compute.GROUPS); None: FAST_PLAN
    train_mu: float | None = None      # the mu training will use: gate 3 decides there and the manifest records it;
                                       # None: every zo_mus must hold (w8-fast: the largest of FAST_MUS that holds)
    zo_perturbation: str | None = None # gate 3's directions: "unit" (|z| = 1) or "train" (z ~ N(0, I_d), the trainer's
                                       # draws: steps mu sqrt(d)); None: the scheme's (w8-fast: train, others: unit)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}: choose one of {', '.join(SCHEMES)}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}: choose one of {', '.join(TARGETS)}")
        if self.target == "qnn" and self.scheme in ("w8", "w4"):
            raise ValueError("QNN's HTP runs fully quantized (w8a8) or fp16 graphs: use --scheme w8a8 or fp16")
        if self.calib_samples < 1 or self.text_samples < 1 or self.gate_samples < 1:
            raise ValueError("--calib-samples and gate sample counts must be >= 1")
        if self.zo_directions < 8:
            raise ValueError("zo_directions must be >= 8 for a meaningful correlation (32 recommended)")
        if self.matmul_accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError("matmul_accuracy_level is MatMulNBits' accuracy_level: 0..4 (1 = fp32 compute)")
        if self.static and self.gate_resolution not in (None, self.resolution):
            raise ValueError("static-shape targets run their gates at the static resolution: drop --gate-resolution")
        if self.static_batch < 1:
            raise ValueError("static_batch must be >= 1")
        if self.int8_plan is not None and self.scheme != "w8-fast":
            raise ValueError("an int8 plan only applies to --scheme w8-fast")
        if self.scheme == "w8-fast" and self.target != "cpu":
            raise ValueError("w8-fast writes onnxruntime CPU int8 kernels (MatMulNBits, DynamicQuantizeMatMul, "
                             "ConvInteger): use --target cpu, or --scheme w8 for static targets")
        if self.zo_perturbation not in (None, *gt.PERTURBATIONS):
            raise ValueError(f"zo_perturbation {self.zo_perturbation!r}: choose one of {', '.join(gt.PERTURBATIONS)}")
        if self.train_mu is not None and not 0 < self.train_mu < 1:
            raise ValueError(f"train_mu must be in (0, 1), got {self.train_mu}")
        self.plan   # parses and validates int8_plan

    @property
    def static(self) -> bool:
        return self.target in STATIC_TARGETS

    @property
    def plan(self) -> dict[str, str]:
        """{UNet group: int8 method} of w8-fast (empty for the other schemes)."""
        if self.scheme != "w8-fast":
            return {}
        return parse_plan(FAST_PLAN if self.int8_plan is None else self.int8_plan)

    @property
    def fast(self) -> bool:
        return self.scheme == "w8-fast"

    @property
    def perturbation(self) -> str:
        """Gate 3's directions: w8-fast is gated with the trainer's own perturbations at its training mu."""
        return self.zo_perturbation or ("train" if self.scheme == "w8-fast" else "unit")

    @property
    def gate_mus(self) -> tuple[float, ...]:
        """The mus gate 3 measures: zo_mus, the training mu and (w8-fast) the candidates FAST_MUS."""
        extra = {self.train_mu} if self.train_mu is not None else set(FAST_MUS) if self.fast else set()
        return tuple(sorted(set(self.zo_mus) | extra))

    @property
    def zo_corr_min(self) -> float:
        return FAST_ZO_CORR_MIN if self.fast else gt.ZO_CORR_MIN


def parse_plan(text: str) -> dict[str, str]:
    """'feed_forward=block,resnet=dynamic' -> {'feed_forward': 'block', 'resnet': 'dynamic'}; '' -> {}."""
    plan = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        group, sep, method = item.partition("=")
        if not sep or group not in ic.GROUPS or method not in ic.METHODS:
            raise ValueError(f"int8 plan item {item!r}: write GROUP=METHOD with GROUP in {', '.join(ic.GROUPS)} "
                             f"and METHOD in {', '.join(ic.METHODS)}")
        plan[group] = method
    return plan


def quantize_model(source: str | Path, out: str | Path, config: QuantizeConfig = QuantizeConfig()) -> Path:
    """Quantize the exported model SOURCE into OUT (same layout, gates in the manifest); returns OUT."""
    src = ModelDir.open(source)
    out = Path(out).expanduser()
    key = _key(src, config)
    if _reusable(out, key, config.force):
        failed = ModelDir.open(out).manifest["gates"]["failed"]
        if failed and config.gate:   # kept earlier with --no-gate: the gates still apply to this call
            raise ValueError(f"{out} was kept with --no-gate and misses gates: {'; '.join(failed)}. Pass --no-gate "
                             "to use it anyway, or --force with another --scheme")
        print(f"{out} already holds this quantization ({config.scheme}, {config.target}); reusing it "
              "(pass --force to redo it)")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = _quantize_into(src, tmp, config)
        manifest["quantize_key"] = key
        atomic_write_json(tmp / MANIFEST, manifest)
        umask_modes(tmp)
        ModelDir.open(tmp)
        swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"quantized {src.root} -> {out} ({config.scheme}, {config.target}); gates: "
          + ("all held" if manifest["gates"]["passed"] else "; ".join(manifest["gates"]["failed"])))
    return out


def _quantize_into(src: ModelDir, tmp: Path, cfg: QuantizeConfig) -> dict:
    """Everything but the final rename: copy, quantize each submodel, fix shapes, measure gates."""
    mf.copy_support_files(src, tmp)
    res = cfg.resolution or int(src.manifest["native_resolution"])
    factor = int(src.manifest["vae_scale_factor"])
    if res % (factor * 8):
        raise ValueError(f"resolution {res} must be a multiple of {factor * 8} (VAE factor {factor} x 8)")
    images = cal.list_images(cfg.calib_images or cal.DEFAULT_CALIB_DIR)
    prompts = Path(cfg.prompt_file) if cfg.prompt_file else None
    calib = cal.real_inputs(src, images, res, cfg.text_samples, False, prompts, cfg.seed)
    held = cal.real_inputs(src, images, cfg.gate_resolution or res, cfg.gate_samples, True, prompts, cfg.seed)
    alphas = src.alphas_cumprod()
    shapes = {"batch": cfg.static_batch, "height": res, "width": res} if cfg.static else None
    batch = cfg.static_batch if cfg.static else None
    gates: dict = {}
    stats: dict = {}
    for sub in tqdm(src.submodels, desc=f"quantize {cfg.scheme}", unit="submodel"):
        start = time.perf_counter()
        gates[sub] = _submodel_with_gate(sub, src, tmp, cfg, (calib, held), alphas, shapes)
        mf.release_memory()
        stats[sub] = {"seconds": time.perf_counter() - start, "peak_rss_gb_so_far": peak_rss_gb()}
    start = time.perf_counter()
    gates["unet"].update(gt.conditioning_fidelity(src.onnx("unet"), tmp / "unet" / "model.onnx", held, alphas,
                                                  cfg.gate_samples, cfg.seed + 2, batch))
    gates["zo"] = _zo_gate(src, tmp, held, alphas, cfg, batch)
    stats["gates_cond_zo"] = {"seconds": time.perf_counter() - start, "peak_rss_gb_so_far": peak_rss_gb()}
    train_mu = training_mu(gates["zo"], cfg)
    deciding = None                       # w8, w4, ...: every measured mu decides
    if cfg.fast or cfg.train_mu is not None:   # the training mu decides (w8-fast without one: its largest try)
        deciding = (train_mu if train_mu is not None else max(FAST_MUS),)
    failed = gt.failures(gates, deciding, cfg.zo_corr_min)
    gates.update(passed=not failed, failed=failed, thresholds=gt.thresholds())
    if failed and cfg.gate:
        raise ValueError(f"quantization gates missed for --scheme {cfg.scheme}: {'; '.join(failed)}. Nothing was "
                         "written; pass --no-gate to keep the model anyway, or use --scheme w8 (weight-only INT8)")
    extra = {}
    if cfg.scheme == "w8-fast":
        unet = onnx.load(str(tmp / "unet" / "model.onnx"), load_external_data=False)
        extra["int8_compute"] = {"plan": cfg.plan, "nodes": ic.count_int8_compute(unet),
                                 "fused_attention": sum(n.op_type == "MultiHeadAttention" for n in unet.graph.node)}
    return dict(src.manifest, scheme=cfg.scheme, target=cfg.target, static_shapes=shapes, gates=_rounded(gates),
                quantized_from=str(src.root.resolve()), quantize=dataclasses.asdict(cfg),
                quantize_stats=_rounded(stats), files=file_hashes(tmp), **extra,
                zo_validated_mus=sorted(float(mu) for mu, z in gates["zo"].items() if z["corr"] >= cfg.zo_corr_min),
                train_defaults={} if train_mu is None else {"mu": train_mu})


def training_mu(zo: dict, cfg: QuantizeConfig) -> float | None:
    """The mu the manifest tells the trainer to use: train_mu as given, or the largest of FAST_MUS whose ZO
    correlation reaches FAST_ZO_CORR_MIN (w8-fast); None for the other schemes (every measured mu had to hold).

    The largest, not the first: on the toy world w8-fast trained at mu 3e-3 (gate correlation 0.96) reached 0.72x
    w8's concept fidelity, at 1e-2 (0.996) 0.99x, while w8 itself lost nothing going from 1e-3 to 3e-3 (1.01x):
    int8 rounding costs less against a larger difference, and mu up to 1e-2 costs nothing (docs/fast_pass.md)."""
    if cfg.train_mu is not None:
        return cfg.train_mu
    if not cfg.fast:
        return None
    return max((mu for mu in FAST_MUS if zo[f"{mu:g}"]["corr"] >= FAST_ZO_CORR_MIN), default=None)


def _submodel_with_gate(sub: str, src: ModelDir, tmp: Path, cfg: QuantizeConfig, inputs: tuple, alphas,
                        shapes: dict | None) -> dict:
    """Quantize one submodel into tmp, fix its shapes, measure gate 1; a VAE that misses it stays float."""
    calib, held = inputs
    dst = tmp / sub / "model.onnx"
    batch = shapes["batch"] if shapes else None
    # VAE inputs are the photos themselves: repeating one adds nothing to MinMax, so one pass per photo.
    n = {"text_encoder": cfg.text_samples, "text_encoder_2": cfg.text_samples,
         "unet": cfg.calib_samples}.get(sub, len(calib.images))
    n_held = cfg.gate_samples if sub not in VAES else len(held.images)
    ins = mf.graph_inputs(src.onnx(sub))
    _quantize_submodel(sub, src.onnx(sub), dst, cfg,
                       lambda: cal.calibration_feeds(sub, calib, alphas, n, cfg.seed, ins))
    mf.release_memory()
    if shapes:
        qdq.fix_static_shapes(dst, sub, src, shapes)
    held_feeds = cal.calibration_feeds(sub, held, alphas, n_held, cfg.seed + 1, ins)
    gate = gt.output_fidelity(src.onnx(sub), dst, held_feeds, batch, sub)
    if sub in VAES:
        gate["quantized"] = gt.vae_passes(gate)
        if not gate["quantized"]:  # the VAE is outside the training loop: keep it float, and say so
            mf.replace_with_float(src.onnx(sub), dst)
            if shapes:
                qdq.fix_static_shapes(dst, sub, src, shapes)
    return gate


def _zo_gate(src: ModelDir, tmp: Path, held: cal.RealInputs, alphas, cfg: QuantizeConfig, batch,
             q_provider: tuple = ("cpu", None)) -> dict:
    """Gate 3 on the prompt 'a photo of a sks' with the placeholder row(s) at the class word's embedding."""
    prompt = gt.ti_prompt(src, held.time_ids)
    samples = gt.zo_samples(held, alphas, cfg.seed + 3)
    ref = (tuple(src.onnx(s) for s in src.text_encoders), src.onnx("unet"), None)
    q = (tuple(tmp / s / "model.onnx" for s in src.text_encoders), tmp / "unet" / "model.onnx", batch)
    zo = gt.zo_fidelity(ref, q, prompt, samples, held.class_vector, cfg.gate_mus, cfg.zo_directions, cfg.seed + 4,
                        q_provider, cfg.perturbation)
    return {mu: dict(z, perturbation=cfg.perturbation) for mu, z in zo.items()}


def _quantize_submodel(sub: str, src: Path, dst: Path, cfg: QuantizeConfig, feeds) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if cfg.scheme == "w8a8" and cfg.target == "qnn":
        qdq.qdq_qnn(src, dst, lambda ops: cal.stream_minmax(src, feeds(), op_types=ops, chunk=cfg.chunk,
                                                         desc=f"calibrate {sub}"))
        return
    if cfg.scheme == "w8a8":
        from onnxruntime.quantization.registry import QDQRegistry   # the op types Optimum's QDQ config quantizes
        ranges = cal.stream_minmax(src, feeds(), op_types=list(QDQRegistry), chunk=cfg.chunk, desc=f"calibrate {sub}")
        mf.release_memory()                              # the calibration session's weights, before the quantizer's
        qdq.qdq_optimum(src, dst, ranges)
        return
    if cfg.scheme == "w8-fast":
        model = _w8_fast(onnx.load(str(src)), sub, src, cfg, feeds)
    elif cfg.scheme in ("w8", "w4"):
        # Weight-only schemes stream: the graph is loaded without its external data and each weight is read when
        # it is quantized, so memory holds the quantized model, not the fp32 one (SDXL's UNet: 10.3 GB fp32).
        model, base = onnx.load(str(src), load_external_data=False), src.parent
        if cfg.scheme == "w8" and cfg.static:
            wo.int8_weight_only(model, base_dir=base)   # plain QDQ: what NPU execution providers read
        else:
            # w4 keeps the text encoder at 8 bits: it is ~12% of SD 1.5's weights but carries the learned token,
            # and 4 bits missed gate 1 there (cosine 0.970 on the SD 1.5 replica, 0.983 on the tiny model).
            bits, block = (8, W8_BLOCK) if cfg.scheme == "w8" or sub.startswith("text_encoder") else (4, cfg.block_size)
            model = wo.nbits_matmul(model, bits, block, cfg.matmul_accuracy_level, base_dir=base)
            wo.int8_weight_only(model, ("Conv", "Gemm"), base_dir=base)   # convolutions and 2-D Gemms: INT8
        wo.load_remaining(model, base)                  # norms, biases: the new file carries its own bytes
    else:
        from onnxruntime.transformers.float16 import convert_float_to_float16
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    mf.save_model(model, dst)


def _w8_fast(model: onnx.ModelProto, sub: str, src: Path, cfg: QuantizeConfig, feeds) -> onnx.ModelProto:
    """w8 with int8 compute on the UNet's planned groups (text encoder and VAE: w8 as is)."""
    plan = cfg.plan if sub == "unet" else {}
    renamed: dict[str, str] = {}
    if sub == "unet":
        fuse_attention(model, renamed)                       # exact fp32: faster, no (T, S) score matrices
    direct = {g: m for g, m in plan.items() if m in ("dynamic", "static")}
    ranges = None
    if "static" in direct.values():                          # calibrated on the unfused source graph
        tensors = ic.static_tensors(model, [g for g, m in direct.items() if m == "static"])
        found = cal.stream_minmax(src, feeds(), tensors=[renamed.get(t, t) for t in tensors], chunk=cfg.chunk,
                                  desc=f"calibrate {sub}")
        ranges = {t: tuple(map(float, found[renamed.get(t, t)].range_value)) for t in tensors}
    ic.int8_compute(model, direct, ranges)
    blocks = [n.name for g, nodes in ic.weight_nodes(model).items() if plan.get(g) == "block"
              for n in nodes if n.op_type == "MatMul"]
    if blocks:                                               # int8 compute: accuracy level 4
        model = wo.nbits_matmul(model, 8, FAST_BLOCK, 4, blocks)
    model = wo.nbits_matmul(model, 8, W8_BLOCK, cfg.matmul_accuracy_level)   # the other MatMuls: fp32 compute
    wo.int8_weight_only(model, ("Conv", "Gemm"))
    return model


def _key(src: ModelDir, cfg: QuantizeConfig) -> str:
    """What makes two quantizations the same: the source's file hashes and every setting but force/gate."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("force", "gate") and not (k in LATE_SETTINGS and v is None)}
    blob = json.dumps({"files": src.manifest["files"], "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _reusable(out: Path, key: str, force: bool) -> bool:
    if not out.exists() or force:
        return False
    try:
        done = ModelDir.open(out)
    except (ValueError, FileNotFoundError):
        raise FileExistsError(f"{out} exists but is not a finished zoodip quantization: pass --force to replace "
                              "it or choose another OUT") from None
    if done.manifest.get("quantize_key") == key:
        return True
    raise FileExistsError(f"{out} holds a different quantization (scheme {done.manifest.get('scheme')}, other "
                          "settings or source): pass --force to replace it or choose another OUT")


def _rounded(obj):
    if isinstance(obj, float):
        return round(obj, 5)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj
