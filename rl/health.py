"""Sandbox and verifier health, per environment and per sandbox pool, as metrics beside the rewards.

`HealthMonitor.observe` sees every finished episode (trained on, evaluated or dropped) and reads what
environments already report: the verifier's `info` (a sandbox `status` such as timeout or oom,
`sandbox_s`, an `error`) and the episode's timings. `drain` turns what was seen since the previous
call into `env/<name>/...` metrics, and the counters of the sandbox pools into `sandbox/<node>/<pool>/...`
metrics. Counts are per interval (per learner step), rates per second of that interval.
"""

from __future__ import annotations

import collections
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from rl.metrics import metric_name
from workers.episode import EpisodeOutcome

_STATUS_COUNTS = {
    "timeout": "timeouts",
    "oom": "ooms",
    "sandbox_error": "sandbox_errors",
    "runtime_error": "runtime_errors",
    "output_limit": "output_limits",
}
"""Sandbox statuses (workers.sandbox.Status values) counted per environment, and their metric names."""

DEADLINE_PREFIX = "verifier deadline"
"""How reward.math reports a verification cut by its hard deadline (a dropped sample)."""


class _Window:
    """What one environment reported since the last drain."""

    def __init__(self) -> None:
        self.graded = 0
        self.no_reward = 0
        self.deadline = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.sandbox_s: list[float] = []
        self.verify_s: list[float] = []


def _find(info: Mapping[str, Any], key: str) -> Any:
    """`info[key]`, or the first one nested one level down (SWE puts its grade under "grade")."""
    if key in info:
        return info[key]
    return next((v[key] for v in info.values() if isinstance(v, Mapping) and key in v), None)


class HealthMonitor:
    """Collects episode outcomes between two `drain` calls."""

    def __init__(self) -> None:
        self.node = socket.gethostname()
        self._envs: dict[str, _Window] = collections.defaultdict(_Window)
        self._since = time.perf_counter()
        self._pool_runs: dict[tuple[str, str], int] = {}

    def observe(self, env: str, outcomes: Iterable[EpisodeOutcome]) -> None:
        window = self._envs[env]
        for outcome in outcomes:
            traj = outcome.trajectory
            info = traj.reward_info if traj is not None else outcome.info
            window.graded += 1
            if traj is None:
                window.no_reward += 1
            if str(_find(info, "error") or outcome.error or "").startswith(DEADLINE_PREFIX):
                window.deadline += 1
            status = _find(info, "status")
            if status in _STATUS_COUNTS:
                window.counts[_STATUS_COUNTS[status]] += 1
            # A run that never ran (SANDBOX_ERROR) has no latency.
            if isinstance(_find(info, "sandbox_s"), (int, float)) and status != "sandbox_error":
                window.sandbox_s.append(float(_find(info, "sandbox_s")))
            if traj is not None and {"episode", "generate"} <= traj.timings.keys():
                # Everything of the episode that was not generation: reset, verification, sandboxes.
                window.verify_s.append(max(traj.timings["episode"] - traj.timings["generate"], 0.0))

    def drain(self, pools: Mapping[str | tuple[str, str], Any]) -> dict[str, float]:
        """Metrics for the interval since the last call; `pools` maps a pool's label, or a
        (node, label) pair for a pool on another node, to its `PoolStats` (counters since the pool
        started)."""
        now = time.perf_counter()
        dt, self._since = max(now - self._since, 1e-9), now
        out: dict[str, float] = {}
        for env, window in sorted(self._envs.items()):
            out.update({metric_name("env", env, k): v for k, v in _window_metrics(window, dt).items()})
        self._envs.clear()
        for key, stats in sorted(pools.items(), key=lambda item: str(item[0])):
            node, label = key if isinstance(key, tuple) else (self.node, key)
            s = stats.model_dump()
            runs_before, self._pool_runs[(node, label)] = self._pool_runs.get((node, label), 0), s["runs"]
            values = {**s, "busy": s["size"] - s["ready"], "exec_per_s": (s["runs"] - runs_before) / dt}
            out.update({metric_name("sandbox", node, label, k): float(v) for k, v in values.items()})
        return out


def _window_metrics(w: _Window, dt: float) -> dict[str, float]:
    out = {"graded_per_s": w.graded / dt, "no_reward": float(w.no_reward), "verifier_deadline": float(w.deadline)}
    out.update({key: float(w.counts[key]) for key in _STATUS_COUNTS.values()})
    for key, values in (("verify", w.verify_s), ("sandbox", w.sandbox_s)):
        if values:
            out[f"{key}_p50_s"] = float(np.percentile(values, 50))
            out[f"{key}_p99_s"] = float(np.percentile(values, 99))
    return out
