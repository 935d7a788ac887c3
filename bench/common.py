"""Shared benchmark plumbing: machine facts, peak RSS, isolated worker processes, JSON output.

Peak RSS is the process's own accounting: the kernel's high-water mark (`ru_maxrss`, `VmHWM`),
which counts every page the process ever had resident (weights, activations, arenas), so it is
the number that decides whether a run fits in a laptop's memory.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

from zo_runtime.io_utils import atomic_write_json

GIB = 2 ** 30
# Packages whose versions decide the numbers; read from metadata so nothing heavy is imported.
PACKAGES = ("numpy", "onnxruntime", "onnx", "torch", "diffusers", "transformers", "optimum", "optimum-onnx")


def load_note(machine: dict) -> str:
    """What a result says about its timing conditions, from the load average `machine_facts` recorded at its
    start (a constant "loaded machine" note was also stamped on quiet runs)."""
    load, cores = machine["loadavg_1_5_15"][0], machine["usable_cores"]
    return (f"load average {load:.2f} on {cores} cores when the run started (other jobs share this machine): "
            "times taken beside other work are upper bounds; peak RSS is per process and unaffected")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * 1024 / GIB, 2)
    except OSError:
        pass
    return None


def machine_facts() -> dict:
    """CPU model, cores, memory, OS, Python and package versions, load average at the time of the call."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gib": _mem_total_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's high-water resident set: /proc VmHWM, else ru_maxrss.

    VmHWM first: after a vfork+exec, Linux folds the parent's peak into the child's ru_maxrss,
    while VmHWM belongs to the child's own address space only.
    """
    hwm = _proc_status_kib("VmHWM")
    if hwm:
        return hwm * 1024
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024  # macOS reports bytes, Linux KiB


def current_rss_bytes() -> int:
    kib = _proc_status_kib("VmRSS")
    return (kib or 0) * 1024


def gib(n_bytes: float) -> float:
    return round(n_bytes / GIB, 3)


class RssSampler:
    """Samples this process's RSS every `period` s in a thread; `mark(label)` records the phase boundaries."""

    def __init__(self, period: float = 0.25):
        self.period = period
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, int]] = []    # (seconds since start, rss bytes)
        self.marks: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, current_rss_bytes()))
            self._stop.wait(self.period)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def mark(self, label: str) -> None:
        """Phase boundary: seconds since start, current RSS and the high-water mark so far."""
        self.marks[label] = {"t": round(time.perf_counter() - self.t0, 2), "rss_gb": gib(current_rss_bytes()),
                             "peak_rss_gb": gib(peak_rss_bytes())}

    def peak_between(self, start: str, end: str | None = None) -> float | None:
        """Largest sampled RSS (GiB) between two marks: e.g. the steady training phase without set-up."""
        lo = self.marks.get(start, {}).get("t")
        hi = self.marks.get(end, {}).get("t", float("inf")) if end else float("inf")
        vals = [r for t, r in self.samples if lo is not None and lo <= t <= hi]
        return gib(max(vals)) if vals else None

    def peak_after(self, t: float) -> float | None:
        """Largest sampled RSS (GiB) from `t` seconds after the start on (e.g. once training steps begin)."""
        vals = [r for s, r in self.samples if s >= t]
        return gib(max(vals)) if vals else None

    def timeline(self, points: int = 120) -> list[list[float]]:
        """Down-sampled [[t, rss_gb], ...] for plots: the max of each bucket of k samples (peaks survive)."""
        k = max(1, -(-len(self.samples) // points))
        buckets = [self.samples[i:i + k] for i in range(0, len(self.samples), k)]
        return [[round(b[0][0], 2), gib(max(r for _, r in b))] for b in buckets]


def time_stats(seconds: list[float]) -> dict:
    """Median (robust to a neighbour's load spikes), mean, min, max and count of a list of durations."""
    if not seconds:
        return {"median": None, "mean": None, "min": None, "max": None, "n": 0}
    s = sorted(seconds)
    mid = len(s) // 2
    median = s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
    r = lambda x: round(x, 4)
    return {"median": r(median), "mean": r(sum(s) / len(s)), "min": r(s[0]), "max": r(s[-1]), "n": len(s)}


def write_json(path: str | Path, obj: dict) -> Path:
    """Atomic JSON write (sorted keys, indented): results are diffed and committed."""
    return atomic_write_json(path, obj)


def run_measured(cmd: list[str], log: str | Path | None = None, timeout: float | None = None,
                 env: dict | None = None) -> dict:
    """Run a command; its exit code, wall time and the kernel's rusage of that child (os.wait4).

    ru_maxrss of a child is its own peak RSS, raised by Linux to the parent's peak at exec: keep the
    parent small (the bench orchestrators import nothing heavy) and it is the child's figure.
    """
    out = open(log, "ab") if log else subprocess.DEVNULL
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        rusage = _wait(proc, timeout)
    finally:
        if log:
            out.close()
    return {"returncode": proc.returncode, "wall_seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_gb_wait4": gib(rusage.ru_maxrss * 1024), "parent_peak_rss_gb": gib(peak_rss_bytes()),
            "user_seconds": round(rusage.ru_utime, 2), "system_seconds": round(rusage.ru_stime, 2),
            "command": " ".join(str(c) for c in cmd)}


def mem_available_gib() -> float | None:
    """The kernel's estimate of memory available to new work (MemAvailable), in GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


def _rss_gib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return 0.0


def limit_data_gib(gib_: float | None):
    """preexec_fn for a child: RLIMIT_DATA (private writable memory: heap, anonymous mmaps) at `gib_` GiB.

    Past it an allocation fails in the child (torch: "can't allocate memory") instead of the machine running
    out; read-only file mappings (safetensors, ONNX weights) are not counted. None: no limit.
    """
    if gib_ is None:
        return None
    cap = int(gib_ * GIB)
    return lambda: resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))


def run_guarded(cmd: list[str], log: str | Path | None = None, max_rss_gb: float | None = None,
                min_available_gb: float | None = 1.5, data_limit_gb: float | None = None,
                timeout: float | None = None, period: float = 0.2, env: dict | None = None) -> dict:
    """run_measured for memory-hungry stages on a shared machine: polls the child every `period` s and kills it
    when its RSS passes `max_rss_gb`, or when the machine's MemAvailable falls below `min_available_gb` (so it
    is this child that stops, not a neighbour picked by the OOM killer); `data_limit_gb` sets RLIMIT_DATA in
    the child. Records why it was killed and an RSS timeline [[s, GiB], ...] (one point per second, max of
    the samples in it)."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    t0 = time.perf_counter()
    killed, timeline = None, []
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=limit_data_gib(data_limit_gb))
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            rss, avail, t = _rss_gib(proc.pid), mem_available_gib(), time.perf_counter() - t0
            if timeline and int(timeline[-1][0]) == int(t):
                timeline[-1][1] = max(timeline[-1][1], round(rss, 3))
            else:
                timeline.append([round(t, 1), round(rss, 3)])
            if killed is None:
                if max_rss_gb and rss > max_rss_gb:
                    killed = f"RSS {rss:.2f} GiB > {max_rss_gb} GiB"
                elif min_available_gb and avail is not None and avail < min_available_gb:
                    killed = f"machine MemAvailable {avail:.2f} GiB < {min_available_gb} GiB (child RSS {rss:.2f} GiB)"
                elif deadline and time.monotonic() > deadline:
                    killed = f"timeout {timeout} s"
                if killed:
                    proc.kill()
            time.sleep(period)
    finally:
        if log:
            out.close()
    return {"returncode": os.waitstatus_to_exitcode(status), "killed": killed,
            "wall_seconds": round(time.perf_counter() - t0, 1), "peak_rss_gb": gib(rusage.ru_maxrss * 1024),
            "user_seconds": round(rusage.ru_utime, 1), "system_seconds": round(rusage.ru_stime, 1),
            "max_rss_gb": max_rss_gb, "min_available_gb": min_available_gb, "data_limit_gb": data_limit_gb,
            "command": " ".join(str(c) for c in cmd), "rss_timeline": timeline}


def run_isolated(module: str, args: list[str], log: str | Path | None = None, timeout: float | None = None,
                 env: dict | None = None) -> dict:
    """Run `python -m module *args --result F` in a fresh process; return its JSON plus the kernel's view.

    The child reports its own peak (VmHWM of its address space); `process` adds run_measured's view.
    """
    with tempfile.TemporaryDirectory(prefix="zoodip-bench-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, *args, "--result", str(result)]
        proc = run_measured(cmd, log, timeout, env)
        if proc["returncode"] != 0:
            where = f"; see {log}" if log else ""
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc['returncode']}{where}")
        data = json.loads(result.read_text())
    proc["command"] = " ".join(cmd[1:-2])
    data["process"] = proc
    return data


def _wait(proc: subprocess.Popen, timeout: float | None):
    """os.wait4 on the child (rusage of that child only); kill it past `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG if deadline else 0)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return rusage
        if deadline and time.monotonic() > deadline:
            proc.kill()
            deadline = None   # next wait4 blocks until the kill lands
        time.sleep(0.2)
