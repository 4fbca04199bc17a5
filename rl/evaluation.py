"""Evaluation during training: held-out sets scored at the current weights, between learner steps.

Each configured set is any registered environment's split (its test split by default), several at
once. Greedy: one temperature-0 sample per task, `eval/<set>/greedy` its mean reward. pass@k: k
samples per task at the rollout temperature, drawn as one n-sample request (one prefill per task),
`eval/<set>/pass_at_<k>` the share of tasks with a full-reward sample. The learner waits for an
evaluation (no weights change under it, so every token is sampled by the weights being measured);
the engines keep generating training episodes beside it, within the staleness bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from envs.base import EnvParams, Environment, Task
from envs.registry import get_env
from rl.config import Config, ConfigError, EnvSection, EvalSetSection
from rl.health import HealthMonitor
from rl.metrics import metric_name
from rl.trajectory import Trajectory
from workers.episode import EpisodeOutcome, EpisodeRunner
from workers.rollout import Sampling


class EvalSet:
    """One configured held-out set: its environment class, validated params and tasks."""

    def __init__(self, index: int, section: EvalSetSection, envs: Sequence[EnvSection]) -> None:
        self.section, self.label = section, section.label
        where = f"eval.sets.{index}"
        try:
            self.cls: type[Environment] = get_env(section.env)
        except KeyError as err:
            raise ConfigError(f"{where}.env: {err.args[0] if err.args else section.env}") from None
        trained = next((e for e in envs if e.name == section.env), None)
        params = section.params if section.params is not None else (trained.params if trained else {})
        try:
            self.params: EnvParams = self.cls.Params.model_validate(params)
        except Exception as err:
            raise ConfigError(f"{where}.params: {err}") from None
        data = section.data if section.data is not None else (trained.data if trained else None)
        self.tasks: list[Task] = list(self.cls.load_tasks(self.params, data, section.split))[: section.n]
        if not self.tasks:
            raise ConfigError(f"{where} ({self.label}) has no tasks in split {section.split!r}.")

    def make(self) -> Environment:
        return self.cls(self.params)


class Evaluator:
    """Runs every evaluation set against the rollout workers. The sets are loaded when it is made,
    so a set that cannot load is an error before any engine starts."""

    def __init__(self, cfg: Config, health: HealthMonitor) -> None:
        self.sets = [EvalSet(i, s, cfg.envs) for i, s in enumerate(cfg.eval.sets)]
        self.health = health
        self.max_tokens, self.temperature = cfg.rollout.max_tokens, cfg.rollout.temperature
        self.top_p = cfg.rollout.top_p
        self.runs = 0

    async def run(
        self, runner: EpisodeRunner, workers: Sequence[Any]
    ) -> tuple[dict[str, float], dict[str, list[Trajectory]]]:
        """Metrics of every set, and each set's trajectories (for the sample store)."""
        start, self.runs = time.perf_counter(), self.runs + 1
        results = await asyncio.gather(*(self._one(s, runner, workers) for s in self.sets))
        metrics: dict[str, float] = {}
        samples: dict[str, list[Trajectory]] = {}
        for eval_set, (figures, trajs) in zip(self.sets, results, strict=True):
            metrics.update(figures)
            samples[eval_set.label] = trajs
        if self.sets:
            metrics[metric_name("perf", "eval_s")] = time.perf_counter() - start
        return metrics, samples

    async def _one(
        self, s: EvalSet, runner: EpisodeRunner, workers: Sequence[Any]
    ) -> tuple[dict[str, float], list[Trajectory]]:
        k = s.section.pass_k
        greedy = Sampling(max_tokens=self.max_tokens, temperature=0.0)
        sampled = Sampling(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p)
        calls = []
        for i, task in enumerate(s.tasks):
            worker = workers[i % len(workers)]
            gid = f"eval{self.runs}-{s.label}-{i}"
            if s.section.greedy:
                calls.append(runner.run_group([s.make()], task, worker, greedy, gid + "-greedy"))
            if k:
                calls.append(runner.run_group([s.make() for _ in range(k)], task, worker, sampled, gid))
        groups: list[list[EpisodeOutcome]] = list(await asyncio.gather(*calls))
        self.health.observe(s.cls.name, [o for g in groups for o in g])
        per_task = 2 if s.section.greedy and k else 1
        greedy_groups = groups[0::per_task] if s.section.greedy else []
        sampled_groups = groups[per_task - 1 :: per_task] if k else []
        figures = _figures(s.label, greedy_groups, sampled_groups, k)
        return figures, [o.trajectory for g in groups for o in g if o.trajectory is not None]


def _figures(
    label: str, greedy: list[list[EpisodeOutcome]], sampled: list[list[EpisodeOutcome]], k: int
) -> dict[str, float]:
    def name(key: str) -> str:
        return metric_name("eval", label, key)

    out: dict[str, float] = {}
    scored = [o.trajectory for g in greedy + sampled for o in g if o.trajectory is not None]
    out[name("no_reward")] = float(sum(o.trajectory is None for g in greedy + sampled for o in g))
    if scored:
        out[name("response_len")] = float(np.mean([t.num_model_tokens for t in scored]))
        out[name("truncation_rate")] = float(np.mean([t.truncated for t in scored]))
    greedy_rewards = [o.trajectory.reward for g in greedy for o in g if o.trajectory is not None]
    if greedy_rewards:
        out[name("greedy")] = float(np.mean(greedy_rewards))
    rewards = [[o.trajectory.reward for o in g if o.trajectory is not None] for g in sampled]
    rewards = [r for r in rewards if r]  # a task whose every sample lost its reward says nothing
    if rewards:
        out[name(f"pass_at_{k}")] = float(np.mean([max(r) >= 1.0 for r in rewards]))
        out[name("sampled_mean")] = float(np.mean([x for r in rewards for x in r]))
    return out
