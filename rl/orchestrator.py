"""The asynchronous RL loop, readable in one file.

    producer ── admits a group while  admitted − retired < (version + max_staleness + 1) × batch_size
       └─ group task: G episodes (EpisodeRunner → RolloutWorker) ─ XADD ─► Redis stream
    trainer  ── XREADGROUP until batch_size groups are ready ─► advantages
                (the staleness rule — admission, assembly, age — lives in rl/buffer.GroupBuffer)
       └─ learner step ─► publish weights v+1 ─► every engine: pause/reload/resume ─► XACK

Generation never waits for the learner except through admission control, and the learner never
waits for one slow episode: it takes whichever groups finish first. With `max_staleness=0` the
loop is synchronous on-policy: every token of batch v is sampled by weights v.

Long runs survive (issue #11): every sample's fate goes to the ledger (rl/ledger.py); checkpoints
carry the orchestrator's state and `--resume` takes the run up where a checkpoint left it
(rl/resume.py); engines that die or hang are restarted (rl/faults.py); a learner rank that dies
has the learner rebuilt from the last checkpoint (`rebuild_learner`); every wait has a deadline
(rl/watchdog.py); SIGTERM checkpoints and exits resumably.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from envs.base import EnvParams, Environment, Task
from envs.registry import get_env
from envs.swe.pools import close_shared_pools, shared_pool_stats
from rl.api.server import run_location, start_for_run
from rl.buffer import GroupBuffer
from rl.bus import BusUnavailable, EntryInfo, TrajectoryBus
from rl.config import Config, ConfigError, EnvSection
from rl.evaluation import Evaluator
from rl.faults import EngineFailed, EngineSupervisor, StopResumable, supervise_redis
from rl.health import HealthMonitor
from rl.learner import LearnerGroup, StepStats, TrainSample
from rl.ledger import Ledger, LedgerTotals, decided_in, sample_id
from rl.loss import batch_advantages
from rl.metrics import MetricsWriter, make_trackers, metric_name, plot_reward_curve, step_metrics
from rl.placement import reserve
from rl.redis_server import connect_or_start
from rl.resume import (
    CheckpointMeta,
    Launch,
    checkpoint_path,
    complete_checkpoints,
    find_checkpoint,
    lock_run_dir,
    plan_adoption,
    read_meta,
    require_fresh,
    rng_state,
    set_aside_later,
    write_meta,
)
from rl.samples import SampleStore
from rl.trajectory import Trajectory
from rl.watchdog import Hang, Watchdog
from rl.weights import WeightSync, exchange_dir, save_hf_checkpoint
from workers.chat import ChatRenderer
from workers.episode import EpisodeRunner
from workers.rollout import EngineConfig, Sampling, checkpoint_dir
from workers.weight_transfer import WeightTransferRefused

log = logging.getLogger(__name__)


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
    ledger: LedgerTotals
    """Every sample's fate, totalled (ledger.jsonl has them one by one)."""
    launch: Launch
    """The lineage and launch that wrote this summary (and the checkpoint it resumed from)."""
    faults: dict[str, int]
    """Parts restarted during this launch: engine_restarts, learner_rebuilds, redis_restarts,
    bus_reconnects, hangs."""
    stopped: str | None = None
    """Why the run stopped before its last step and can be resumed (None: it finished)."""
    bus_published: int | None = None
    """Trajectories ever published on the lineage's stream, as Redis counts them (None: the run
    stopped before the count was taken): every one has a line in the ledger."""


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


class Preempted(Exception):
    """SIGTERM arrived: checkpoint now and exit resumably."""


class LearnerFailed(Exception):
    """A learner call failed because a rank died or hung; the learner is rebuilt."""


@dataclass
class Flight:
    """A group whose episodes run (for state dumps)."""

    env: str
    task: str
    version: int
    """The version the engines served when it was admitted."""
    started: float = field(default_factory=time.time)
    engine: int | None = None


class Orchestrator:
    """Owns one run: Ray actors, the bus, admission control and the training loop."""

    def __init__(self, cfg: Config, resume: str | None = None) -> None:
        """`resume`: "latest" or a checkpoint directory to resume from (None: a fresh run)."""
        self.cfg = cfg
        self.run_dir = cfg.run.dir
        self.rng = random.Random(cfg.run.seed)
        self.slots = [EnvSlot(i, e) for i, e in enumerate(cfg.envs)]
        self.buffer = GroupBuffer(cfg.algorithm, cfg.rollout.max_concurrent_episodes)
        self.dropped = collections.Counter({"no_reward": 0, "stale": 0, "zero_variance_groups": 0})
        self._dropped_logged = collections.Counter(self.dropped)  # as of the last metrics row
        self.health = HealthMonitor()
        self.evaluator = Evaluator(cfg, self.health)
        self.tokens_generated = 0
        self.admission = asyncio.Condition()
        self.push_lock = asyncio.Lock()
        """Held from a learner step through its push, and by every other push: no push reads the
        learner's weights while a step changes them."""
        self.unacked: list[str] = []  # bus ids of trajectories trained on but not yet durable
        self.tasks: set[asyncio.Task[Any]] = set()  # the producer and its groups
        self.services: set[asyncio.Task[Any]] = set()  # run-long helpers (the Redis supervisor)
        self.publishing: set[asyncio.Future[Any]] = set()  # publishes that must land before a scan
        self.learner_calls: set[asyncio.Future[Any]] = set()
        self.flights: dict[str, Flight] = {}
        self.entry_of: dict[str, str] = {}  # sample id -> bus entry id, while undecided
        self.fatal: BaseException | None = None
        self.interrupted = False  # set by Ctrl-C; the loop raises KeyboardInterrupt at its next check
        self.preempted = False  # set by SIGTERM; the loop checkpoints and stops at its next check
        self.resume_from = find_checkpoint(cfg.run.dir, resume) if resume else None
        self.launch = (
            Launch.resumed(cfg.run.name, self.resume_from[1]) if self.resume_from else Launch.fresh(cfg.run.name)
        )
        self.learner_step = 0  # steps the learner's weights include
        self.learner_broken = False  # a learner failure the run could not rebuild from
        self.train_s_before = 0.0  # training seconds of the launches before this one
        self.heldout_before: dict[str, float] = {}
        self.faults = collections.Counter({"engine_restarts": 0, "learner_rebuilds": 0, "hangs": 0})
        self.outstanding_max = 0  # most groups admitted and undecided at once, this step
        self.last_progress = time.monotonic()  # a trajectory read or a group finished
        self.last_record: dict[str, float] = {}
        self.bus_published: int | None = None
        self._private_redis = None

    # ----------------------------------------------------------------- start / stop
    async def start(self) -> None:
        import ray
        from transformers import AutoTokenizer

        cfg, resumed = self.cfg, self.resume_from
        model_dir = checkpoint_dir(cfg.model.path)
        self._lock = lock_run_dir(self.run_dir)
        if resumed is None:
            require_fresh(self.run_dir)
        step = resumed[1].step if resumed else None
        # Trackers first: a tracker configured but not installed fails before anything starts.
        self.metrics = MetricsWriter(
            self.run_dir,
            make_trackers(self.run_dir, cfg.run.name, cfg.logging, cfg.model_dump(mode="json")),
            resume_step=step,
        )
        self.ledger = Ledger(self.run_dir, step, resumed[1].open_groups if resumed else None)
        self.watchdog = Watchdog(self.run_dir, self.state_dump)
        # The bus before Ray: an unreachable or wrongly protected Redis is one clear error at start.
        self._start_bus(resumed is not None)
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            cpus = None if os.environ.get("RAY_ADDRESS") else max(os.cpu_count() or 1, cfg.learner.world_size)
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False, num_cpus=cpus)
        # Every actor's resources are held before the first one starts (an impossible plan fails here).
        self.placement = await asyncio.to_thread(reserve, cfg)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.runner = EpisodeRunner(
            ChatRenderer(tokenizer), cfg.run.name, cfg.rollout.max_model_len, cfg.algorithm.unfinished_reward
        )
        self.samples = SampleStore(self.run_dir, cfg.logging.samples, self.runner.renderer.decode, cfg.run.seed)
        configs = engine_configs(cfg, model_dir)
        self.weights = WeightSync(
            cfg.weights,
            [cfg.rollout.tensor_parallel_size] * len(configs),
            self.placement.plan.transport(cfg.weights.transport),
            exchange_dir(f"{cfg.run.name}-{uuid.uuid4().hex[:8]}"),
            cfg.model.dtype,
        )
        self.supervisor = EngineSupervisor(
            configs,
            cfg.faults,
            self.watchdog,
            options=[self.placement.options(p) for p in self.placement.plan.engines],
            rejoin=None if self.weights.transport == "file" else lambda: self._service(self._rejoin()),
        )
        await self.supervisor.start()
        self._service(self.supervisor.monitor())
        self.workers = self.supervisor.engines
        self.learner = await self._new_learner()
        if resumed is not None:
            async with self.push_lock:
                await self.restore(*resumed, lost_reason="lost:crash")

    def _start_bus(self, resumed: bool) -> None:
        """The lineage's stream. A private Redis keeps an append-only file in the run directory, so
        a resumed launch finds its predecessor's entries; a fresh run starts it empty."""
        cfg = self.cfg
        aof = self.run_dir / "redis"
        if not resumed:
            shutil.rmtree(aof, ignore_errors=True)
        url, self._private_redis = connect_or_start(cfg.bus.redis_url, aof, cfg.bus.password_env)
        if self._private_redis is not None:
            self._service(supervise_redis(self._private_redis))
        # A resumed launch's predecessor is dead: its pending entries are taken over at once.
        self.bus = TrajectoryBus(
            url,
            self.launch.bus_id,
            self.launch.consumer,
            retry_s=cfg.faults.redis_s,
            **({"claim_idle_ms": 0} if resumed else {}),
        )

    async def _new_learner(self) -> LearnerGroup:
        cfg = self.cfg
        return await self.watchdog.guard(
            "learner: start",
            cfg.faults.learner_call_s,
            asyncio.to_thread(
                LearnerGroup,
                str(checkpoint_dir(cfg.model.path)),
                cfg.learner,
                cfg.algorithm,
                cfg.rollout.temperature,
                cfg.run.seed,
                cfg.rollout.max_tokens,
                self.placement,
            ),
        )

    async def _learner_call(self, fn: Any, *args: Any, what: str = "call") -> Any:
        """A blocking learner call in a thread that `stop` waits for: cancelling the awaiting
        task cannot stop the thread, and shutting Ray down under a thread still in `ray.get`
        hangs the interpreter's exit (Ctrl-C mid-step never returned). A rank that died, or a
        call past `faults.learner_call_s`, is a `LearnerFailed`."""
        import ray

        call = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self.learner_calls.add(call)
        call.add_done_callback(self.learner_calls.discard)
        try:
            return await self.watchdog.guard(f"learner: {what}", self.cfg.faults.learner_call_s, asyncio.shield(call))
        except Hang as hang:
            raise LearnerFailed(str(hang)) from None
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            raise LearnerFailed(
                f"learner {what} failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            ) from None

    def _service(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.services.add(task)
        task.add_done_callback(self._finished)

    async def stop(self) -> None:
        """Stop everything this run started; safe to call after a failure or Ctrl-C."""
        import ray

        for task in list(self.tasks) + list(self.services):
            task.cancel()
        await asyncio.gather(*self.tasks, *self.services, return_exceptions=True)
        if self.learner_calls:
            await asyncio.wait(self.learner_calls, timeout=120)
        await close_shared_pools()  # the sandbox pools this run's environments opened
        if hasattr(self, "supervisor"):
            await self.supervisor.shutdown()
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
        for part in ("metrics", "samples", "ledger", "_lock"):
            if hasattr(self, part):
                getattr(self, part).close()

    # ----------------------------------------------------------------- generation side
    @property
    def version(self) -> int:
        """The policy version the engines serve: the number of learner steps taken."""
        return self.buffer.version

    async def produce(self) -> None:
        """Admit groups for as long as the run lasts (the buffer's staleness rule decides when)."""
        weights = [s.section.weight for s in self.slots]
        while True:
            async with self.admission:
                await self.admission.wait_for(self.buffer.can_admit)
                index = self.buffer.admit()
                group_id = self.launch.group_id(index)
                slot = self.rng.choices(self.slots, weights)[0]
                task = self.rng.choice(slot.tasks)
                self.ledger.open(group_id, self.cfg.algorithm.group_size, slot.section.name)
                self.outstanding_max = max(self.outstanding_max, self.ledger.open_group_count)
            self.flights[group_id] = Flight(slot.section.name, task.id, self.version)
            self._spawn(self.run_group(slot, task, index, group_id))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        self.services.discard(task)
        if not task.cancelled() and task.exception() is not None and self.fatal is None:
            self.fatal = task.exception()

    async def run_group(self, slot: EnvSlot, task: Task, index: int, group_id: str) -> None:
        """G episodes of one task; the group is published whole, or counted lost. A group whose
        engine died is run again on the restarted engine (`faults.group_retries` times)."""
        try:
            outcomes, lost = await self._episodes(slot, task, index, group_id)
        finally:
            self.flights.pop(group_id, None)
        self.last_progress = time.monotonic()
        ids = [sample_id(group_id, i) for i in range(self.cfg.algorithm.group_size)]
        if lost is not None:
            self.ledger.dropped(ids, self.version + 1, lost)
            self.dropped[lost] += len(ids)
            async with self.admission:
                self.buffer.generated(0, index)
                self.admission.notify_all()
            return
        self.health.observe(slot.section.name, outcomes)
        no_reward = [(sid, o) for sid, o in zip(ids, outcomes) if o.trajectory is None]
        for sid, o in no_reward:
            self.ledger.dropped([sid], self.version + 1, f"no_reward:{o.kind}")
        self.dropped["no_reward"] += len(no_reward)
        self.dropped.update(f"no_reward:{o.kind}" for _, o in no_reward)
        trajs = [o.trajectory for o in outcomes if o.trajectory is not None]
        ids = [sid for sid, o in zip(ids, outcomes) if o.trajectory is not None]
        if trajs:
            trajs = [t.model_copy(update={"id": sid, "group_size": len(trajs)}) for sid, t in zip(ids, trajs)]
            self.tokens_generated += sum(t.num_model_tokens for t in trajs)
            # Shielded: a publish under way lands even if the group is cancelled (run end, rewind),
            # and whoever scans the stream next waits for it (`_stop_generation`).
            publish = asyncio.ensure_future(self.bus.apublish(trajs))
            self.publishing.add(publish)
            publish.add_done_callback(self.publishing.discard)
            await asyncio.shield(publish)
        async with self.admission:
            self.buffer.generated(len(trajs), index)
            self.admission.notify_all()

    async def _episodes(self, slot: EnvSlot, task: Task, index: int, group_id: str) -> tuple[list[Any], str | None]:
        """The group's outcomes, or the reason it is lost (its engine failed past the retries, or
        its episodes passed `faults.episode_s`)."""
        cfg = self.cfg
        sampling = Sampling(
            max_tokens=cfg.rollout.max_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p
        )
        lost, failed = None, None
        for attempt in range(cfg.faults.group_retries + 1):
            # The shallowest engine, not round-robin; a retry goes to another engine where there is one.
            with self.supervisor.assign(avoid=failed) as engine:
                self.flights[group_id].engine = engine.index
                # No per-request seeds: vLLM's CPU sampler cannot restore a seeded generator's position
                # when a weight update preempts the request (the engine dies); the engine seed is enough.
                episodes = self.runner.run_group(
                    [slot.make() for _ in range(cfg.algorithm.group_size)], task, engine, sampling, group_id
                )
                try:
                    return await self.watchdog.guard(
                        f"group {group_id} ({slot.section.name}): episodes", cfg.faults.episode_s, episodes
                    ), None
                except EngineFailed as exc:
                    lost, failed = f"lost:engine_{exc.why.split()[0]}", engine.index
                    log.warning("group %s: %s (attempt %d)", group_id, exc, attempt + 1)
                except Hang:
                    self.faults["hangs"] += 1
                    return [], "lost:deadline"
        return [], lost

    # ----------------------------------------------------------------- learner side
    async def next_batch(self) -> tuple[list[list[Trajectory]], list[str], float]:
        """Read until `batch_size` groups are ready to train (see `GroupBuffer`). Returns them,
        the bus ids to acknowledge after the step, and the seconds spent waiting."""
        a, start, groups, ids = self.cfg.algorithm, time.perf_counter(), [], []
        while len(groups) < a.batch_size:
            if self.interrupted:
                raise KeyboardInterrupt
            if self.preempted:
                raise Preempted
            if self.fatal is not None:
                raise self.fatal
            if not self.buffer.ready:
                entries = await self.bus.aread(count=a.batch_size * a.group_size, block_ms=self.cfg.bus.block_ms)
                async with self.admission:
                    ids += self._accept(entries)
                    self._settle_retired()
                    self.admission.notify_all()  # retired groups free their slots at once
            async with self.admission:
                taken, done = self.buffer.take(a.batch_size - len(groups))
                self._settle_retired()
                self.admission.notify_all()
            groups += taken
            ids += done
            self._check_waiting()
        return groups, ids, time.perf_counter() - start

    def _accept(self, entries: list[tuple[str, Trajectory]]) -> list[str]:
        """Entries read into the buffer; returns the ids of those to acknowledge unread: samples the
        ledger does not hold open are not this lineage's to train (or were decided already)."""
        if entries:
            self.last_progress = time.monotonic()
        skip = []
        for entry_id, traj in entries:
            if self.ledger.is_open(traj.id):
                self.entry_of[traj.id] = entry_id
                self.ledger.note_env(traj.group_id, traj.env)
                self.buffer.add(entry_id, traj)
            else:
                skip.append(entry_id)
                self.dropped["foreign_entries"] += 1
        for info in self.bus.take_undecodable():
            self._lose_member(info)
        return skip

    def _lose_member(self, info: EntryInfo) -> None:
        """An undecodable entry (the bus acknowledged it): its sample is dropped, its group goes on
        without it."""
        if info.trajectory_id and info.group_id and info.group_size and self.ledger.is_open(info.trajectory_id):
            self.ledger.dropped(
                [info.trajectory_id], self.version + 1, "undecodable", {info.trajectory_id: info.entry_id}
            )
            self.buffer.lose_member(info.group_id, info.group_size)
        self.dropped["undecodable"] += 1

    def _settle_retired(self) -> None:
        """Groups the buffer retired (stale, future, zero variance): in the ledger and the counters."""
        for reason, items in self.buffer.retirements:
            self.ledger.dropped([t.id for _, t in items], self.version + 1, reason, {t.id: e for e, t in items})
            self.dropped["zero_variance_replaced" if reason == "zero_variance" else reason] += len(items)
            for _, t in items:
                self.entry_of.pop(t.id, None)
        self.buffer.retirements.clear()

    def _check_waiting(self) -> None:
        """The watchdog of the learner's wait: nothing read and no group finished for
        `faults.batch_wait_s` stops the run resumably, naming what it waited for."""
        waited = time.monotonic() - self.last_progress
        if waited > self.cfg.faults.batch_wait_s:
            self.faults["hangs"] += 1
            hang = self.watchdog.hung(
                "learner: waiting for a batch (no trajectory arrived, no group finished)", self.cfg.faults.batch_wait_s
            )
            raise StopResumable(str(hang))

    def to_samples(self, groups: list[list[Trajectory]]) -> tuple[list[TrainSample], dict[str, str]]:
        """The batch's samples with their advantages (`rl.loss.batch_advantages`), and why each
        trajectory left out of them was (sample id -> reason)."""
        a = self.cfg.algorithm
        rewards = [[t.reward for t in g] for g in groups]
        if a.shuffle_rewards:  # the wiring control: the batch's rewards, permuted across samples
            flat = [r for rs in rewards for r in rs]
            self.rng.shuffle(flat)
            it = iter(flat)
            rewards = [[next(it) for _ in g] for g in groups]
        loss_weights = {s.section.name: s.section.loss_weight for s in self.slots}
        scored, filtered = batch_advantages(groups, rewards, a, loss_weights, self.cfg.rollout.max_tokens)
        self.dropped["zero_variance_groups"] += filtered
        kept = {t.id for t, _ in scored}
        left_out = {
            t.id: "overlong" if a.overlong == "filter" and t.truncated else "zero_variance"
            for g in groups
            for t in g
            if t.id not in kept
        }
        return [
            TrainSample(
                input_ids=np.concatenate([t.prompt_ids, t.completion_ids]),
                prompt_len=len(t.prompt_ids),
                loss_mask=t.loss_mask,
                sampler_logprobs=t.sampler_logprobs,
                advantage=adv,
                age=max(0, self.version - t.min_version),
            )
            for t, adv in scored
        ], left_out

    async def train_step(self, samples: list[TrainSample]) -> StepStats | None:
        if not samples:
            return None
        n = self.cfg.algorithm.minibatches
        if n > 1:  # random minibatch membership; with one minibatch order cannot matter
            self.rng.shuffle(samples)
        minibatches = [samples[i::n] for i in range(n) if samples[i::n]]
        return await self._learner_call(self.learner.train_step, minibatches, what="train step")

    async def push_weights(self, version: int) -> float:
        """Publish the learner's weights as `version` and load them into every engine."""
        start = time.perf_counter()
        if self.weights.transport == "file":
            push = await self._learner_call(self.learner.publish, self.weights.root, version, what="publish weights")
            await self.supervisor.push(push)
        else:
            await self._broadcast(version)
        return time.perf_counter() - start

    async def _broadcast(self, version: int) -> None:
        """The broadcast push. A dead engine would never join the transfer group (the learner would
        wait `weights.timeout_s` for it), so the engines are checked first and a dead one restarted:
        the push then forms the group anew with it (`WeightSync`). When the push fails and an engine
        has died, that engine is restarted and the push runs once more; otherwise a refusal stops
        the run resumably and any other failure is the learner's. Call with `push_lock` held."""
        for i in await self.supervisor.dead():
            await self.supervisor.restart(i, self.supervisor.epoch[i], "died")
        what = f"broadcast weights v{version}"
        try:
            await self._learner_call(self.weights.push, self.learner, self.supervisor.handles, version, what=what)
        except (LearnerFailed, WeightTransferRefused) as err:
            dead = await self.supervisor.dead()
            if not dead:
                if isinstance(err, WeightTransferRefused):  # on every attempt (weights.push_attempts)
                    raise StopResumable(f"weight push v{version}: {err}") from None
                raise
            for i in dead:
                await self.supervisor.restart(i, self.supervisor.epoch[i], f"died during the push of v{version}")
            await self._learner_call(self.weights.push, self.learner, self.supervisor.handles, version, what=what)
        self.supervisor.joined()

    async def _rejoin(self) -> None:
        """An engine restarted under the broadcast transport: push the learner's weights, the version
        the others serve, to every engine, which forms the transfer group anew with it. Nothing to
        do when a push since the restart has loaded it."""
        async with self.push_lock:
            if not all(ready.is_set() for ready in self.supervisor.ready):
                await self._broadcast(self.learner_step)

    # ----------------------------------------------------------------- the run
    async def evaluate(self, step: int) -> dict[str, float]:
        """Every evaluation set at the current weights, logged at `step` as eval/ metrics and samples.
        An engine restarted under it voids the evaluation, which runs once more."""
        for attempt in (1, 2):
            try:
                metrics, trajs = await self.evaluator.run(self.runner, self.workers)
                break
            except EngineFailed as exc:
                if attempt == 2:
                    raise StopResumable(f"evaluation at step {step}: {exc}, twice") from None
        for label, items in trajs.items():
            self.metrics.log_samples(step, "eval", self.samples.record_eval(step, label, items))
        return self.metrics.log(step, metrics) if metrics else {}

    async def train(self) -> RunSummary:
        cfg, t0 = self.cfg, time.perf_counter()
        if self.launch.resumed_from is None:
            # No checkpoint of step 0: saving an optimizer without state makes torch initialise it
            # with a zero-gradient step, which counts in Adam's bias correction, so the run would
            # train differently from one that never saved (seen as weights off by 0.08 at step 6).
            self.heldout_before = await self.evaluate(0)
        self.last_progress = time.monotonic()
        self._spawn(self.produce())
        train_start = time.perf_counter() - self.train_s_before
        step, after, last_reward, stopped = await self._steps(train_start)
        train_wall = time.perf_counter() - train_start
        if stopped is None:
            await self.end_run(step)
            state = await self._learner_call(self.learner.full_state_dict, what="gather the weights")
            save_hf_checkpoint(state, Path(cfg.model.path), self.run_dir / "model")
            if not (cfg.eval.every and step % cfg.eval.every == 0):
                after = await self.evaluate(step)
        greedy = metric_name("eval", cfg.eval.sets[0].label, "greedy") if cfg.eval.sets else ""
        summary = RunSummary(
            run=cfg.run.name,
            steps=self.learner_step,
            wall_s=time.perf_counter() - t0,
            train_wall_s=train_wall,
            heldout_acc_before=self.heldout_before.get(greedy),
            heldout_acc_after=after.get(greedy),
            eval_final=after,
            final_train_reward=last_reward,
            dropped=dict(self.dropped),
            ledger=self.ledger.summary(),
            launch=self.launch,
            faults=self._fault_counts(),
            stopped=stopped,
            bus_published=self.bus_published,
        )
        self.finish(summary)
        return summary

    async def _steps(self, train_start: float) -> tuple[int, dict[str, Any], float | None, str | None]:
        """Learner steps until `run.steps`, the wall-clock cap or SIGTERM (checkpointed). Returns the
        last step, the latest held-out evaluation, the last train reward, and why the run stopped
        early (None: it did not)."""
        cfg, after = self.cfg, self.heldout_before
        last_reward, step, stopped = None, self.version, None
        progress = _progress(cfg, step)
        try:
            while step < cfg.run.steps:
                try:
                    record = await self.one_step(step + 1, train_start)
                except LearnerFailed as err:
                    step = await self.rebuild_learner(err)
                    progress.reset(cfg.run.steps)
                    progress.update(step)
                    continue
                step += 1
                last_reward = record.get("train/reward_mean", last_reward)
                progress.update(1)
                progress.set_postfix(
                    reward=f"{last_reward or 0:.3f}", tok_s=f"{record['perf/tokens_per_s']:.0f}", v=self.version
                )
                if cfg.eval.every and step % cfg.eval.every == 0:
                    after = await self.evaluate(step)
                if self.preempted:
                    raise Preempted
                if cfg.run.max_wall_s and time.perf_counter() - train_start > cfg.run.max_wall_s:
                    break
        except Preempted:
            stopped = f"preempted (SIGTERM) at step {self.learner_step}"
            await self._stop_generation()
            await self._checkpoint_and_ack(self.learner_step, [], force=True)
        except (StopResumable, BusUnavailable) as err:
            raise StopResumable(await self._stop_resumably(err)) from None
        finally:
            progress.close()
        return step, after, last_reward, stopped

    def _fault_counts(self) -> dict[str, int]:
        redis = self._private_redis.restarts if self._private_redis is not None else 0
        return {
            **self.faults,
            "engine_restarts": self.supervisor.restarts,
            "redis_restarts": redis,
            "bus_reconnects": self.bus.reconnects,
        }

    async def _stop_resumably(self, err: BaseException) -> str:
        """Checkpoint what the learner holds when it can, and say where the run resumes from."""
        learner_ahead = not self.learner_broken and self.learner_step > self._last_checkpoint()
        if not isinstance(err, BusUnavailable) and learner_ahead:
            try:
                await self._checkpoint_and_ack(self.learner_step, [], force=True, ack=False)
            except Exception as exc:  # the learner may be what failed: the last checkpoint stands
                log.error("could not checkpoint step %d before stopping: %s", self.learner_step, exc)
        last = self._last_checkpoint()
        where = (
            f"it resumes from the checkpoint of step {last}"
            if last >= 0
            else "no checkpoint was written yet, so it cannot resume"
        )
        return f"{err}; the run stopped at step {self.learner_step}, and {where}"

    def _last_checkpoint(self) -> int:
        done = complete_checkpoints(self.run_dir)
        return read_meta(done[-1]).step if done else -1

    async def one_step(self, step: int, train_start: float) -> dict[str, Any]:
        """Batch → learner step → weights v+1 to the engines → acknowledge → metrics."""
        step_start, tokens_before = time.perf_counter(), self.tokens_generated
        groups, ids, wait_s = await self.next_batch()
        flat = [t for g in groups for t in g]
        recorded = self.samples.record_train(step, groups, trained_version=step - 1)
        self.metrics.log_samples(step, "train", recorded)
        if self.cfg.run.record_batches:
            _record(self.run_dir / "batches" / f"step_{step:06d}.msgpack", flat)
        samples, left_out = self.to_samples(groups)
        async with self.push_lock:  # a rejoin push must find the learner's weights and step agreeing
            stats = await self.train_step(samples)
            self.learner_step = step
            self._decide(step, flat, left_out)
            sync_s = await self.push_weights(step)
        async with self.admission:  # admit the next groups only once the engines serve `step`
            self.buffer.advance(step)
            self.admission.notify_all()
        wall = time.perf_counter() - step_start
        record = _step_record(
            self,
            flat,
            stats,
            wait_s,
            sync_s,
            wall,
            time.perf_counter() - train_start,
            (self.tokens_generated - tokens_before) / max(wall, 1e-9),
        )
        # The row goes out before the checkpoint: a checkpoint of step k must find row k written, or
        # a crash between the two leaves the resumed run's curve without step k (seen in the chaos test).
        self.last_record = self.metrics.log(step, record)
        await self._checkpoint_and_ack(step, ids)
        return self.last_record

    def _decide(self, step: int, flat: list[Trajectory], left_out: dict[str, str]) -> None:
        """The batch's fates in the ledger: trained by `step`, or left out of the loss."""
        entries = {t.id: self.entry_of.pop(t.id) for t in flat}
        self.ledger.trained([t.id for t in flat if t.id not in left_out], step, entries)
        for reason in set(left_out.values()):
            self.ledger.dropped([sid for sid, r in left_out.items() if r == reason], step, reason, entries)

    async def _checkpoint_and_ack(self, step: int, ids: list[str], force: bool = False, ack: bool = True) -> None:
        """Acknowledge trajectories only once the step that used them is durable."""
        self.unacked += ids
        every = self.cfg.checkpoint.every
        due = force or (every and step % every == 0)
        if due:
            await self.save_checkpoint(step)
        if ack and (due or not every):
            await self.bus.aack(self.unacked)
            self.unacked = []

    async def save_checkpoint(self, step: int) -> None:
        """The learner's state (DCP), then the orchestrator's (`meta.json`, last: it marks the
        checkpoint complete). A checkpoint of this step that exists gets only new metadata."""
        path = checkpoint_path(self.run_dir, step)
        if not (path / ".metadata").is_file():
            await self._learner_call(self.learner.save_checkpoint, path, what=f"checkpoint step {step}")
        meta = CheckpointMeta(
            step=step,
            lineage=self.launch.lineage,
            launch=self.launch.launch,
            world_size=self.cfg.learner.world_size,
            rng_state=rng_state(self.rng),
            env_weights=[s.section.weight for s in self.slots],
            tokens_generated=self.tokens_generated,
            dropped=dict(self.dropped),
            open_groups=self.ledger.snapshot(step),
            train_s=self.last_record.get("perf/elapsed_s", self.train_s_before),
            heldout_before=self.heldout_before,
        )
        write_meta(path, meta)
        log.info("checkpoint of step %d written to %s", step, path)

    # ----------------------------------------------------------------- recovery
    async def restore(self, path: Path, meta: CheckpointMeta, lost_reason: str) -> None:
        """Go back to a checkpoint: the learner's state, the orchestrator's, the engines on its
        weights, and the stream taken over (`rl.resume.plan_adoption`). The ledger and the metrics
        were cut back to its step already."""
        for moved in set_aside_later(self.run_dir, meta.step, self.launch.launch):
            log.warning("checkpoint %s is after the one resumed from; set aside as %s", moved.name, moved)
        await self._learner_call(self.learner.load_checkpoint, path, what=f"load checkpoint step {meta.step}")
        self.learner_step = meta.step
        self.rng = meta.rng()
        self.dropped = collections.Counter(meta.dropped)
        self._dropped_logged = collections.Counter(self.dropped)
        self.tokens_generated = meta.tokens_generated
        for slot, weight in zip(self.slots, meta.env_weights, strict=True):
            slot.section.weight = weight
        self.train_s_before, self.heldout_before = meta.train_s, meta.heldout_before
        entries = await asyncio.to_thread(self.bus.scan)
        decided = decided_in(self.ledger.path, {e.trajectory_id for e in entries if e.trajectory_id})
        plan = plan_adoption(entries, meta.open_groups, decided)
        await self.bus.aack(plan.acknowledge)
        self.ledger.adopt(plan.adopted)
        self.ledger.dropped(plan.lost, meta.step + 1, lost_reason)
        self.dropped[lost_reason] += len(plan.lost)
        a = self.cfg.algorithm
        # Groups left on the stream were admitted already: they hold slots until judged.
        self.buffer = GroupBuffer(
            a,
            self.cfg.rollout.max_concurrent_episodes,
            version=meta.step,
            admitted=meta.step * a.batch_size + plan.groups,
        )
        self.unacked, self.entry_of = [], {}
        await self.push_weights(meta.step)
        log.info(
            "resumed at step %d: %d entries taken over (%d adopted), %d samples lost, %d already decided",
            meta.step,
            len(entries),
            len(plan.adopted),
            len(plan.lost),
            len(plan.acknowledge),
        )

    async def rebuild_learner(self, err: LearnerFailed) -> int:
        """A rank died or hung: new ranks, back to the last checkpoint; returns its step."""
        self.faults["learner_rebuilds"] += 1
        checkpoints = complete_checkpoints(self.run_dir)
        if self.faults["learner_rebuilds"] > self.cfg.faults.learner_rebuilds or not checkpoints:
            why = (
                "there is no checkpoint to rebuild it from yet (checkpoint.every is 0, or the first is still due)"
                if not checkpoints
                else f"the learner was rebuilt {self.cfg.faults.learner_rebuilds} times already "
                "(faults.learner_rebuilds)"
            )
            self.learner_broken = True
            raise StopResumable(f"{err}; {why}")
        log.warning("%s; rebuilding the learner from %s", err, checkpoints[-1])
        await self._stop_generation()
        await asyncio.to_thread(self.learner.shutdown)
        self.learner = await self._new_learner()
        meta = read_meta(checkpoints[-1])
        self.ledger.close()
        self.ledger = Ledger(self.run_dir, meta.step, meta.open_groups)
        self.metrics.rewind(meta.step)
        self.samples.forget_after(meta.step)
        self.bus.rewind()
        async with self.push_lock:
            await self.restore(checkpoints[-1], meta, lost_reason="lost:rewind")
        self.last_progress = time.monotonic()
        self._spawn(self.produce())
        return meta.step

    async def _stop_generation(self) -> None:
        """Cancel the producer and every group, and wait for publishes under way to land."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.publishing:
            await asyncio.gather(*self.publishing, return_exceptions=True)
        self.flights.clear()

    async def end_run(self, step: int) -> None:
        """The run's last step is done: every sample still open is dropped as `run_ended` (the
        ledger closes), the final state is checkpointed, and the stream is emptied and removed."""
        await self._stop_generation()
        entries = await asyncio.to_thread(self.bus.scan)
        on_stream = {e.trajectory_id: e.entry_id for e in entries if e.trajectory_id}
        left = self.ledger.open_ids()
        self.ledger.dropped(left, step, "run_ended", on_stream)
        self.dropped["run_ended"] += len(left)
        if self.cfg.checkpoint.every:
            await self.save_checkpoint(step)
        await self.bus.aack(self.unacked + [e.entry_id for e in entries])
        self.unacked = []
        self.bus_published = await asyncio.to_thread(self.bus.published_total)
        await asyncio.to_thread(self.bus.delete)

    def state_dump(self) -> dict[str, Any]:
        """What a watchdog writes when something hangs."""
        now = time.time()
        flights = [
            {
                "group": g,
                "env": f.env,
                "task": f.task,
                "engine": f.engine,
                "admitted_at_version": f.version,
                "age_versions": self.version - f.version,
                "age_s": round(now - f.started, 3),
            }
            for g, f in self.flights.items()
        ]
        supervisor = getattr(self, "supervisor", None)
        bus = getattr(self, "bus", None)
        return {
            "run": self.cfg.run.name,
            "launch": self.launch.model_dump(),
            "version": self.version,
            "learner_step": self.learner_step,
            "in_flight_groups": flights,
            "buffer": self.buffer.state(),
            "engines": supervisor.state() if supervisor else [],
            "last_step": {k: v for k, v in self.last_record.items() if k.startswith("perf/")},
            "bus": {"reconnects": bus.reconnects, "decode_errors": bus.decode_errors} if bus else {},
            "ledger": self.ledger.summary().model_dump() if hasattr(self, "ledger") else {},
        }

    def finish(self, summary: RunSummary) -> None:
        (self.run_dir / "summary.json").write_text(summary.model_dump_json(indent=2))
        if self.cfg.logging.plot:
            plot_reward_curve(self.metrics.path, self.run_dir / "reward_curve.png")


def engine_configs(cfg: Config, model_dir: Path) -> list[EngineConfig]:
    """One config per rollout engine. Each has its own seed: engines seeded alike would draw the
    same samples for the same prompt."""
    r = cfg.rollout
    base = EngineConfig(
        model_path=str(model_dir),
        dtype=cfg.model.dtype,
        max_model_len=r.max_model_len,
        enforce_eager=r.enforce_eager,
        kv_cache_gib=r.kv_cache_gib,
        cpu_cores=r.cpu_cores,
        tensor_parallel_size=r.tensor_parallel_size,
        gpu_memory_utilization=r.gpu_memory_utilization,
        seed=cfg.run.seed,
    )
    return [base.model_copy(update={"seed": cfg.run.seed + i}) for i in range(r.num_workers)]


def _step_record(
    orc: Orchestrator,
    flat: list[Trajectory],
    stats: StepStats | None,
    wait_s: float,
    sync_s: float,
    wall: float,
    elapsed: float,
    tok_s: float,
) -> dict[str, float]:
    """The step's metrics row: train/, env/, perf/ (rl.metrics names them) and sandbox health."""
    dropped = orc.dropped - orc._dropped_logged
    orc._dropped_logged = collections.Counter(orc.dropped)
    timing = {
        "train_s": stats.train_s if stats else 0.0,
        "sync_s": sync_s,
        "wait_s": wait_s,
        "step_s": wall,
        "elapsed_s": elapsed,
    }
    # Groups admitted and not yet trained or dropped, at most, during the step: the in-flight
    # budget, (max_staleness + 1) × batch_size whenever generation keeps up (a leak shrinks it).
    survival = {
        metric_name("buffer", "outstanding_max"): float(orc.outstanding_max),
        **{metric_name("faults", k): float(v) for k, v in orc._fault_counts().items()},
    }
    orc.outstanding_max = orc.ledger.open_group_count
    return {
        **step_metrics(
            flat,
            stats.model_dump() if stats else {},
            version=orc.version,
            dropped={k: dropped[k] for k in orc.dropped},
            timing=timing,
            tokens_per_s=tok_s,
        ),
        **orc.health.drain(shared_pool_stats()),
        **survival,
    }


def _record(path: Path, trajectories: list[Trajectory]) -> None:
    import msgpack

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgpack.packb([t.encode() for t in trajectories], use_bin_type=True))


def load_recorded(path: Path) -> list[Trajectory]:
    """Read a batch written with `run.record_batches`."""
    import msgpack

    return [Trajectory.decode(b) for b in msgpack.unpackb(path.read_bytes(), raw=False)]


def _progress(cfg: Config, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=cfg.run.steps,
        initial=initial,
        desc=f"RL {cfg.run.name}",
        unit="step",
        disable=not cfg.logging.progress,
        dynamic_ncols=True,
    )


async def run_training(cfg: Config, resume: str | None = None) -> RunSummary:
    """Start everything, train, and stop everything — also on error, Ctrl-C or SIGTERM.
    `resume`: "latest" or a checkpoint directory to go on from (None: a fresh run)."""
    import signal

    orc, loop, main = Orchestrator(cfg, resume), asyncio.get_running_loop(), asyncio.current_task()

    def interrupt() -> None:
        # Cancelling the main task alone was seen to be lost mid-step (the run trained on after
        # Ctrl-C); the flag makes the loop stop at its next check either way.
        orc.interrupted = True
        main.cancel()

    def preempt() -> None:
        # What Slurm and Kubernetes send before they take the machine: the loop checkpoints at its
        # next check (within a bus read, or after the step in progress) and the run exits 0.
        log.warning("SIGTERM: checkpointing and stopping; resume with --resume")
        orc.preempted = True

    loop.add_signal_handler(signal.SIGINT, interrupt)
    loop.add_signal_handler(signal.SIGTERM, preempt)
    board = cfg.logging.dashboard
    dashboard = start_for_run(cfg.run.dir, board.host, board.port) if board.enabled else None
    if dashboard is not None:
        url = dashboard.url(run_location(cfg.run.dir)[1])
        print(f"codeworld: dashboard of this run: {url}", file=sys.stderr, flush=True)
    try:
        await orc.start()
        # Starting Ray installs its own SIGTERM handler (it aborted the driver, exit -6, instead of
        # checkpointing): ours go back on top of it.
        loop.add_signal_handler(signal.SIGINT, interrupt)
        loop.add_signal_handler(signal.SIGTERM, preempt)
        return await orc.train()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        await asyncio.shield(orc.stop())
        if dashboard is not None:
            dashboard.stop()
