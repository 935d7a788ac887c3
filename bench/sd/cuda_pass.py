"""UNet pass and training step on onnxruntime's CUDA execution provider: session.run vs IOBinding, GPU memory.

    python -m bench.sd.cuda_pass runs/sd15-onnx runs/sd15-fp16 runs/sd15-w8 --images PHOTOS \\
        --resolution 512 --train-steps 100 --out bench/results/cuda_sd15.json

Needs onnxruntime-gpu (it replaces onnxruntime; use its own venv) and nvidia-smi. Per model folder, each in its
own fresh process: the UNet pass at batch 1 (median of --repeats after one warm-up) through session.run (numpy
in, numpy out: a host-device copy of every input and output on each call) and through IOBinding (inputs placed
on the GPU once, output left there), with the largest difference between the two outputs; then a zoodip
training run of --train-steps steps on the same provider (the trainer's own step times, first step left out).
Peak GPU memory is the highest `nvidia-smi` memory.used seen while each process ran, minus what was in use
before it started (onnxruntime's CUDA arena keeps what it took, so this is the run's footprint).
The reference trained SD 1.5 for 30,000 steps in 31 min on an RTX 3090 (method.md): 0.062 s a step.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .. import common

REFERENCE_STEP_S = 31 * 60 / 30_000      # the reference on an RTX 3090 (fp16 PyTorch, SD 1.5, 512 px)


def cuda_available() -> bool:
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers()


def gpu_memory_used_mib() -> float | None:
    """memory.used of GPU 0 in MiB, or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_mib(out.stdout) if out.returncode == 0 else None


def parse_mib(text: str) -> float | None:
    """nvidia-smi's "12345\\n" (MiB) -> 12345.0; None when it is not a number."""
    try:
        return float(text.strip().splitlines()[0])
    except (ValueError, IndexError):
        return None


class GpuPeak:
    """Highest memory.used while the block runs, sampled every `every` seconds, less the level at entry."""

    def __init__(self, every: float = 0.25):
        self.every, self.base, self.peak, self._stop = every, None, None, threading.Event()

    def __enter__(self):
        self.base = gpu_memory_used_mib()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            used = gpu_memory_used_mib()
            if used is not None:
                self.peak = used if self.peak is None else max(self.peak, used)
            self._stop.wait(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def result_gib(self) -> float | None:
        if self.peak is None:
            return None
        return round((self.peak - (self.base or 0.0)) / 1024, 3)


def typed_feeds(model, resolution: int) -> dict:
    """The trainer's UNet inputs (bench.sd.fast_pass.unet_feeds) cast to the dtypes the graph declares (fp16)."""
    from zo_runtime.session import ORT_DTYPES
    from .fast_pass import unet_feeds
    return {k: v.astype(ORT_DTYPES[model.inputs[k].type]) for k, v in unet_feeds(model, resolution).items()}


def time_cuda_pass(folder: str, resolution: int, repeats: int, provider: str = "cuda") -> dict:
    """One model's UNet pass on CUDA: session.run vs IOBinding (seconds, and their outputs' largest difference).
    provider "cpu" runs the same code with host buffers (how the tests check it without a GPU)."""
    import onnxruntime as ort
    from .fast_pass import _Unet

    model = _Unet(folder, {"provider": provider})
    device = "cuda" if provider == "cuda" else "cpu"
    feeds = typed_feeds(model, resolution)
    io = model.session.io_binding()
    for name, value in feeds.items():
        io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
    out_name = model.session.get_outputs()[0].name
    io.bind_output(out_name, device, 0)

    def timed(call) -> list[float]:
        call()                                            # warm-up: kernels, cuDNN algorithm search
        secs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            secs.append(time.perf_counter() - t0)
        return secs

    run_s = timed(lambda: model.run(feeds))
    bound_s = timed(lambda: model.session.run_with_iobinding(io))
    via_run = model.run(feeds)[0].astype(np.float32)
    via_io = io.copy_outputs_to_cpu()[0].astype(np.float32)
    return {"provider": model.provider, "run_s": common.time_stats(run_s), "iobinding_s": common.time_stats(bound_s),
            "iobinding_over_run": round(float(np.median(bound_s) / np.median(run_s)), 4),
            "run_vs_iobinding_max_abs": float(np.max(np.abs(via_run - via_io)))}


def measure(folder: Path, images: str, resolution: int, repeats: int, train_steps: int, log_dir: Path) -> dict:
    """Pass and training of one folder, each in a fresh process with the GPU's peak memory around it."""
    cmds = {"pass": ["-m", "bench.sd.cuda_pass", "worker", str(folder), "--resolution", str(resolution),
                     "--repeats", str(repeats)]}
    if train_steps > 0:
        cmds["train"] = ["-m", "bench.sd.zoodip_train", str(folder), "--images", images, "--resolution",
                         str(resolution), "--steps", str(train_steps + 1), "--warmup", "1", "--provider", "cuda"]
    out = {"model": str(folder)}
    with tempfile.TemporaryDirectory(prefix="zoodip-cuda-") as tmp:
        for kind, args in cmds.items():
            result = Path(tmp) / f"{kind}.json"
            with GpuPeak() as gpu:
                proc = common.run_measured([sys.executable, *args, "--result", str(result)],
                                           log_dir / f"cuda_{folder.name}_{kind}.log")
            out[kind] = json.loads(result.read_text()) if result.is_file() else {"error": proc}
            out[kind]["gpu_peak_gib"] = gpu.result_gib()
    step = out.get("train", {}).get("step_seconds")
    if step:
        out["step_over_reference"] = round(step / REFERENCE_STEP_S, 2)
        out["30000_steps_hours"] = round(step * 30_000 / 3600, 2)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path, help="zoodip model folders (fp32 export, fp16, w8, ...)")
    p.add_argument("--images", help="training photos (needed unless --train-steps 0)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--out", type=Path)
    p.add_argument("--log-dir", type=Path, default=Path("runs/bench_logs"))
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)     # worker: one folder's pass
    argv = sys.argv[1:] if argv is None else argv
    worker = argv[:1] == ["worker"]
    a = p.parse_args(argv[1:] if worker else argv)
    if not cuda_available():
        raise SystemExit("CUDAExecutionProvider is not in this onnxruntime build: install onnxruntime-gpu in its "
                         "own venv (it replaces onnxruntime) on a machine with an NVIDIA GPU")
    if worker:
        common.write_json(a.result, time_cuda_pass(str(a.models[0]), a.resolution, a.repeats))
        return
    if not a.out or (a.train_steps > 0 and not a.images):
        p.error("--out is required, and --images unless --train-steps 0")
    a.log_dir.mkdir(parents=True, exist_ok=True)
    res = {"what": __doc__.splitlines()[0], "command": "python -m bench.sd.cuda_pass " + " ".join(argv),
           "reference_step_s": round(REFERENCE_STEP_S, 4), "machine": common.machine_facts(), "models": []}
    for folder in a.models:
        res["models"].append(measure(folder, a.images, a.resolution, a.repeats, a.train_steps, a.log_dir))
        common.write_json(a.out, res)
        m = res["models"][-1]
        print(f"{folder}: pass {m['pass'].get('run_s', {}).get('median')} s (IOBinding "
              f"{m['pass'].get('iobinding_s', {}).get('median')} s), step {m.get('train', {}).get('step_seconds')} s, "
              f"GPU {m.get('train', {}).get('gpu_peak_gib')} GiB", flush=True)


if __name__ == "__main__":
    main()
