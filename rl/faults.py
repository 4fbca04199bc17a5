"""Faults a run survives without a person: engines that die or hang, a private Redis that dies.

* `EngineSupervisor` owns the rollout engines (Ray actors). Every generate call goes through a
  `GuardedEngine` with the `faults.engine_call_s` deadline. An engine whose vLLM core died
  (`EngineDeadError`), whose actor died, or that hung is restarted — the old actor stopped or
  killed, a new one started with the same config and loaded with the last pushed weights — and
  the failed call raises `EngineFailed`, after which the orchestrator runs the group again or
  drops it as lost. `monitor` polls each engine's liveness, because a call waiting in vLLM when
  its core dies may never return. Pushes carry the `faults.weight_push_s` deadline per engine; an engine that
  fails one is restarted onto those weights. Restarts beyond `faults.engine_restarts` stop the
  run resumably. Each engine starts with its own Ray options (its bundle of the run's placement,
  `rl.placement`); a new group goes to the engine with the fewest groups in flight (`assign`), so
  a slower engine (a smaller GPU, a node shared with the learner) gets fewer groups, not an equal
  share. With the broadcast transport there is no file to load a new engine from: it is held out
  of generation (`ready`) and `rejoin` asks the orchestrator for a push, which forms the transfer
  group again with it and loads the weights the others serve.
* `supervise_redis` restarts the run's private redis-server (same port, same append-only file)
  when it dies; the bus retries its calls across the gap (rl/bus.py).
* `StopResumable` is how any part ends a run that cannot go on by itself: the CLI prints its
  message with the command that resumes, and exits 75 (EX_TEMPFAIL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from rl.config import FaultsSection
from rl.watchdog import Hang, Watchdog
from rl.weights import WeightPush
from workers.rollout import EngineConfig, Generation, RolloutWorker, Sampling

log = logging.getLogger(__name__)

RESUMABLE_EXIT = 75
"""Exit code of a run that stopped resumably (EX_TEMPFAIL)."""


class StopResumable(Exception):
    """The run cannot go on by itself; it stops with its last checkpoint intact."""


class EngineFailed(Exception):
    """A generate call failed because its engine died or hung (the engine is being restarted)."""

    def __init__(self, engine: int, why: str) -> None:
        self.engine, self.why = engine, why
        super().__init__(f"engine {engine} {why}")


def engine_death(exc: BaseException) -> str | None:
    """Why `exc` out of an engine call means the engine is gone ("died: ..."), or None when it is
    an error of the call itself."""
    import ray

    if isinstance(exc, ray.exceptions.RayActorError):
        return f"died (its actor: {type(exc).__name__})"
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and type(cause).__name__ == "EngineDeadError":
        return "died (vLLM EngineDeadError)"
    return None


class EngineSupervisor:
    """The run's rollout engines: started, guarded, pushed to and restarted here."""

    def __init__(
        self,
        configs: list[EngineConfig],
        faults: FaultsSection,
        watchdog: Watchdog,
        start: Callable[..., Any] = RolloutWorker.remote_actor,
        options: list[dict[str, Any]] | None = None,
        rejoin: Callable[[], None] | None = None,
    ) -> None:
        """`start(config, **options)` starts one engine actor; `options`: per engine, its Ray options
        (None: none); `rejoin`: None where a restarted engine loads the last pushed file, else what
        brings a restarted engine onto the served weights (see above; it must not block: the
        restart may run inside a push)."""
        self.configs, self.faults, self.watchdog, self._start = configs, faults, watchdog, start
        self.options = options or [{} for _ in configs]
        self.rejoin = rejoin
        self.ready = [asyncio.Event() for _ in configs]
        """Set while an engine serves the run's weights; a restarted one waits for `rejoin`."""
        for event in self.ready:
            event.set()
        self.handles: list[Any] = []
        self.depth = [0] * len(configs)
        """Generate calls outstanding per engine (its queue depth)."""
        self.groups = [0] * len(configs)
        """Groups assigned to each engine and not yet finished (`assign`)."""
        self.epoch = [0] * len(configs)
        """Restarts per engine: a failure seen under an older epoch was already dealt with."""
        self.restarts = 0
        self.last_push: WeightPush | None = None
        self._locks = [asyncio.Lock() for _ in configs]

    async def start(self) -> None:
        self.handles = [self._start(c, **o) for c, o in zip(self.configs, self.options, strict=True)]
        await asyncio.gather(*(h.get_version.remote() for h in self.handles))

    @property
    def engines(self) -> list[GuardedEngine]:
        """One guarded handle per engine, for episode runners and the evaluator."""
        return [GuardedEngine(self, i) for i in range(len(self.configs))]

    def state(self) -> list[dict[str, Any]]:
        """Per engine: queue depth, groups in flight and restarts (for state dumps and metrics)."""
        return [
            {"engine": i, "queue_depth": self.depth[i], "groups": self.groups[i], "restarts": self.epoch[i]}
            for i in range(len(self.configs))
        ]

    @contextlib.contextmanager
    def assign(self, avoid: int | None = None) -> Iterator[GuardedEngine]:
        """The engine for one group, held while the block runs: the one with the fewest groups in
        flight (the lowest index on a tie), another than `avoid` (a retry's failed engine) when
        there is another."""
        i = min(range(len(self.configs)), key=lambda e: (e == avoid, self.groups[e], e))
        self.groups[i] += 1
        try:
            yield GuardedEngine(self, i)
        finally:
            self.groups[i] -= 1

    async def generate(self, i: int, prompt_ids: list[int], sampling: Sampling) -> list[Generation]:
        await self.ready[i].wait()  # a restarted engine generates only once it serves the run's weights
        epoch = self.epoch[i]
        self.depth[i] += 1
        try:
            return await self.watchdog.guard(
                f"engine {i}: generate",
                self.faults.engine_call_s,
                self.handles[i].generate.remote(prompt_ids, sampling),
            )
        except Hang as hang:
            await self.restart(i, epoch, f"hung ({hang})")
            raise EngineFailed(i, "hung") from None
        except Exception as exc:
            why = engine_death(exc)
            if why is None:
                raise
            await self.restart(i, epoch, why)
            raise EngineFailed(i, why) from None
        finally:
            self.depth[i] -= 1

    async def push(self, push: WeightPush) -> None:
        """Load `push` into every engine; one that fails or passes the deadline is restarted on it."""
        self.last_push = push

        async def one(i: int) -> None:
            epoch = self.epoch[i]
            try:
                await self.watchdog.guard(
                    f"engine {i}: weight push v{push.version}",
                    self.faults.weight_push_s,
                    self.handles[i].update_weights.remote(push),
                )
            except Hang as hang:
                await self.restart(i, epoch, f"hung loading weights ({hang})")
            except Exception as exc:
                why = engine_death(exc)
                if why is None:
                    raise
                await self.restart(i, epoch, why)

        await asyncio.gather(*(one(i) for i in range(len(self.handles))))

    async def dead(self) -> list[int]:
        """Engines whose actor or vLLM core has died (a busy engine that does not answer within
        `faults.engine_poll_s` counts as alive: the calls' own deadlines decide about it)."""
        import ray

        async def one(i: int) -> bool:
            try:
                return bool(await asyncio.wait_for(self.handles[i].errored.remote(), self.faults.engine_poll_s))
            except ray.exceptions.RayActorError:
                return True
            except Exception:
                return False

        found = await asyncio.gather(*(one(i) for i in range(len(self.handles))))
        return [i for i, is_dead in enumerate(found) if is_dead]

    async def monitor(self) -> None:
        """For as long as the run lasts: restart an engine whose vLLM core has died. Killing the
        old actor fails every call still waiting in it, which its caller then retries or drops."""
        while True:
            await asyncio.sleep(self.faults.engine_poll_s)
            for i, handle in enumerate(self.handles):
                epoch = self.epoch[i]
                try:
                    dead = await asyncio.wait_for(handle.errored.remote(), self.faults.engine_poll_s)
                except Exception:  # a busy or dead actor: the calls' own deadlines and errors decide
                    continue
                if dead and self.epoch[i] == epoch:
                    await self.restart(i, epoch, "died (its vLLM core exited)")

    async def restart(self, i: int, epoch: int, why: str) -> None:
        """Replace engine `i` (unless another caller did since `epoch`), loaded with the last push."""
        async with self._locks[i]:
            if self.epoch[i] != epoch:
                return
            self.restarts += 1
            if self.restarts > self.faults.engine_restarts:
                raise StopResumable(
                    f"engine {i} {why}, and the run has restarted engines "
                    f"{self.faults.engine_restarts} times (faults.engine_restarts)"
                )
            log.warning("engine %d %s; restarting it", i, why)
            await self._stop(self.handles[i])
            try:
                handle = self._start(self.configs[i], **self.options[i])
                await self.watchdog.guard(
                    f"engine {i}: restart", self.faults.engine_start_s, handle.get_version.remote()
                )
                if self.last_push is not None:
                    what = f"engine {i}: weight push v{self.last_push.version} after restart"
                    await self.watchdog.guard(
                        what, self.faults.weight_push_s, handle.update_weights.remote(self.last_push)
                    )
            except Exception as exc:
                raise StopResumable(
                    f"engine {i} {why}, and its restart failed: {type(exc).__name__}: "
                    f"{' '.join(str(exc).split())[:300]}"
                ) from None
            self.handles[i] = handle
            self.epoch[i] += 1
            if self.rejoin is not None:
                self.ready[i].clear()
                self.rejoin()
                log.warning("engine %d restarted; it generates again once the next push has loaded it", i)
                return
            log.warning("engine %d restarted, serving v%s", i, self.last_push.version if self.last_push else 0)

    def joined(self) -> None:
        """Every engine serves the weights just pushed to all of them: restarted ones generate again."""
        for event in self.ready:
            event.set()

    @staticmethod
    async def _stop(handle: Any) -> None:
        import ray

        try:  # vLLM ends its core (SIGKILL after 5 s), also a stopped or hung one
            await asyncio.wait_for(handle.shutdown.remote(), timeout=30)
        except Exception:
            pass  # a dead or stuck actor: killed below either way
        ray.kill(handle, no_restart=True)

    async def shutdown(self) -> None:
        await asyncio.gather(*(self._stop(h) for h in self.handles), return_exceptions=True)


class GuardedEngine:
    """An engine as episode runners call it (`generate`), with its deadline and restart."""

    def __init__(self, supervisor: EngineSupervisor, index: int) -> None:
        self.supervisor, self.index = supervisor, index

    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> list[Generation]:
        return await self.supervisor.generate(self.index, prompt_ids, sampling)


async def supervise_redis(server: Any, interval_s: float = 0.5) -> None:
    """Restart the private redis-server whenever it has died, for as long as the run lasts."""
    while True:
        await asyncio.sleep(interval_s)
        if not server.alive():
            log.warning("the private redis-server died; restarting it on its append-only file")
            await asyncio.to_thread(server.restart)
