"""The trajectory bus: Redis Streams with a consumer group between rollout and learner.

Delivery is at-least-once until acknowledged. The learner acknowledges a trajectory only after the
step that used it is checkpointed; `ack` also deletes the entry, so the stream holds only
undelivered and unacknowledged trajectories. A learner that restarts gets its unacknowledged
entries back on its first `read` (same consumer name), and entries of another consumer that has
been idle longer than `claim_idle_ms` (a learner restarted under a new name) are claimed then too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Literal

import redis

from rl.trajectory import Trajectory

GROUP = "learners"
"""The consumer group every learner reads through."""
_FIELD = b"t"
_CLAIM_PAGE = 100

logger = logging.getLogger(__name__)


def stream_key(run_id: str) -> str:
    """Redis key of a run's trajectory stream."""
    return f"codeworld:{run_id}:trajectories"


@dataclass
class _ReadBox:
    """Hands one `aread` result to whoever still wants it: its caller or, if cancelled, the stash."""

    result: list[tuple[str, Trajectory]] | None = None
    abandoned: bool = False


class TrajectoryBus:
    """Publish, read and acknowledge `Trajectory` objects of one run.

    Thread-safe; the `a*` methods run the blocking calls on a worker thread for asyncio callers.
    """

    def __init__(self, redis_url: str, run_id: str, consumer: str = "learner-0", *,
                 claim_idle_ms: int = 60_000) -> None:
        """Connect and create the stream and its consumer group if missing.

        consumer: this reader's name in the group; a restarted learner should reuse its name.
        claim_idle_ms: on the first read, pending entries of other consumers idle at least this
            long are taken over. Keep it above the time a live learner holds entries unacknowledged
            (up to `checkpoint.every` steps), or a second live learner would train them twice.
        """
        self.key = stream_key(run_id)
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.decode_errors = 0
        """Entries dropped because they did not decode to a `Trajectory`."""
        self.redelivered = 0
        """Trajectories returned from the pending list after a (re)start."""
        self._redis = redis.Redis.from_url(redis_url)
        self._lock = threading.Lock()  # serialises reads: the phase and pending cursor are shared
        self._phase: Literal["claim", "pending", "live"] = "claim"
        self._pending_cursor = b"0"
        self._stash: list[tuple[str, Trajectory]] = []  # results of cancelled `aread` calls
        self._stash_lock = threading.Lock()  # never held during I/O: taken on the event loop
        try:
            self._redis.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def publish(self, trajectories: list[Trajectory]) -> list[str]:
        """Append trajectories in order, in one round trip; returns their stream ids."""
        if not trajectories:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for trajectory in trajectories:
            pipe.xadd(self.key, {_FIELD: trajectory.encode()})
        return [entry_id.decode() for entry_id in pipe.execute()]

    def read(self, count: int, block_ms: int) -> list[tuple[str, Trajectory]]:
        """Up to `count` (id, trajectory) pairs, waiting at most `block_ms` (<= 0: no wait).

        After a (re)start, this consumer's unacknowledged entries come first (without waiting),
        then new ones. Undecodable entries are counted in `decode_errors` and acknowledged.
        """
        with self._lock:
            return self._read_locked(count, block_ms)

    def _read_locked(self, count: int, block_ms: int) -> list[tuple[str, Trajectory]]:
        with self._stash_lock:
            if self._stash:
                out, self._stash = self._stash[:count], self._stash[count:]
                return out
        if self._phase == "claim":
            self._claim_idle()
            self._phase = "pending"
        while self._phase == "pending":
            entries = self._xreadgroup(self._pending_cursor, count, None)
            if not entries:
                self._phase = "live"
                break
            self._pending_cursor = entries[-1][0]
            good = self._decode(entries)
            if good:  # a page of only bad entries: go on to the next page
                self.redelivered += len(good)
                return good
        return self._decode(self._xreadgroup(b">", count, block_ms if block_ms > 0 else None))

    def _claim_idle(self) -> None:
        """Move pending entries idle >= claim_idle_ms (of any consumer) to this consumer's list.

        The claimed entries are read back through the pending list right after, so they are not
        returned here: that would return this consumer's own entries twice.
        """
        cursor, claimed = b"0-0", 0
        while True:
            cursor, entries, _deleted = self._redis.xautoclaim(
                self.key, GROUP, self.consumer, self.claim_idle_ms, cursor, count=_CLAIM_PAGE)
            claimed += len(entries)
            if cursor in (b"0-0", "0-0"):
                break
        if claimed:
            logger.info("trajectory bus %s: %s took over %d idle pending entries",
                        self.key, self.consumer, claimed)

    def _xreadgroup(self, start: bytes, count: int, block_ms: int | None) -> list:
        response = self._redis.xreadgroup(GROUP, self.consumer, {self.key: start},
                                          count=count, block=block_ms)
        return response[0][1] if response else []

    def _decode(self, entries: list) -> list[tuple[str, Trajectory]]:
        out: list[tuple[str, Trajectory]] = []
        bad: list[str] = []
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            try:
                out.append((entry_id, Trajectory.decode(fields[_FIELD])))
            except Exception as exc:  # any malformed entry, whatever the failure: drop, don't die
                bad.append(entry_id)
                reason = " ".join(str(exc).split())[:200]
                logger.warning("trajectory bus %s: dropped undecodable entry %s (%s: %s)",
                               self.key, entry_id, type(exc).__name__, reason)
        if bad:
            self.decode_errors += len(bad)
            self.ack(bad)
        return out

    def ack(self, ids: list[str]) -> int:
        """Acknowledge and delete entries; returns how many were pending."""
        if not ids:
            return 0
        pipe = self._redis.pipeline(transaction=True)  # never an ack without its delete
        pipe.xack(self.key, GROUP, *ids)
        pipe.xdel(self.key, *ids)
        acked, _deleted = pipe.execute()
        return int(acked)

    def pending_count(self) -> int:
        """Entries delivered to any consumer of the group and not yet acknowledged."""
        return int(self._redis.xpending(self.key, GROUP)["pending"])

    def backlog(self) -> int:
        """Entries published and not yet delivered to any consumer."""
        for group in self._redis.xinfo_groups(self.key):
            if group["name"] == GROUP.encode():
                if group["lag"] is not None:
                    return int(group["lag"])
                # Redis reports no lag when deletions make it uncomputable. Acknowledged entries
                # are deleted, so every entry left is either pending or undelivered.
                return int(self._redis.xlen(self.key)) - int(group["pending"])
        raise RuntimeError(f"consumer group {GROUP!r} of {self.key} is gone")

    def published_total(self) -> int:
        """Trajectories ever published on this stream (deletions do not lower it)."""
        return int(self._redis.xinfo_stream(self.key)["entries-added"])

    async def apublish(self, trajectories: list[Trajectory]) -> list[str]:
        """`publish` without blocking the event loop."""
        return await asyncio.to_thread(self.publish, trajectories)

    async def aread(self, count: int, block_ms: int) -> list[tuple[str, Trajectory]]:
        """`read` without blocking the event loop.

        If the caller is cancelled (e.g. by `asyncio.wait_for`), whatever the read delivers is
        kept and returned by the next read instead of waiting in the pending list for a restart.
        """
        box = _ReadBox()

        def work() -> list[tuple[str, Trajectory]]:
            with self._lock:
                got = self._read_locked(count, block_ms)
                with self._stash_lock:
                    if box.abandoned:
                        self._stash.extend(got)
                    else:
                        box.result = got
            return got

        try:
            return await asyncio.to_thread(work)
        except asyncio.CancelledError:
            with self._stash_lock:
                box.abandoned = True
                if box.result:
                    self._stash.extend(box.result)
            raise

    async def aack(self, ids: list[str]) -> int:
        """`ack` without blocking the event loop."""
        return await asyncio.to_thread(self.ack, ids)

    def close(self) -> None:
        """Close the connections."""
        self._redis.close()

    def __enter__(self) -> TrajectoryBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
