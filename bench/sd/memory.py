"""Peak RSS and step time: zoodip training per scheme vs a PyTorch Textual Inversion step, side by side.

    python -m bench.sd.memory --resolution 512 --out bench/results/memory_512.json

Every contender runs in its own fresh subprocess (bench.sd.zoodip_train, bench.torch_ti), one at a
time, so each peak RSS is that process's own. Model folders follow one naming scheme:
BASE (diffusers, for torch_ti), BASE-onnx (fp32 export), BASE-w8, BASE-w8-fast, BASE-w4, BASE-w8a8, BASE-fp16.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import common
from .shared import DEFAULT_IMAGES, GOAL_RSS_RATIO, default_photos

# Folder suffix -> scheme, in the order they are run and shown (fp32 first: the unquantized baseline).
SCHEME_SUFFIXES = {"onnx": "fp32", "w8": "w8", "w8-fast": "w8-fast", "w4": "w4", "w8a8": "w8a8", "fp16": "fp16"}


@dataclass(frozen=True)
class MemoryConfig:
    base: Path = Path("runs/sd15")        # the SD 1.5 replica and its exports beside it
    resolution: int = 512                 # the goals are stated at 512 px
    images: Path = DEFAULT_IMAGES
    default_scheme: str = "w8"            # zoodip's default; replaced by the quantizer's choice when it names one
    zoodip_steps: int = 4                 # 1 warm-up + 3 timed: one fp32 step at 512 px is ~15 s here
    unet_batch: tuple[str, ...] = ("default",)   # trainer's --unet-batch variants: default|batch|single
    ti_steps: int = 3                     # timed TI steps after 1 warm-up; ~9 s each at 512 px
    contenders: tuple[str, ...] = ("zoodip", "torch_ti")
    timeout_s: float = 3600.0             # one contender; SD 1.5 at 512 px on 2 busy cores is slow
    log_dir: Path = Path("runs/bench_logs")
    models: tuple[Path, ...] = field(default_factory=tuple)  # explicit zoodip folders; default: BASE-*

    def __post_init__(self):
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"resolution {self.resolution} must be a positive multiple of 8 (SD: 64)")
        bad = set(self.contenders) - {"zoodip", "torch_ti"}
        if bad:
            raise ValueError(f"unknown contenders {sorted(bad)}: choose from zoodip, torch_ti")
        if set(self.unet_batch) - {"default", "batch", "single"}:
            raise ValueError(f"unet_batch {self.unet_batch} must be among default, batch, single")
        if self.zoodip_steps < 2 or self.ti_steps < 1:
            raise ValueError("zoodip_steps must be >= 2 (one warm-up) and ti_steps >= 1")


def scheme_folders(cfg: MemoryConfig) -> dict[str, Path]:
    """scheme -> zoodip model folder, for every BASE-<suffix> (or --models) folder holding a manifest."""
    found = {}
    candidates = cfg.models or tuple(Path(f"{cfg.base}-{suffix}") for suffix in SCHEME_SUFFIXES)
    for folder in candidates:
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            continue
        scheme = json.loads(manifest.read_text()).get("scheme") or "fp32"
        found[scheme] = folder
    return found


def gates_passed(folder: Path) -> bool | None:
    """The quantizer's fidelity verdict (None for an unquantized export): a failed model trains, but badly."""
    gates = json.loads((folder / "manifest.json").read_text()).get("gates")
    return gates.get("passed") if isinstance(gates, dict) else None


def _log(cfg: MemoryConfig, name: str) -> Path:
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    return cfg.log_dir / f"memory_{cfg.resolution}_{name.replace(' ', '_')}.log"


def run_zoodip(cfg: MemoryConfig, folder: Path, name: str, unet_batch: str = "default") -> dict:
    args = [str(folder), "--images", str(cfg.images), "--resolution", str(cfg.resolution),
            "--steps", str(cfg.zoodip_steps), "--warmup", "1"]
    if unet_batch != "default":
        args += ["--unet-batch", unet_batch]
    return common.run_isolated("bench.sd.zoodip_train", args, log=_log(cfg, name), timeout=cfg.timeout_s)


def run_torch_ti(cfg: MemoryConfig) -> dict:
    if not (cfg.base / "model_index.json").is_file():
        raise FileNotFoundError(f"{cfg.base} is not a diffusers folder: run `zoodip replica sd15 {cfg.base}`")
    args = [str(cfg.base), "--images", str(cfg.images), "--resolution", str(cfg.resolution),
            "--steps", str(cfg.ti_steps), "--warmup", "1"]
    return common.run_isolated("bench.torch_ti", args, log=_log(cfg, "torch_ti"), timeout=cfg.timeout_s)


def _slim(res: dict) -> dict:
    """Per-process machine facts -> just the time and load it ran under (the rest is kept once at the top)."""
    machine = res.pop("machine", {})
    res["ran_at"] = {"utc": machine.get("utc"), "loadavg_1_5_15": machine.get("loadavg_1_5_15")}
    return res


def summarize(result: dict) -> dict:
    """Ratios against the goals: torch_ti / zoodip peak RSS; step time over its session.run time."""
    ti = result.get("torch_ti", {}).get("peak_rss_gb")
    out = {"rss_ratio_goal": GOAL_RSS_RATIO, "rss_ratio_vs_torch_ti": {}}
    for scheme, res in result["schemes"].items():
        if ti and res.get("peak_rss_gb"):
            out["rss_ratio_vs_torch_ti"][scheme] = round(ti / res["peak_rss_gb"], 2)
    zo = result.get("zoodip", {})
    if ti and zo.get("peak_rss_gb"):
        out["default_rss_ratio"] = round(ti / zo["peak_rss_gb"], 2)
        out["rss_goal_met"] = out["default_rss_ratio"] >= GOAL_RSS_RATIO
    return out


def run(cfg: MemoryConfig, out: str | Path, merge: bool = False) -> Path:
    """Run every contender one at a time and write the combined JSON to `out`.

    merge: keep the contenders already in `out` (same resolution) and add or replace the ones run now,
    so a long benchmark can be run piece by piece as model folders appear.
    """
    folders = scheme_folders(cfg)
    if "zoodip" in cfg.contenders and not folders:
        raise FileNotFoundError(f"no zoodip model folders beside {cfg.base} (expected {cfg.base}-onnx, -w8, ...): "
                                f"run `zoodip export {cfg.base} {cfg.base}-onnx` first")
    result = {"schemes": {}}
    if merge and Path(out).is_file():
        result = json.loads(Path(out).read_text())
        if result.get("resolution") != cfg.resolution:
            raise ValueError(f"{out} holds a {result.get('resolution')} px run; merge only runs at the same resolution")
    result.update({"resolution": cfg.resolution, "config": _jsonable(asdict(cfg)),
                   "machine": common.machine_facts()})
    result["note"] = common.load_note(result["machine"])
    t0 = time.perf_counter()
    if "zoodip" in cfg.contenders:
        for scheme, folder in folders.items():
            for ub in cfg.unet_batch:
                # Key: the scheme, plus the UNet batching when it is not the trainer's default.
                key = scheme if ub == "default" else f"{scheme} unet-batch={ub}"
                print(f"[bench.sd.memory] zoodip {key} ({folder}) at {cfg.resolution} px ...", flush=True)
                result["schemes"][key] = _slim(run_zoodip(cfg, folder, key, ub))
                result["schemes"][key]["gates_passed"] = gates_passed(folder)
                _report(key, result["schemes"][key])
    if result["schemes"]:
        schemes = result["schemes"]
        plain = [k for k in schemes if " " not in k] or list(schemes)    # trainer-default batching first
        default = cfg.default_scheme if cfg.default_scheme in schemes else plain[0]
        result["default_scheme"] = default
        result["zoodip"] = schemes[default]
    if "torch_ti" in cfg.contenders:
        print(f"[bench.sd.memory] torch_ti ({cfg.base}) at {cfg.resolution} px ...", flush=True)
        result["torch_ti"] = _slim(run_torch_ti(cfg))
        _report("torch_ti", result["torch_ti"])
    result["summary"] = summarize(result)
    result["bench_wall_seconds"] = round(time.perf_counter() - t0, 1)
    result["machine_after"] = {"loadavg_1_5_15": common.machine_facts()["loadavg_1_5_15"]}
    return common.write_json(out, result)


def _report(name: str, res: dict) -> None:
    print(f"[bench.sd.memory]   {name}: peak RSS {res.get('peak_rss_gb')} GiB, step {res.get('step_seconds')} s, "
          f"{res.get('forward_passes_per_step')} forward passes/step", flush=True)


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, tuple) else v)
            for k, v in d.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=MemoryConfig.resolution)
    p.add_argument("--out", required=True, help="JSON file to write (e.g. bench/results/memory_512.json)")
    p.add_argument("--base", default=str(MemoryConfig.base), help="diffusers replica; BASE-onnx, BASE-w8 ... beside it")
    p.add_argument("--models", nargs="*", default=None, help="explicit zoodip model folders instead of BASE-*")
    p.add_argument("--images", default=str(DEFAULT_IMAGES), help="training photos [default: procedural ones]")
    p.add_argument("--default-scheme", default=MemoryConfig.default_scheme)
    p.add_argument("--zoodip-steps", type=int, default=MemoryConfig.zoodip_steps)
    p.add_argument("--unet-batch", nargs="+", default=list(MemoryConfig.unet_batch),
                   choices=["default", "batch", "single"], help="trainer --unet-batch variants to run per scheme")
    p.add_argument("--ti-steps", type=int, default=MemoryConfig.ti_steps)
    p.add_argument("--only", choices=["zoodip", "torch_ti"], default=None)
    p.add_argument("--log-dir", default=str(MemoryConfig.log_dir))
    p.add_argument("--merge", action="store_true", help="keep contenders already in --out, add the ones run now")
    a = p.parse_args(argv)
    cfg = MemoryConfig(base=Path(a.base), resolution=a.resolution, images=default_photos() if Path(a.images) == DEFAULT_IMAGES else Path(a.images),
                       default_scheme=a.default_scheme, zoodip_steps=a.zoodip_steps, unet_batch=tuple(a.unet_batch), ti_steps=a.ti_steps,
                       contenders=(a.only,) if a.only else MemoryConfig.contenders, log_dir=Path(a.log_dir),
                       models=tuple(Path(m) for m in a.models or ()))
    print(f"wrote {run(cfg, a.out, merge=a.merge)}")


if __name__ == "__main__":
    main()
