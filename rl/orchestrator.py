"""The asynchronous RL loop, readable in one file.

    producer ── admits a group while  admitted − lost < (version + max_staleness + 1) × batch_size
       └─ group task: G episodes (EpisodeRunner → RolloutWorker) ─ XADD ─► Redis stream
    trainer  ── XREADGROUP until batch_size whole groups ─► drop too-old ─► advantages
       └─ learner step ─► publish weights v+1 ─► every engine: pause/reload/resume ─► XACK

Generation never waits for the learner except through admission control, and the learner never
waits for one slow episode: it takes whichever groups finish first. With `max_staleness=0` the
loop is synchronous on-policy: every token of batch v is sampled by weights v.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from envs.base import EnvParams, Environment, Task
from envs.registry import get_env
from envs.swe.pools import close_shared_pools, shared_pool_stats
from rl.api.server import run_location, start_for_run
from rl.bus import TrajectoryBus
from rl.config import Config, ConfigError, EnvSection
from rl.evaluation import Evaluator
from rl.health import HealthMonitor
from rl.learner import LearnerGroup, StepStats, TrainSample
from rl.loss import group_advantages
from rl.metrics import MetricsWriter, make_trackers, metric_name, plot_reward_curve, step_metrics
from rl.placement import reserve
from rl.redis_server import connect_or_start
from rl.samples import SampleStore
from rl.trajectory import Trajectory
from rl.weights import WeightSync, exchange_dir, save_hf_checkpoint
from workers.episode import ChatRenderer, EpisodeRunner
from workers.rollout import EngineConfig, EnginePool, RolloutWorker, Sampling, checkpoint_dir


class RunSummary(BaseModel):
    """What `summary.json` holds at the end of a run."""

    run: str
    steps: int
    wall_s: float
    train_wall_s: float
    heldout_acc_before: float | None
    """Greedy mean reward of the first evaluation set before training (None: no greedy set)."""
    heldout_acc_after: float | None
    """The same after training."""
    eval_final: dict[str, float]
    """Every evaluation metric of the last evaluation."""
    final_train_reward: float | None
    dropped: dict[str, int]


class EnvSlot:
    """One configured environment: its class, validated params and tasks."""

    def __init__(self, index: int, section: EnvSection) -> None:
        self.section = section
        self.cls: type[Environment] = get_env(section.name)
        try:
            self.params: EnvParams = self.cls.Params.model_validate(section.params)
        except Exception as err:
            raise ConfigError(f"envs.{index}.params: {err}") from None
        self.tasks: list[Task] = list(self.cls.load_tasks(self.params, section.data, "train"))
        if not self.tasks:
            raise ConfigError(f"envs.{index} ({section.name}) has no train tasks.")

    def make(self) -> Environment:
        return self.cls(self.params)


class Orchestrator:
    """Owns one run: Ray actors, the bus, admission control and the training loop."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run.dir
        self.rng = random.Random(cfg.run.seed)
        self.slots = [EnvSlot(i, e) for i, e in enumerate(cfg.envs)]
        self.version = 0
        self.admitted = 0
        self.lost_groups = 0
        self.in_flight = 0
        self.dropped = collections.Counter({"no_reward": 0, "stale": 0, "zero_variance_groups": 0})
        self._dropped_logged = collections.Counter(self.dropped)  # as of the last metrics row
        self.health = HealthMonitor()
        self.evaluator = Evaluator(cfg, self.health)
        self.tokens_generated = 0
        self.admission = asyncio.Condition()
        self.partial: dict[str, list[tuple[str, Trajectory]]] = collections.OrderedDict()
        self.unacked: list[str] = []  # bus ids of trajectories trained on but not yet durable
        self.tasks: set[asyncio.Task[Any]] = set()
        self.learner_calls: set[asyncio.Future[Any]] = set()
        self.fatal: BaseException | None = None
        self.interrupted = False  # set by Ctrl-C; the loop raises KeyboardInterrupt at its next check
        self._private_redis = None

    # ----------------------------------------------------------------- start / stop
    async def start(self) -> None:
        import ray
        from transformers import AutoTokenizer

        cfg = self.cfg
        model_dir = checkpoint_dir(cfg.model.path)
        # Trackers first: a tracker configured but not installed fails before anything starts.
        self.metrics = MetricsWriter(self.run_dir, make_trackers(self.run_dir, cfg.run.name, cfg.logging,
                                                                 cfg.model_dump(mode="json")))
        # The bus before Ray: an unreachable or wrongly protected Redis is one clear error at start.
        url, self._private_redis = connect_or_start(cfg.bus.redis_url, cfg.bus.password_env)
        self.bus = TrajectoryBus(url, cfg.run.name)
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                     num_cpus=None if os.environ.get("RAY_ADDRESS") else max(os.cpu_count() or 1, cfg.learner.world_size))
        # Every actor's resources are held before the first one starts (an impossible plan fails here).
        self.placement = await asyncio.to_thread(reserve, cfg)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.runner = EpisodeRunner(ChatRenderer(tokenizer), cfg.run.name, cfg.rollout.max_model_len)
        self.samples = SampleStore(self.run_dir, cfg.logging.samples, self.runner.renderer.decode,
                                   cfg.run.seed)
        engine = EngineConfig(model_path=str(model_dir), dtype=cfg.model.dtype, max_model_len=cfg.rollout.max_model_len,
                              enforce_eager=cfg.rollout.enforce_eager, kv_cache_gib=cfg.rollout.kv_cache_gib,
                              cpu_cores=cfg.rollout.cpu_cores,
                              tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                              gpu_memory_utilization=cfg.rollout.gpu_memory_utilization, seed=cfg.run.seed)
        self.workers = [RolloutWorker.remote_actor(engine, **self.placement.options(p))
                        for p in self.placement.plan.engines]
        self.engines = EnginePool(len(self.workers))
        self.learner = await asyncio.to_thread(LearnerGroup, str(model_dir), cfg.learner, cfg.algorithm,
                                               cfg.rollout.temperature, cfg.run.seed, self.placement)
        await asyncio.gather(*(w.get_version.remote() for w in self.workers))
        self.weights = WeightSync(cfg.weights, self.learner, self.workers,
                                  [cfg.rollout.tensor_parallel_size] * len(self.workers),
                                  self.placement.plan.transport(cfg.weights.transport),
                                  exchange_dir(f"{cfg.run.name}-{uuid.uuid4().hex[:8]}"), cfg.model.dtype)
        await asyncio.to_thread(self.weights.connect)

    async def _learner_call(self, fn: Any, *args: Any) -> Any:
        """A blocking learner call in a thread that `stop` waits for: cancelling the awaiting
        task cannot stop the thread, and shutting Ray down under a thread still in `ray.get`
        hangs the interpreter's exit (Ctrl-C mid-step never returned)."""
        call = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self.learner_calls.add(call)
        call.add_done_callback(self.learner_calls.discard)
        return await asyncio.shield(call)

    async def stop(self) -> None:
        """Stop everything this run started; safe to call after a failure or Ctrl-C."""
        import ray

        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.learner_calls:
            await asyncio.wait(self.learner_calls, timeout=120)
        await close_shared_pools()  # the sandbox pools this run's environments opened
        for worker in getattr(self, "workers", []):
            try:
                await asyncio.wait_for(worker.shutdown.remote(), timeout=30)
            except Exception:
                pass  # the actor is killed with Ray below either way
        if hasattr(self, "learner"):
            await asyncio.to_thread(self.learner.shutdown)
        if hasattr(self, "placement"):  # also ends the actors in it: on a shared cluster nothing else would
            self.placement.remove()
        if getattr(self, "_owns_ray", False) and ray.is_initialized():
            ray.shutdown()
        if hasattr(self, "bus"):
            self.bus.close()
        if self._private_redis is not None:
            self._private_redis.close()
        if hasattr(self, "weights"):
            self.weights.close()
        if hasattr(self, "metrics"):
            self.metrics.close()
        if hasattr(self, "samples"):
            self.samples.close()

    # ----------------------------------------------------------------- generation side
    def _admissible(self) -> bool:
        a = self.cfg.algorithm
        room = (self.version + a.max_staleness + 1) * a.batch_size
        return (self.admitted - self.lost_groups < room
                and self.in_flight * a.group_size < self.cfg.rollout.max_concurrent_episodes)

    async def produce(self) -> None:
        """Admit groups for as long as the run lasts."""
        weights = [s.section.weight for s in self.slots]
        while True:
            async with self.admission:
                await self.admission.wait_for(self._admissible)
                index = self.admitted
                self.admitted += 1
                self.in_flight += 1
            slot = self.rng.choices(self.slots, weights)[0]
            task = self.rng.choice(slot.tasks)
            samples = self.cfg.algorithm.group_size
            engine = self.engines.pick(samples)  # the shallowest queue, not round-robin
            group = self.run_group(slot, task, self.workers[engine], index)
            self._spawn(self.engines.serve(engine, samples, group))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.fatal is None:
            self.fatal = task.exception()

    async def run_group(self, slot: EnvSlot, task: Task, worker: Any, index: int) -> None:
        """G episodes of one task; the group is published whole, or counted lost."""
        cfg = self.cfg
        group_id = f"{cfg.run.name}-g{index}"
        sampling = Sampling(max_tokens=cfg.rollout.max_tokens, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p)
        # No per-request seeds: vLLM's CPU sampler cannot restore a seeded generator's position
        # when a weight update preempts the request (the engine dies); the engine seed is enough.
        outcomes = await self.runner.run_group([slot.make() for _ in range(cfg.algorithm.group_size)],
                                               task, worker, sampling, group_id)
        self.health.observe(slot.section.name, outcomes)
        trajs = [o.trajectory for o in outcomes if o.trajectory is not None]
        self.dropped["no_reward"] += len(outcomes) - len(trajs)
        self.dropped.update(f"no_reward:{o.kind}" for o in outcomes if o.trajectory is None)
        if trajs:
            trajs = [t.model_copy(update={"group_size": len(trajs)}) for t in trajs]
            self.tokens_generated += sum(t.num_model_tokens for t in trajs)
            await self.bus.apublish(trajs)
        async with self.admission:
            self.in_flight -= 1
            self.lost_groups += 0 if trajs else 1
            self.admission.notify_all()

    # ----------------------------------------------------------------- learner side
    async def next_batch(self) -> tuple[list[list[Trajectory]], list[str], float]:
        """Read until `batch_size` whole groups are here; drop those too old. Returns the groups,
        their bus ids and the seconds spent waiting."""
        a, start, ids = self.cfg.algorithm, time.perf_counter(), []
        groups: list[list[Trajectory]] = []
        while len(groups) < a.batch_size:
            if self.interrupted:
                raise KeyboardInterrupt
            if self.fatal is not None:
                raise self.fatal
            for entry_id, traj in await self.bus.aread(count=a.batch_size * a.group_size, block_ms=self.cfg.bus.block_ms):
                self.partial.setdefault(traj.group_id, []).append((entry_id, traj))
            for gid in [g for g, items in self.partial.items() if len(items) == items[0][1].group_size]:
                if len(groups) == a.batch_size:
                    break
                items = self.partial.pop(gid)
                ids += [e for e, _ in items]
                fresh = [t for _, t in items if self.version - t.min_version <= a.effective_max_age]
                self.dropped["stale"] += len(items) - len(fresh)
                if fresh:
                    groups.append(fresh)
        return groups, ids, time.perf_counter() - start

    def to_samples(self, groups: list[list[Trajectory]]) -> list[TrainSample]:
        a, samples = self.cfg.algorithm, []
        for group in groups:
            rewards = [t.reward for t in group]
            if a.filter_zero_variance and max(rewards) == min(rewards):
                self.dropped["zero_variance_groups"] += 1
                continue
            for t, adv in zip(group, group_advantages(rewards, a.normalize_std)):
                samples.append(TrainSample(
                    input_ids=np.concatenate([t.prompt_ids, t.completion_ids]), prompt_len=len(t.prompt_ids),
                    loss_mask=t.loss_mask, sampler_logprobs=t.sampler_logprobs, advantage=adv))
        return samples

    async def train_step(self, samples: list[TrainSample]) -> StepStats | None:
        if not samples:
            return None
        n = self.cfg.algorithm.minibatches
        if n > 1:  # random minibatch membership; with one minibatch order cannot matter
            self.rng.shuffle(samples)
        minibatches = [samples[i::n] for i in range(n) if samples[i::n]]
        return await self._learner_call(self.learner.train_step, minibatches)

    async def push_weights(self, version: int) -> float:
        """Publish the learner's weights as `version` and load them into every engine."""
        start = time.perf_counter()
        await self._learner_call(self.weights.push, version)
        return time.perf_counter() - start

    # ----------------------------------------------------------------- the run
    async def evaluate(self, step: int) -> dict[str, float]:
        """Every evaluation set at the current weights, logged at `step` as eval/ metrics and samples."""
        metrics, trajs = await self.evaluator.run(self.runner, self.workers)
        for label, items in trajs.items():
            self.metrics.log_samples(step, "eval", self.samples.record_eval(step, label, items))
        return self.metrics.log(step, metrics) if metrics else {}

    async def train(self) -> RunSummary:
        cfg, t0 = self.cfg, time.perf_counter()
        before = after = await self.evaluate(0)
        self._spawn(self.produce())
        last_reward, step, train_start = None, 0, time.perf_counter()
        progress = _progress(cfg)
        for step in range(1, cfg.run.steps + 1):
            record = await self.one_step(step, train_start)
            last_reward = record.get("train/reward_mean", 0.0)
            progress.update(1)
            progress.set_postfix(reward=f"{last_reward:.3f}", tok_s=f"{record['perf/tokens_per_s']:.0f}",
                                 v=self.version)
            if cfg.eval.every and step % cfg.eval.every == 0:
                after = await self.evaluate(step)
            if cfg.run.max_wall_s and time.perf_counter() - train_start > cfg.run.max_wall_s:
                break
        progress.close()
        train_wall = time.perf_counter() - train_start
        for task in list(self.tasks):
            task.cancel()
        state = await self._learner_call(self.learner.full_state_dict)
        save_hf_checkpoint(state, Path(cfg.model.path), self.run_dir / "model")
        if not (cfg.eval.every and step % cfg.eval.every == 0):
            after = await self.evaluate(step)
        greedy = metric_name("eval", cfg.eval.sets[0].label, "greedy") if cfg.eval.sets else ""
        summary = RunSummary(run=cfg.run.name, steps=step, wall_s=time.perf_counter() - t0, train_wall_s=train_wall,
                             heldout_acc_before=before.get(greedy), heldout_acc_after=after.get(greedy),
                             eval_final=after, final_train_reward=last_reward, dropped=dict(self.dropped))
        self.finish(summary)
        return summary

    async def one_step(self, step: int, train_start: float) -> dict[str, Any]:
        """Batch → learner step → weights v+1 to the engines → acknowledge → metrics."""
        step_start, tokens_before = time.perf_counter(), self.tokens_generated
        groups, ids, wait_s = await self.next_batch()
        flat = [t for g in groups for t in g]
        recorded = self.samples.record_train(step, groups, trained_version=step - 1)
        self.metrics.log_samples(step, "train", recorded)
        if self.cfg.run.record_batches:
            _record(self.run_dir / "batches" / f"step_{step:06d}.msgpack", flat)
        stats = await self.train_step(self.to_samples(groups))
        sync_s = await self.push_weights(step)
        async with self.admission:  # admit the next groups only once the engines serve `step`
            self.version = step
            self.admission.notify_all()
        await self._checkpoint_and_ack(step, ids)
        wall = time.perf_counter() - step_start
        record = _step_record(self, flat, stats, wait_s, sync_s, wall, time.perf_counter() - train_start,
                              (self.tokens_generated - tokens_before) / max(wall, 1e-9))
        return self.metrics.log(step, record)

    async def _checkpoint_and_ack(self, step: int, ids: list[str]) -> None:
        """Acknowledge trajectories only once the step that used them is durable."""
        self.unacked += ids
        every = self.cfg.checkpoint.every
        if every and step % every == 0:
            path = self.run_dir / "checkpoints" / f"step_{step:06d}"
            await self._learner_call(self.learner.save_checkpoint, path)
            (path / "meta.json").write_text(json.dumps({"step": step, "version": self.version}))
        if not every or step % every == 0:
            await self.bus.aack(self.unacked)
            self.unacked = []

    def finish(self, summary: RunSummary) -> None:
        (self.run_dir / "summary.json").write_text(summary.model_dump_json(indent=2))
        if self.cfg.logging.plot:
            plot_reward_curve(self.metrics.path, self.run_dir / "reward_curve.png")


def _step_record(orc: Orchestrator, flat: list[Trajectory], stats: StepStats | None, wait_s: float,
                 sync_s: float, wall: float, elapsed: float, tok_s: float) -> dict[str, float]:
    """The step's metrics row: train/, env/, perf/ (rl.metrics names them) and sandbox health."""
    dropped = orc.dropped - orc._dropped_logged
    orc._dropped_logged = collections.Counter(orc.dropped)
    timing = {"train_s": stats.train_s if stats else 0.0, "sync_s": sync_s, "wait_s": wait_s, "step_s": wall,
              "elapsed_s": elapsed}
    return {**step_metrics(flat, stats.model_dump() if stats else {}, version=orc.version,
                           dropped={k: dropped[k] for k in orc.dropped}, timing=timing, tokens_per_s=tok_s),
            **orc.health.drain(shared_pool_stats())}


def _record(path: Path, trajectories: list[Trajectory]) -> None:
    import msgpack

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgpack.packb([t.encode() for t in trajectories], use_bin_type=True))


def load_recorded(path: Path) -> list[Trajectory]:
    """Read a batch written with `run.record_batches`."""
    import msgpack

    return [Trajectory.decode(b) for b in msgpack.unpackb(path.read_bytes(), raw=False)]


def _progress(cfg: Config) -> Any:
    from tqdm import tqdm

    return tqdm(total=cfg.run.steps, desc=f"RL {cfg.run.name}", unit="step", disable=not cfg.logging.progress,
                dynamic_ncols=True)


async def run_training(cfg: Config) -> RunSummary:
    """Start everything, train, and stop everything — also on error or Ctrl-C."""
    import signal

    orc, loop, main = Orchestrator(cfg), asyncio.get_running_loop(), asyncio.current_task()

    def interrupt() -> None:
        # Cancelling the main task alone was seen to be lost mid-step (the run trained on after
        # Ctrl-C); the flag makes the loop stop at its next check either way.
        orc.interrupted = True
        main.cancel()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    board = cfg.logging.dashboard
    dashboard = start_for_run(cfg.run.dir, board.host, board.port) if board.enabled else None
    if dashboard is not None:
        url = dashboard.url(run_location(cfg.run.dir)[1])
        print(f"codeworld: dashboard of this run: {url}", file=sys.stderr, flush=True)
    try:
        await orc.start()
        return await orc.train()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        await asyncio.shield(orc.stop())
        if dashboard is not None:
            dashboard.stop()
