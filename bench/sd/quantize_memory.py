"""Peak RSS and wall time of building the SD 1.5 replica, exporting it and quantizing it per scheme.

    python -m bench.sd.quantize_memory --base runs/sd15 --schemes w8 w4 w8a8 --out bench/results/quantize_memory.json

Each stage is the user's command (`zoodip replica`, `zoodip export`, `zoodip quantize`) in its own
process, measured by the kernel (os.wait4 rusage of that child). Stages whose output already exists
are reused and marked "reused" without numbers (never deleted: other jobs may be using them); to
measure every stage, pass a new --base.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .. import common
from .shared import DEFAULT_IMAGES, default_photos

GOAL_GB = 12.0    # export + quantize must fit a 16 GB laptop (issue goal)


def _zoodip(*args: str) -> list[str]:
    # The console script's module, so the venv's interpreter runs it even without PATH.
    return [sys.executable, "-c", "from zoodip.cli import main; main()", *args]


def stages(base: Path, schemes: list[str], calib: Path, replica_kind: str) -> list[tuple[str, Path, list[str]]]:
    """(name, output folder, command) of every stage in order."""
    out = [("replica", base, _zoodip("replica", replica_kind, str(base))),
           ("export", Path(f"{base}-onnx"), _zoodip("export", str(base), f"{base}-onnx"))]
    for s in schemes:
        out.append((f"quantize_{s}", Path(f"{base}-{s}"),
                    _zoodip("quantize", f"{base}-onnx", f"{base}-{s}", "--scheme", s, "--calib-images", str(calib))))
    return out


def _done(folder: Path) -> bool:
    return (folder / "manifest.json").is_file() or (folder / "model_index.json").is_file()


def run(base: Path, schemes: list[str], out: str | Path, calib: Path = DEFAULT_IMAGES,
        replica_kind: str = "sd15", log_dir: Path = Path("runs/bench_logs"),
        timeout_s: float = 4 * 3600.0) -> Path:
    """Run (or reuse) each stage one at a time; write {stage: {peak_rss_gb, wall_seconds, ...}} to `out`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    result = {"base": str(base), "goal_peak_rss_gb": GOAL_GB, "stages": {}, "machine": common.machine_facts()}
    result["note"] = common.load_note(result["machine"])
    for name, folder, cmd in stages(base, schemes, calib, replica_kind):
        if _done(folder):
            result["stages"][name] = {"reused": True, "folder": str(folder)}
            print(f"[bench.sd.quantize_memory] {name}: {folder} exists, reused (not measured)", flush=True)
            continue
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} exists but is incomplete (another job may be writing it): wait, "
                                  f"or pass a new --base")
        print(f"[bench.sd.quantize_memory] {name} -> {folder} ...", flush=True)
        r = common.run_measured(cmd, log=log_dir / f"quantize_memory_{name}.log", timeout=timeout_s)
        if r["returncode"] != 0:
            raise RuntimeError(f"{name} failed (exit {r['returncode']}); see {log_dir / f'quantize_memory_{name}.log'}")
        r["peak_rss_gb"] = r["peak_rss_gb_wait4"]
        r["goal_met"] = r["peak_rss_gb"] < GOAL_GB
        result["stages"][name] = r
        print(f"[bench.sd.quantize_memory]   peak RSS {r['peak_rss_gb']} GiB, {r['wall_seconds']} s", flush=True)
        common.write_json(out, result)            # keep what is done if a later stage fails
    result["utc_end"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return common.write_json(out, result)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="runs/sd15")
    p.add_argument("--replica", default="sd15", help="replica kind for `zoodip replica` when BASE is missing")
    p.add_argument("--schemes", nargs="*", default=["w8", "w4", "w8a8"])
    p.add_argument("--calib-images", default=str(DEFAULT_IMAGES), help="calibration photos [default: procedural ones]")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    print(f"wrote {run(Path(a.base), a.schemes, a.out, default_photos() if Path(a.calib_images) == DEFAULT_IMAGES else Path(a.calib_images), a.replica)}")


if __name__ == "__main__":
    main()
