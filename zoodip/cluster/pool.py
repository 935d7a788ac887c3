"""A pool of Ray actors of one class: tasks go to free live actors, a task whose actor died goes to another.

Ray restarts a dead actor (up to `restarts` times, rerunning its __init__: the model opens again); the
pool leaves it out until a probe (`info()`) answers, so no task waits on a restart while another actor is
free. Every task here is a pure function of its arguments (a step's passes, a subject resumed from its
checkpoint), so sending it again gives the same result.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

from . import ClusterConfig

Task = Callable[[Any], Any]     # actor handle -> ObjectRef of one remote call


class AllWorkersLost(RuntimeError):
    """Every worker died and Ray may restart none of them."""


class Pool:
    """`workers` actors of `cls(*args)`, each holding cfg.threads CPUs; every actor class here has info()."""

    def __init__(self, ray, cls, args: tuple, workers: int, cfg: ClusterConfig):
        self.ray, self.timeout = ray, cfg.call_timeout
        remote = ray.remote(num_cpus=cfg.threads, max_restarts=cfg.restarts, max_task_retries=0)(cls)
        self.actors = [remote.remote(*args) for _ in range(workers)]
        self.live: set[int] = set(range(workers))
        self.probes: dict[int, Any] = {}        # actor index -> ObjectRef of info() while it restarts
        self.info = ray.get([a.info.remote() for a in self.actors])   # every actor has opened its model

    def run(self, tasks: list[Task], attempts: int | None = None,
            done: Callable[[int, Any], None] | None = None) -> list:
        """Each task's result, in order; at most one task in flight per live actor. A task whose actor dies is
        sent again (first in line) to the next free actor; after `attempts` deaths (None: no limit) its result
        is the RayActorError. done(i, result) is called as each task finishes."""
        results, queue, deaths, busy = [None] * len(tasks), deque(range(len(tasks))), [0] * len(tasks), {}
        while queue or busy:
            self._revive(wait=not busy and not self.live)
            free = sorted(self.live - {a for _, a in busy.values()})
            while queue and free:
                i, a = queue.popleft(), free.pop(0)
                busy[tasks[i](self.actors[a])] = (i, a)
            if not busy:
                continue
            ready, _ = self.ray.wait(list(busy), num_returns=1, timeout=self.timeout)
            if not ready:                   # silent past the timeout: hung; a kill makes Ray restart it
                for _, a in busy.values():
                    self.ray.kill(self.actors[a], no_restart=False)
                continue
            i, a = busy.pop(ready[0])
            try:
                results[i] = self.ray.get(ready[0])
            except self.ray.exceptions.RayActorError as err:
                self._lost(a)
                deaths[i] += 1
                if attempts is None or deaths[i] < attempts:
                    queue.appendleft(i)
                    continue
                results[i] = err
            if done:
                done(i, results[i])
        return results

    def _lost(self, a: int) -> None:
        """Actor a died: out of the pool until it answers a probe (Ray is restarting it)."""
        self.live.discard(a)
        self.probes[a] = self.actors[a].info.remote()

    def _revive(self, wait: bool) -> None:
        """Take back restarted actors; wait: block until one answers (no actor is live)."""
        if not self.probes:
            if wait:
                raise AllWorkersLost(f"all {len(self.actors)} workers died and none may restart (restarts exhausted)")
            return
        refs = {ref: a for a, ref in self.probes.items()}
        ready, _ = self.ray.wait(list(refs), num_returns=1 if wait else len(refs), timeout=None if wait else 0)
        for ref in ready:
            a = refs[ref]
            del self.probes[a]
            try:
                self.info[a] = self.ray.get(ref)
                self.live.add(a)
            except self.ray.exceptions.RayActorError:
                pass                         # restarts exhausted: gone for good
        if wait and not self.live:
            self._revive(wait=True)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
