"""Scale-out on a local Ray instance, toy model: one subject's step time on W workers, train-many throughput,
per-step messaging latency, and the parts the step-time model (bench.ray.model) is built from.

    python -m models.toyworld.concept runs/ray/photos/c0 --index 0      # ... c1, c2, c3 (--index 1, 2, 3)
    zoodip export models/toyworld/pipeline runs/ray/toy-onnx
    python -m bench.ray.scaling --model runs/ray/toy-onnx --photos runs/ray/photos --out bench/results/ray_scaling.json

Contenders of one subject (same settings, `--schedule paper`: gaussian directions): one process at 1 and
2 onnxruntime threads (fresh subprocesses), and `zoodip.cluster.queries.train` with W = 1, 2 workers x 1
thread (this process is the driver). Step time = median of the logged per-step seconds after the first 5
steps; rounds interleave the contenders so a neighbour's load hits them alike. Bit-identity of W = 2 with
one process at 1 thread is checked on every round.

This machine's 2 cores are shared (load averages of 4-8 while these ran), so wall times of 2 workers are
taken with other jobs on their cores. Each contender therefore also records the CPU seconds of every
step's passes where they run (one process: text encoder + P UNet passes; a worker: text encoder + its
share), and `cpu_path` estimates the step on dedicated cores: the driver's own time + the measured
messaging round trip + the largest worker's CPU seconds (an upper bound for the one-thread contenders).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # loopback (zoodip.cluster.LOOPBACK_ENV)
os.environ["ZOODIP_THREADS"] = os.environ.get("ZOODIP_THREADS") or "1"

import numpy as np  # noqa: E402

from .. import common  # noqa: E402

SKIP = 5                       # first steps left out of a step-time median (start-up costs)


def _cfg(queries: int, steps: int, seed: int = 0):
    from zo_runtime.train_config import TrainConfig
    return TrainConfig(token="sks", init="circle", steps=steps, queries=queries, save_every=0, progress=False,
                       schedule="paper", seed=seed)


def step_seconds(out: Path) -> float:
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    return float(np.median([r["seconds"] for r in rows if r["step"] > SKIP]))


def worker_single(model: str, images: str, out: str, queries: int, steps: int) -> None:
    """One subject in this process (ZOODIP_THREADS from the environment); OUT/cpu.json: each step's CPU s."""
    from zo_runtime.objective import Local
    from zo_runtime.train import train

    class Timed(Local):
        cpu: dict = {}

        def losses(self, run, step, points, drawn, buf):
            return _cpu_timed(self.cpu, step, super().losses, run, step, points, drawn, buf)
    local = Timed()
    train(model, images, out, _cfg(queries, steps), evaluator=local)
    common.write_json(Path(out) / "cpu.json", local.cpu)


def _cpu_timed(record: dict, step: int, fn, *args):
    """fn(*args), adding its CPU seconds (this process, all threads) to record[step]."""
    c0 = time.process_time()
    out = fn(*args)
    record[step] = record.get(step, 0.0) + time.process_time() - c0
    return out


def _timed_worker():
    """QueryWorker recording each step's CPU seconds (a class made on use: Ray pickles it by value)."""
    from zoodip.cluster.queries import QueryWorker

    class TimedWorker(QueryWorker):
        def losses(self, step, points, calls):
            self.__dict__.setdefault("cpu", {})
            return _cpu_timed(self.cpu, step, super().losses, step, points, calls)

        def cpu_seconds(self) -> dict:
            return self.__dict__.get("cpu", {})
    return TimedWorker


def parallel_timed(ray, model: str, images: str, out: Path, cfg, workers: int) -> list[dict]:
    """zoodip.cluster.queries.train on `workers` timed workers; each worker's {step: CPU seconds}."""
    from zo_runtime.train import train
    from zoodip.cluster import ClusterConfig
    from zoodip.cluster.queries import Remote

    remote = Remote(ray, ClusterConfig(workers=workers))
    remote.worker = _timed_worker()
    try:
        train(model, images, out, cfg, evaluator=remote)
        return ray.get([a.cpu_seconds.remote() for a in remote.pool.actors])
    finally:
        remote.close()


def cpu_path(out: Path, per_worker: list[dict], msg: float) -> float:
    """Median over steps of: the driver's own step time (outside its losses call) + msg + the largest share's
    CPU seconds (one process: per_worker is its own record and msg 0)."""
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    return float(np.median([r["seconds"] - r["session_seconds"] + msg
                            + max(w.get(r["step"], w.get(str(r["step"]), 0.0)) for w in per_worker)
                            for r in rows if r["step"] > SKIP]))


def worker_components(model: str, images: str, result: Path) -> None:
    """Median wall and CPU seconds of one UNet pass and of the text encoder on P rows (the trainer's calls)."""
    import tempfile

    from zo_runtime import objective as O, zo
    run = O.open_objective(model, images, Path(tempfile.mkdtemp()), _cfg(8, 10))
    drawn, buf = O.draw(run, zo.step_rng(0, 1)), O.Buffers.for_run(run)
    emb = np.repeat(drawn[1][None], 9, axis=0)
    hidden = O.encode_text(run, emb)
    out = {"text_encoder": {}}
    for P in (1, 2, 3, 4, 9):
        out["text_encoder"][P] = _medians(lambda: run.text.encode_embeds(emb[:P]), 30)
    out["unet_pass"] = _medians(lambda: O.unet_losses(run, hidden, drawn[4], drawn[3], drawn[5], buf.sample, [0]), 30)
    common.write_json(result, out)


def worker_sessions(model: str, images: str, result: Path, repeats: int = 7) -> None:
    """Seconds to open a run with new sessions vs with the sessions a train-many worker keeps (objective.Sessions)."""
    import tempfile

    from zo_runtime import objective as O
    out, cfg, kept = Path(tempfile.mkdtemp()), _cfg(2, 10), O.Sessions()
    O.open_objective(model, images, out, cfg, sessions=kept)           # latents cached, sessions kept
    new = [_time(lambda: O.open_objective(model, images, out, cfg)) for _ in range(repeats)]
    warm = [_time(lambda: O.open_objective(model, images, out, cfg, sessions=kept)) for _ in range(repeats)]
    common.write_json(result, {"machine": common.machine_facts(), "open_new_sessions": common.time_stats(new),
                               "open_kept_sessions": common.time_stats(warm)})


def _medians(fn, repeats: int) -> dict:
    """{"wall": median seconds, "cpu": median CPU seconds} of fn() over `repeats` calls after a warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall": round(float(np.median(wall)), 6), "cpu": round(float(np.median(cpu)), 6)}


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _subprocess(args: list[str], threads: int, log: Path) -> dict:
    env = {**os.environ, "ZOODIP_THREADS": str(threads)}
    proc = common.run_measured([sys.executable, "-m", "bench.ray.scaling", *args], log, 3600, env)
    if proc["returncode"]:
        raise RuntimeError(f"{proc['command']} failed; see {log}")
    return proc


def messaging(ray, points_shape: tuple[int, int], workers: int, repeats: int = 300) -> dict:
    """Round trip of one step's messages: W concurrent calls carrying (P, D) float32 points, P floats back."""
    from zoodip.cluster import ClusterConfig
    from zoodip.cluster.pool import Pool
    from zoodip.cluster.queries import shares

    pool = Pool(ray, Echo, (), workers, ClusterConfig(workers=workers))
    try:
        points = np.zeros(points_shape, np.float32)
        parts = shares(points_shape[0], workers)
        tasks = [lambda a, c=c: a.losses.remote(1, points, c) for c in parts]
        secs = [_time(lambda: pool.run(tasks)) for _ in range(repeats)]
    finally:
        pool.close()
    return common.time_stats(secs[10:])


class Echo:
    """A worker with QueryWorker's call signature and no model: what is left is messaging."""

    def info(self) -> dict:
        return {"pid": os.getpid()}

    def losses(self, step: int, points: np.ndarray, calls: list[int]) -> np.ndarray:
        return np.zeros(len(calls))


def one_subject(args, ray, work: Path, msg: dict) -> dict:
    """Step time of each contender for n in args.queries, over args.rounds interleaved rounds: wall (under the
    machine's load) and cpu_path (on dedicated cores, see the module doc)."""
    from safetensors.numpy import load_file

    images, out = str(args.photos / "c0"), {}
    for n in args.queries:
        names = ("process_1t", "process_2t", "ray_w1", "ray_w2")
        wall, cpu, same = {k: [] for k in names}, {k: [] for k in names if k != "process_2t"}, []
        for r in range(args.rounds):
            for threads in (1, 2):
                o = work / f"n{n}-p{threads}-r{r}"
                _subprocess(["--worker", "single", "--model", str(args.model), "--images", images, "--run", str(o),
                             "--n", str(n), "--steps", str(args.steps)], threads, work / "single.log")
                wall[f"process_{threads}t"].append(step_seconds(o))
                if threads == 1:        # 2 threads: CPU seconds count both threads (and their spin-waits)
                    cpu["process_1t"].append(cpu_path(o, [json.loads((o / "cpu.json").read_text())], 0.0))
            for w in (1, 2):
                o = work / f"n{n}-w{w}-r{r}"
                per_worker = parallel_timed(ray, str(args.model), images, o, _cfg(n, args.steps), w)
                wall[f"ray_w{w}"].append(step_seconds(o))
                cpu[f"ray_w{w}"].append(cpu_path(o, per_worker, msg[f"W{w}_P{n + 1}"]["median"]))
            ref = load_file(str(work / f"n{n}-p1-r{r}" / "learned_embeds.safetensors"))["sks"]
            got = load_file(str(work / f"n{n}-w2-r{r}" / "learned_embeds.safetensors"))["sks"]
            same.append(bool(np.array_equal(ref, got)))
        out[f"n{n}"] = {"passes": n + 1, "wall": _summary(wall), "cpu_path": _summary(cpu),
                        "w2_bit_identical_to_process_1t": same}
        print(json.dumps({f"n{n}": {"wall": out[f"n{n}"]["wall"]["median"],
                                    "cpu_path": out[f"n{n}"]["cpu_path"]["median"]}}), flush=True)
    return out


def _summary(got: dict) -> dict:
    """Medians of each contender's rounds, and the speedups the goals name."""
    med = {k: round(float(np.median(v)), 5) for k, v in got.items()}
    return {"median": med, "rounds": {k: [round(x, 5) for x in v] for k, v in got.items()},
            "speedup_w2_vs_w1": round(med["ray_w1"] / med["ray_w2"], 3),
            "speedup_w2_vs_process_2t": round(med["process_2t"] / med["ray_w2"], 3) if "process_2t" in med else None,
            "ray_w1_over_process_1t": round(med["ray_w1"] / med["process_1t"], 3)}


def write_jobs(args, work: Path) -> Path:
    jobs = work / "jobs.jsonl"
    folders = sorted(p for p in args.photos.iterdir() if p.is_dir())[:args.subjects]
    jobs.write_text("".join(json.dumps({"images": str(f.resolve()), "token": "sks", "init": "circle",
                                        "steps": args.many_steps, "schedule": "paper", "save_every": 100,
                                        "seed": i}) + "\n" for i, f in enumerate(folders)))
    return jobs


def worker_sequential(model: str, jobs: str, out: str) -> None:
    """The subjects of JOBS one after another in this process: plain train() calls."""
    from zo_runtime.train import train
    from zoodip.cluster.jobs import read_jobs
    for job in read_jobs(jobs, out):
        train(model, job.images, job.out, job.cfg)


def many_subjects(args, ray, work: Path) -> dict:
    """Wall time of the subjects one after another in one process vs train-many at W = 1 and 2 (Ray running)."""
    from zoodip.cluster import ClusterConfig
    from zoodip.cluster.subjects import train_many

    jobs, got = write_jobs(args, work), {"sequential": [], "train_many_w1": [], "train_many_w2": []}
    for r in range(args.rounds):
        o = work / f"seq-r{r}"
        got["sequential"].append(_subprocess(["--worker", "sequential", "--model", str(args.model), "--jobs",
                                              str(jobs), "--run", str(o)], 1, work / "seq.log")["wall_seconds"])
        for w in (1, 2):
            t0 = time.perf_counter()
            train_many(args.model, jobs, work / f"many-w{w}-r{r}", ClusterConfig(workers=w), progress=False)
            got[f"train_many_w{w}"].append(round(time.perf_counter() - t0, 2))
        print(json.dumps({k: v[-1] for k, v in got.items()}), flush=True)
    med = {k: float(np.median(v)) for k, v in got.items()}
    return {"subjects": args.subjects, "steps_each": args.many_steps, "wall_seconds": med, "rounds": got,
            "w1_over_sequential": med["train_many_w1"] / med["sequential"],
            "speedup_w2_vs_sequential": med["sequential"] / med["train_many_w2"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("runs/ray/toy-onnx"))
    p.add_argument("--photos", type=Path, default=Path("runs/ray/photos"), help="folders of concept photos")
    p.add_argument("--out", type=Path, default=Path("bench/results/ray_scaling.json"))
    p.add_argument("--work", type=Path, default=Path("runs/ray/bench"))
    p.add_argument("--queries", type=int, nargs="+", default=[2, 3, 8])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--many-steps", type=int, default=150)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--parts", nargs="+", default=["one", "many"], help="messaging is always measured")
    p.add_argument("--worker", choices=("single", "components", "sequential", "sessions"),
                   help="run one part in this process (sessions: python -m bench.ray.scaling --worker sessions "
                        "--images runs/ray/photos/c0 --result bench/results/ray_sessions.json)")
    for name in ("--images", "--run", "--jobs"):          # a --worker's arguments
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "single":
        return worker_single(str(args.model), args.images, args.run, args.n, args.steps)
    if args.worker == "components":
        return worker_components(str(args.model), args.images, args.result)
    if args.worker == "sessions":
        return worker_sessions(str(args.model), args.images, args.result)
    if args.worker == "sequential":
        return worker_sequential(str(args.model), args.jobs, args.run)
    run_all(args)


def run_all(args) -> None:
    from zoodip.cluster import ClusterConfig, connect

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    result = {"machine": common.machine_facts(), "config": {k: str(v) if isinstance(v, Path) else v
                                                             for k, v in vars(args).items() if v is not None}}
    result["note"] = common.load_note(result["machine"])
    result["components_1_thread"] = common.run_isolated(
        "bench.ray.scaling", ["--worker", "components", "--model", str(args.model), "--images",
                              str(args.photos / "c0")], env={**os.environ, "ZOODIP_THREADS": "1"})
    t0 = time.perf_counter()
    ray, _ = connect(ClusterConfig())
    result["ray_start_seconds"] = round(time.perf_counter() - t0, 2)
    try:
        result["messaging_seconds"] = {f"W{w}_P{n + 1}": messaging(ray, (n + 1, 768), w)
                                       for w in (1, 2) for n in args.queries}
        if "one" in args.parts:
            result["one_subject"] = one_subject(args, ray, args.work, result["messaging_seconds"])
        if "many" in args.parts:
            result["many_subjects"] = many_subjects(args, ray, args.work)
    finally:
        ray.shutdown()
    result["machine_after"] = {"loadavg_1_5_15": list(os.getloadavg())}
    common.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
