"""Scale out on Ray: many subjects across a cluster (subjects.py), one subject's passes across workers (queries.py).

Ray is an optional extra (`pip install 'zoodip[ray]'`); nothing here imports it until a cluster is asked
for. Workers are Ray actors that import only zo_runtime (numpy + onnxruntime). Every result equals the
single-process one bit for bit at the same onnxruntime thread count: a step's randomness comes from
(seed, step), so a worker recomputes it and only query points and scalar losses travel (docs/scale_out.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

# Ray picks its node address from the network route unless this is "0" (then it uses loopback). Read
# when ray is first imported, so it is set before that; only a local instance is started this way.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOCAL_OBJECT_STORE = 256 * 2 ** 20    # bytes: what travels is points, latents and losses (KBs), not tensors


@dataclass(frozen=True)
class ClusterConfig:
    """Where the workers run and how many; the defaults use every core of a local machine."""

    address: str | None = None     # None: start a local Ray instance on loopback; "auto" or HOST:PORT: join one
    workers: int | None = None     # None: the cluster's CPUs // threads (one subject: at most its n + 1 passes)
    # onnxruntime threads per worker. A toy step is no faster on 2 threads than on 1 (DEVELOPERS.md), and
    # the same count everywhere gives the same floats as a single process run at that ZOODIP_THREADS.
    threads: int = 1
    restarts: int = 3              # times Ray restarts a dead worker process (a crash, kill -9, a lost node)
    retries: int = 2               # train-many: times a subject whose worker died is resumed on another worker
    # Seconds a worker call may stay silent before it counts as lost (hung, not dead: Ray reports deaths
    # itself). None: wait; SD steps on a slow CPU take minutes.
    call_timeout: float | None = None

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.restarts < 0 or self.retries < 0:
            raise ValueError(f"restarts and retries must be >= 0, got {self.restarts}, {self.retries}")
        if self.call_timeout is not None and not self.call_timeout > 0:
            raise ValueError(f"call_timeout must be > 0 seconds, got {self.call_timeout}")


def require_ray(what: str = "this command"):
    """The ray module, or ModuleNotFoundError in one line naming the extra."""
    os.environ.setdefault(LOOPBACK_ENV, "0")      # before ray's first import: see LOOPBACK_ENV
    try:
        import ray
    except ImportError:
        raise ModuleNotFoundError(f"{what} needs Ray: pip install 'zoodip[ray]'") from None
    return ray


def connect(cfg: ClusterConfig, what: str = "this command"):
    """(ray, started): Ray joined to cfg.address, or a local instance started on loopback (started=True:
    the caller shuts it down). An instance this process already runs is used as it is."""
    ray = require_ray(what)
    if ray.is_initialized():
        return ray, False
    if cfg.address:
        try:
            ray.init(address=cfg.address, log_to_driver=False, configure_logging=False)
        except ConnectionError as err:
            raise ValueError(f"no Ray cluster answers at --address {cfg.address} ({err}); start one with "
                             "`ray start --head` or leave --address out to run on this machine") from None
        return ray, True
    ray.init(address=None, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False, object_store_memory=LOCAL_OBJECT_STORE)
    node = ray.nodes()[0]["NodeManagerAddress"]
    if node != "127.0.0.1":       # ray was imported before LOOPBACK_ENV could be set
        ray.shutdown()
        raise RuntimeError(f"the local Ray instance bound {node}, not loopback: set {LOOPBACK_ENV}=0 before "
                           "anything imports ray")
    return ray, True


def cluster_cpus(ray) -> int:
    return int(ray.cluster_resources().get("CPU", 0))


def pool_size(ray, cfg: ClusterConfig, most: int | None = None) -> int:
    """cfg.workers, or as many as the cluster's CPUs hold at cfg.threads each (at most `most`); ValueError when
    the cluster cannot place them (Ray would wait for CPUs forever)."""
    cpus = cluster_cpus(ray)
    workers = cfg.workers or max(1, min(cpus // cfg.threads, most or cpus))
    if workers * cfg.threads > cpus:
        raise ValueError(f"--workers {workers} x {cfg.threads} threads need {workers * cfg.threads} CPUs; the Ray "
                         f"cluster has {cpus}: ask for fewer workers or threads, or add nodes")
    return workers
