"""Scale-out on a local Ray instance (loopback only): bit-identical to single-process training, through
kill -9 of a worker, for one subject's passes on 2 workers and for train-many; bad JOBS lines; no ray.

One Ray instance serves the module (starting one takes ~10 s on 2 busy cores) and is shut down after it;
every pool kills its actors when its call returns. ZOODIP_THREADS=1 everywhere: same threads, same floats.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from zo_runtime import train as T
from zoodip.cluster import LOOPBACK_ENV, ClusterConfig
from zoodip.cluster.jobs import read_jobs

REPO = Path(__file__).resolve().parents[1]
EMBEDS = "learned_embeds.safetensors"


def quick(**kw) -> T.TrainConfig:
    base = dict(token="sks", init="dog", steps=12, tau=4, save_every=0, progress=False, schedule="paper")
    return T.TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance on loopback with 2 CPUs, for this module only; ZOODIP_THREADS=1 meanwhile."""
    os.environ.setdefault(LOOPBACK_ENV, "0")
    ray = pytest.importorskip("ray")
    threads = os.environ.get("ZOODIP_THREADS")
    os.environ["ZOODIP_THREADS"] = "1"
    ray.init(address=None, include_dashboard=False, _node_ip_address="127.0.0.1", num_cpus=2,
             log_to_driver=False, configure_logging=False, object_store_memory=100 * 2 ** 20)
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    yield ray
    ray.shutdown()
    if threads is None:
        os.environ.pop("ZOODIP_THREADS")
    else:
        os.environ["ZOODIP_THREADS"] = threads


def worker_pids(cls: str) -> list[int]:
    """Pids of this machine's Ray actor processes of class `cls` (Ray titles them ray::<class>...)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(f"ray::{cls}".encode()):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def kill_one_when(ready, cls: str, timeout: float = 120) -> int:
    """kill -9 one `cls` worker as soon as ready() holds; returns its pid."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = worker_pids(cls)
        if pids and ready():
            os.kill(pids[0], signal.SIGKILL)
            return pids[0]
        time.sleep(0.01)
    raise AssertionError(f"no {cls} worker to kill within {timeout} s")


def in_thread(fn, *args):
    """Run fn(*args) in a thread; returns (thread, result box)."""
    box = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as err:       # re-raised by the test
            box["error"] = err
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def rows(out: Path) -> list[dict]:
    return [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    """Bit for bit: learned vectors, optimizer state, every logged loss."""
    assert np.array_equal(load_file(str(a / EMBEDS))["sks"], load_file(str(b / EMBEDS))["sks"])
    with np.load(a / "checkpoint.npz") as x, np.load(b / "checkpoint.npz") as y:
        assert set(x) == set(y)
        for key in set(x) - {"config"}:                      # config: the same settings, resume aside
            assert np.array_equal(x[key], y[key]), key
    keys = ("step", "loss", "t", "grad_norm", "val_loss", "val_best")
    assert [{k: r.get(k) for k in keys} for r in rows(a)] == [{k: r.get(k) for k in keys} for r in rows(b)]


# One subject across workers: the init search and early stopping's validation on the workers, jacobian
# directions refreshed on the driver.
PARALLEL = dict(steps=40, save_every=10, directions="jacobian", prior_prompts=1, prior_rank=4, prior_refresh=4,
                early_stop=True, val_every=10, val_draws=3, patience=50, init_candidates="red,blue", init_draws=3)


@pytest.fixture(scope="module")
def single(tiny_exported, photos, tmp_path_factory, local_ray):
    """The reference: plain zoodip train in this process (1 thread)."""
    out = tmp_path_factory.mktemp("single")
    T.train(tiny_exported, photos, out, quick(**PARALLEL))
    return out


def test_two_workers_equal_one_process_bit_for_bit(tiny_exported, photos, tmp_path, single, local_ray):
    from click.testing import CliRunner

    from zoodip.cli import main

    sets = [x for k, v in PARALLEL.items() if k not in ("steps", "save_every", "directions", "early_stop")
            for x in ("--set", f"{k}={v}")]
    res = CliRunner().invoke(main, ["train", str(tiny_exported), "--images", str(photos), "--out", str(tmp_path),
                                    "--token", "sks", "--init", "dog", "--steps", "40", "--set", "save_every=10",
                                    "--directions", "jacobian", "--early-stop", "--schedule", "paper",
                                    "--workers", "2", "--set", "tau=4", "--set", "progress=false", *sets])
    assert res.exit_code == 0, res.output
    assert_same_run(single, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["config"] == \
        json.loads((single / "config.json").read_text())["config"]
    assert (tmp_path / "init_search.json").read_text() == (single / "init_search.json").read_text()


@pytest.mark.slow
def test_a_worker_killed_mid_run_changes_nothing(tiny_exported, photos, tmp_path, single, local_ray):
    from zoodip.cluster.queries import train as parallel

    thread, box = in_thread(parallel, tiny_exported, photos, tmp_path, quick(**PARALLEL), ClusterConfig(workers=2))
    log = tmp_path / "log.jsonl"
    kill_one_when(lambda: log.is_file() and len(log.read_text().splitlines()) >= 8, "QueryWorker")
    thread.join(300)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    assert len(rows(tmp_path)) == 41                           # step 0's validation row + 40 steps
    assert_same_run(single, tmp_path)


def subjects(photos: Path, root: Path) -> list[Path]:
    """Three subjects: different 3-photo subsets of the procedural photos."""
    names = sorted(p.name for p in photos.iterdir())
    folders = []
    for i, pick in enumerate((names[0:3], names[2:5], names[3:6])):
        folder = root / f"subject{i}"
        folder.mkdir(parents=True)
        for n in pick:
            shutil.copy(photos / n, folder / n)
        folders.append(folder)
    return folders


@pytest.mark.slow
def test_train_many_survives_a_killed_worker_bit_for_bit(tiny_exported, photos, tmp_path, local_ray):
    from zoodip.cluster.subjects import train_many

    folders = subjects(photos, tmp_path / "photos")
    settings = dict(steps=60, save_every=5, tau=4, schedule="paper")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"images": f"photos/{f.name}", "token": "sks", "init": "dog", **settings,
                                        "seed": i}) + "\n" for i, f in enumerate(folders)))
    out = tmp_path / "runs"
    thread, box = in_thread(train_many, tiny_exported, jobs, out, ClusterConfig(workers=2, retries=2), False)
    mid = [out / f.name / "checkpoint.npz" for f in folders]
    kill_one_when(lambda: any(c.is_file() and 10 <= T.checkpoint_step(c) < 50 for c in mid), "SubjectWorker")
    thread.join(300)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary["subjects"]] == ["done"] * 3
    assert max(r["attempts"] for r in summary["subjects"]) == 2          # the killed worker's subject, resumed
    assert "| subject0 | 60 |" in (out / "summary.md").read_text()
    for i, f in enumerate(folders):
        ref = tmp_path / "ref" / f.name
        T.train(tiny_exported, f, ref, quick(**settings, seed=i))
        assert_same_run(ref, out / f.name)
    again = train_many(tiny_exported, jobs, out, ClusterConfig(workers=2), False)    # complete: all skipped
    assert [r["status"] for r in json.loads(again.read_text())["subjects"]] == ["skipped"] * 3


def test_bad_jobs_lines_are_named_before_anything_runs(tiny_exported, photos, tmp_path):
    from zoodip.cluster.subjects import train_many

    good = {"images": str(photos), "token": "sks", "init": "dog", "steps": 3}
    lines = [json.dumps(good), "{not json", json.dumps({"images": str(photos), "token": "sks"}),
             json.dumps({**good, "out": "b", "stepz": 3}), json.dumps({**good, "out": "c", "steps": "ten"}),
             json.dumps({**good, "out": "d", "images": str(tmp_path / "nowhere")}), "",
             json.dumps({**good, "out": "e", "lr": -1.0}), json.dumps(good)]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        train_many(tiny_exported, jobs, tmp_path / "out", ClusterConfig(), False)
    msg = str(err.value)
    for n, words in ((2, "not JSON"), (3, "missing init"), (4, "unknown setting(s) stepz"),
                     (5, "steps must be int"), (6, "does not exist"), (8, "lr must be > 0"), (9, "line 1's too")):
        assert f"line {n}: " in msg and words in msg, (n, msg)
    assert "line 1:" not in msg and "line 7:" not in msg and "7 bad line(s)" in msg
    assert not (tmp_path / "out").exists()                   # nothing ran
    jobs.write_text(json.dumps(good) + "\n")
    (job,) = read_jobs(jobs, tmp_path / "out")
    assert (job.out, job.cfg.resume, job.cfg.force, job.cfg.progress) == (tmp_path / "out" / photos.name, True, True,
                                                                           False)


@pytest.mark.parametrize("args", [["train-many", "m", "jobs.jsonl", "--out", "o"],
                                  ["train", "m", "--images", "i", "--out", "o", "--token", "sks", "--init", "dog",
                                   "--workers", "2"]])
def test_without_ray_one_line_names_the_extra(tiny_exported, photos, tmp_path, args):
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"images": str(photos), "token": "sks", "init": "dog"}) + "\n")
    args = [str(tiny_exported) if a == "m" else str(photos) if a == "i" else a for a in args]
    script = ("import sys; sys.modules['ray'] = None\nfrom zoodip.cli import main\n"
              f"main({args!r})")
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "pip install 'zoodip[ray]'" in res.stderr, \
        res.stderr


def test_shares_balance_the_passes():
    from zoodip.cluster.queries import shares

    assert shares(3, 2) == [[0, 2], [1]] and shares(9, 4) == [[0, 4, 8], [1, 5], [2, 6], [3, 7]]
    assert shares(3, 8) == [[0], [1], [2]] and max(map(len, shares(9, 2))) == 5


def test_unet_calls_give_the_floats_of_the_whole_step(tiny_exported, photos, tmp_path):
    """A worker's share of the UNet calls returns exactly the losses one process gets for those passes."""
    from zo_runtime import objective as O, zo

    run = O.open_objective(tiny_exported, photos, tmp_path, quick())
    buf = O.Buffers.for_run(run)
    drawn = O.draw(run, zo.step_rng(0, 1))
    points = zo.query_points(run.v0.ravel(), 0, 1, run.cfg.zo, run.dirs)
    whole = O.point_losses(run, points, drawn, buf)
    worker = O.open_objective(tiny_exported, run.latents, None, run.cfg, role="worker")
    part = O.point_losses(worker, points, O.draw(worker, zo.step_rng(0, 1)), O.Buffers.for_run(worker), [2, 0])
    assert np.array_equal(part, whole[[2, 0]]) and len(set(whole.tolist())) == 3
    driver = O.open_objective(tiny_exported, photos, tmp_path, quick(), role="driver")
    assert driver.unet is None and np.array_equal(driver.latents.mean, run.latents.mean)
    assert driver.cfg == run.cfg


def test_workers_import_no_torch():
    """What a Ray worker imports to run its actor (zoodip.cluster's modules) leaves torch & co. out."""
    heavy = ("torch", "diffusers", "transformers", "optimum", "ray")
    script = ("import sys\nimport zoodip.cluster.queries, zoodip.cluster.subjects, zoodip.cli.cluster\n"
              f"print([m for m in {heavy!r} if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_step_time_model_reads_the_committed_results(tmp_path):
    """bench.ray.model on the committed measurements: its formula, and the SD 1.5 rows docs/scale_out.md quotes."""
    from bench.ray import model

    parts = {"pass": 2.0, "te": lambda P: 0.1 * P, "drv": 0.5, "msg": 0.25}
    assert model.step_time(parts, 9, None) == pytest.approx(0.5 + 0.9 + 18)
    assert model.step_time(parts, 9, 4) == pytest.approx(0.5 + 0.25 + 0.9 + 3 * 2.0)     # ceil(9 / 4) passes
    te, fit = model.linear({1: 0.3, 3: 0.5})
    assert te(5) == pytest.approx(0.7) and fit == {"a": 0.2, "b": 0.1}
    model.main(["--scaling", str(REPO / "bench/results/ray_scaling.json"), "--speed",
                str(REPO / "bench/results/speed_current.json"), "--out", str(tmp_path / "m.json")])
    rows = json.loads((tmp_path / "m.json").read_text())["sd15_w8_512"]["predict"]["rows"]
    got = {(r["workers"], r["queries"]): r["step_seconds"] for r in rows}
    assert got[(3, 2)] == pytest.approx(8.0, abs=0.05) and got[(9, 8)] == pytest.approx(8.4, abs=0.05)
