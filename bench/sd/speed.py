"""Forward time per scheme (UNet, text encoder; batch 1 and n+1; 512 and 256 px) and a step's overhead share.

    python -m bench.sd.speed --out bench/results/speed.json

Each model folder is timed in its own fresh subprocess (`--worker FOLDER`), through the same
OnnxModel boundary the trainer uses, on seeded random inputs of the real shapes. Then one short
zoodip training run (bench.sd.zoodip_train) on the default scheme measures the share of a step spent
outside session.run.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import common
from .memory import MemoryConfig, scheme_folders
from .shared import DEFAULT_IMAGES, N_QUERIES, default_photos



@dataclass(frozen=True)
class SpeedConfig:
    base: Path = Path("runs/sd15")             # SD 1.5 replica; BASE-onnx, BASE-w8 ... beside it
    resolutions: tuple[int, ...] = (512, 256)  # SD 1.5 native, and the cheaper laptop setting
    batches: tuple[int, ...] = (1, N_QUERIES + 1)   # one pass, and a whole step's passes in one call
    repeats: int = 2                            # timed runs after one warm-up; fp32 b3 at 512 px is ~15 s
    train_steps: int = 4                        # zoodip steps for the overhead share (1 warm-up); 0 skips
    train_resolution: int = 512                 # where the 5% bound is stated
    default_scheme: str = MemoryConfig.default_scheme
    images: Path = DEFAULT_IMAGES
    log_dir: Path = Path("runs/bench_logs")
    timeout_s: float = 3600.0

    def __post_init__(self):
        if any(r <= 0 or r % 8 for r in self.resolutions):
            raise ValueError(f"resolutions {self.resolutions} must be positive multiples of 8 (SD: 64)")
        if self.repeats < 1 or any(b < 1 for b in self.batches):
            raise ValueError("repeats and batches must be >= 1")


def _timed(fn, repeats: int) -> dict:
    fn()                                   # warm-up: first run allocates and picks kernels
    secs, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        secs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    # CPU seconds (all threads) stretch far less than wall time when neighbours load the cores.
    return dict(common.time_stats(secs), cpu_median=common.time_stats(cpu)["median"])


def _fits(model, name: str, shape: tuple) -> bool:
    fixed = model.static_shape(name)
    return fixed is None or tuple(fixed) == tuple(shape)


def _timestep(model, batch: int) -> np.ndarray:
    """A PUTS timestep (700) in the rank the graph declares: scalar, (1,) or (B,)."""
    shape = model.inputs["timestep"].shape
    if not shape:
        return np.array(700.0, np.float32)
    return np.full([d if isinstance(d, int) else batch for d in shape], 700.0, np.float32)


def _folder_mb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2 ** 20, 1)


def time_folder(folder: str | Path, resolutions, batches, repeats: int) -> dict:
    """Load time, file size and forward-time stats of one model folder's UNet and text encoder."""
    from zo_runtime.model_dir import ModelDir
    from zo_runtime.session import OnnxModel

    md = ModelDir.open(folder)
    m, rng = md.manifest, np.random.default_rng(0)
    d, ch, f = md.dim, int(m["latent_channels"]), int(m["vae_scale_factor"])
    res = {"scheme": m.get("scheme") or "fp32", "unet_mb": _folder_mb(md.onnx("unet").parent),
           "text_encoder_mb": _folder_mb(md.onnx("text_encoder").parent), "unet": {}, "text_encoder": {}}
    t0 = time.perf_counter()
    te = OnnxModel(md.onnx("text_encoder"))
    res["text_encoder_load_s"] = round(time.perf_counter() - t0, 2)
    for b in batches:
        x = rng.standard_normal((b, 77, d), dtype=np.float32) * 0.02   # token-embedding scale
        if _fits(te, "inputs_embeds", x.shape):
            res["text_encoder"][str(b)] = _timed(lambda: te.run({"inputs_embeds": x}), repeats)
    del te
    t0 = time.perf_counter()
    unet = OnnxModel(md.onnx("unet"))
    res["unet_load_s"] = round(time.perf_counter() - t0, 2)
    res["rss_after_unet_load_gb"] = common.gib(common.current_rss_bytes())
    res["peak_rss_after_unet_load_gb"] = common.gib(common.peak_rss_bytes())   # includes graph optimization
    # Smallest shapes first: the high-water mark after each shows what that forward's activations add.
    for r in sorted(resolutions):
        res["unet"][str(r)] = {}
        for b in sorted(batches):
            feeds = {"sample": rng.standard_normal((b, ch, r // f, r // f), dtype=np.float32),
                     "timestep": _timestep(unet, b),
                     "encoder_hidden_states": rng.standard_normal((b, 77, d), dtype=np.float32)}
            if _fits(unet, "sample", feeds["sample"].shape):
                res["unet"][str(r)][str(b)] = _timed(lambda: unet.run(feeds), repeats)
                res["unet"][str(r)][str(b)]["peak_rss_gb_so_far"] = common.gib(common.peak_rss_bytes())
    res["peak_rss_gb"] = common.gib(common.peak_rss_bytes())
    return res


def run(cfg: SpeedConfig, out: str | Path, models: tuple[Path, ...] = (), merge: bool = False) -> Path:
    """Time every scheme folder (BASE-* or `models`), then the training overhead, and write one JSON.

    merge: keep the schemes already in `out` and add or replace the ones timed now.
    """
    folders = scheme_folders(MemoryConfig(base=cfg.base, models=tuple(models)))
    if not folders:
        raise FileNotFoundError(f"no zoodip model folders beside {cfg.base}: run `zoodip export {cfg.base} {cfg.base}-onnx`")
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    result = json.loads(Path(out).read_text()) if merge and Path(out).is_file() else {"schemes": {}}
    result.update({"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                   "machine": common.machine_facts()})
    result["note"] = common.load_note(result["machine"])
    args = ["--resolutions", *map(str, cfg.resolutions), "--batches", *map(str, cfg.batches),
            "--repeats", str(cfg.repeats)]
    for scheme, folder in folders.items():
        print(f"[bench.sd.speed] {scheme} ({folder}) ...", flush=True)
        res = common.run_isolated("bench.sd.speed", ["--worker", str(folder), *args],
                                  log=cfg.log_dir / f"speed_{scheme}.log", timeout=cfg.timeout_s)
        machine = res.pop("machine", {})
        res["ran_at"] = {"utc": machine.get("utc"), "loadavg_1_5_15": machine.get("loadavg_1_5_15")}
        result["schemes"][scheme] = res
        print(f"[bench.sd.speed]   unet {res['unet']}", flush=True)
    if cfg.train_steps:
        default = cfg.default_scheme if cfg.default_scheme in folders else next(iter(folders))
        print(f"[bench.sd.speed] training overhead on {default} at {cfg.train_resolution} px ...", flush=True)
        tr = common.run_isolated("bench.sd.zoodip_train", [
            str(folders[default]), "--images", str(cfg.images), "--resolution", str(cfg.train_resolution),
            "--steps", str(cfg.train_steps), "--warmup", "1"], log=cfg.log_dir / "speed_train.log",
            timeout=cfg.timeout_s)
        result["training"] = {k: tr.get(k) for k in (
            "scheme", "step_seconds", "step_stats", "forward_passes_per_step", "session_run_seconds_per_step",
            "outside_session_run_share", "session_seconds_total", "session_calls", "config", "peak_rss_gb")}
        result["training"]["resolution"] = cfg.train_resolution
    result["machine_after"] = {"loadavg_1_5_15": common.machine_facts()["loadavg_1_5_15"]}
    return common.write_json(out, result)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON file to write (e.g. bench/results/speed.json)")
    p.add_argument("--base", default=str(SpeedConfig.base))
    p.add_argument("--resolutions", type=int, nargs="+", default=list(SpeedConfig.resolutions))
    p.add_argument("--batches", type=int, nargs="+", default=list(SpeedConfig.batches))
    p.add_argument("--repeats", type=int, default=SpeedConfig.repeats)
    p.add_argument("--train-steps", type=int, default=SpeedConfig.train_steps, help="0 skips the overhead run")
    p.add_argument("--train-resolution", type=int, default=SpeedConfig.train_resolution)
    p.add_argument("--default-scheme", default=SpeedConfig.default_scheme)
    p.add_argument("--images", default=str(DEFAULT_IMAGES), help="training photos [default: procedural ones]")
    p.add_argument("--log-dir", default=str(SpeedConfig.log_dir))
    p.add_argument("--models", nargs="*", default=None, help="explicit zoodip model folders instead of BASE-*")
    p.add_argument("--merge", action="store_true", help="keep schemes already in --out, add the ones timed now")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # one folder, in a fresh process
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        res = time_folder(a.worker, a.resolutions, a.batches, a.repeats)
        res["machine"] = common.machine_facts()
        common.write_json(a.result, res)
        return
    if not a.out:
        p.error("--out is required")
    cfg = SpeedConfig(base=Path(a.base), resolutions=tuple(a.resolutions), batches=tuple(a.batches),
                      repeats=a.repeats, train_steps=a.train_steps, train_resolution=a.train_resolution,
                      default_scheme=a.default_scheme, images=default_photos() if Path(a.images) == DEFAULT_IMAGES else Path(a.images), log_dir=Path(a.log_dir))
    print(f"wrote {run(cfg, a.out, tuple(Path(m) for m in a.models or ()), a.merge)}")


if __name__ == "__main__":
    main()
