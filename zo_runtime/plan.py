"""A run's cost before it happens: time budgets, the plan line, and what other resolutions would cost.

The trainer times its first steps (they are real steps of the run, not thrown away), adds what the
loop spends between steps on average (direction refreshes, validation), and turns that into steps,
wall time and a finish time. With a time budget it picks the steps that fit; `--steps` wins when given.
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import asdict, dataclass

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd])")


def parse_duration(text: str) -> float:
    """'3h', '90m', '45s', '1h30m', '1.5h' (or plain seconds) -> seconds; ValueError names the fix."""
    s = str(text).strip().lower()
    try:
        seconds = float(s)
    except ValueError:
        parts = _PART.findall(s)
        if not parts or _PART.sub("", s).strip():
            raise ValueError(f"--time-budget {text!r} is not a duration: use e.g. 3h, 90m, 45s or 1h30m") from None
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"--time-budget {text!r} must be a positive, finite duration such as 3h, 90m or 45s")
    return seconds


def peak_rss_gb() -> float:
    """This process's resident high-water mark in GiB (Linux reports ru_maxrss in KiB)."""
    import resource          # POSIX only: imported where it is used
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def steps_within(seconds: float, per_step: float, cap: int) -> int:
    """How many steps of `per_step` seconds fit in `seconds` (at least 1, at most `cap`)."""
    return max(1, min(cap, int(seconds // per_step))) if per_step > 0 else cap


def human(seconds: float) -> str:
    """12345 -> '3 h 26 min'; short times in minutes or seconds."""
    if seconds >= 3600:
        h, m = divmod(round(seconds / 60), 60)
        return f"{h} h {m:02d} min"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


@dataclass(frozen=True)
class Plan:
    """What the rest of a run costs, from its measured first steps (written to config.json)."""

    passes_per_step: int
    step_seconds: float            # one step's forward passes and update (median of the timed steps)
    overhead_seconds: float        # per step on average: direction refreshes and validation passes
    steps: int                     # the run's last step
    done: int                      # steps already done when planned
    budget_seconds: float | None   # --time-budget, or None
    resolution: int
    peak_rss_gb: float             # the process's high-water mark so far

    @property
    def seconds_per_step(self) -> float:
        return self.step_seconds + self.overhead_seconds

    @property
    def seconds_left(self) -> float:
        return (self.steps - self.done) * self.seconds_per_step

    def finish(self, now: dt.datetime | None = None) -> dt.datetime:
        return (now or dt.datetime.now()) + dt.timedelta(seconds=self.seconds_left)

    def line(self, now: dt.datetime | None = None) -> str:
        """The one line printed before the bulk of the run."""
        budget = f", within --time-budget {human(self.budget_seconds)}" if self.budget_seconds else ""
        return (f"plan: {self.steps} steps{budget} x {self.passes_per_step} passes, "
                f"{self.seconds_per_step:.2f} s/step at {self.resolution} px -> {human(self.seconds_left)} left, "
                f"done ~{self.finish(now):%a %H:%M}; peak memory so far {self.peak_rss_gb:.2f} GiB; "
                f"{resolution_hint(self)}")

    def as_dict(self) -> dict:
        return {**asdict(self), "seconds_per_step": round(self.seconds_per_step, 4),
                "seconds_left": round(self.seconds_left, 1), "finish": self.finish().isoformat(timespec="seconds")}


def resolution_hint(plan: Plan) -> str:
    """What the other usual sizes would cost here: a UNet pass scales about with the pixels it sees (SD 1.5:
    677 GFLOP at 512 px, 172 at 256), so the estimate scales the measured step by the pixel ratio."""
    others = [r for r in (plan.resolution // 2, plan.resolution * 3 // 4) if r >= 64 and r % 64 == 0]
    if not others:
        return "other --resolution: none smaller"
    costs = ", ".join(f"{r} px ~{human((plan.steps - plan.done) * plan.seconds_per_step * (r / plan.resolution) ** 2)}"
                      for r in sorted(others))
    return f"--resolution {costs} (estimates)"
