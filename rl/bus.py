"""The trajectory bus: Redis Streams with a consumer group between rollout and learner.

Delivery is at-least-once until acknowledged. The learner acknowledges a trajectory only after the
step that used it is checkpointed; `ack` also deletes the entry, so the stream holds only
undelivered and unacknowledged trajectories. A learner that restarts gets its unacknowledged
entries back on its first `read` (same consumer name), and entries of another consumer that has
been idle longer than `claim_idle_ms` (a learner restarted under a new name) are claimed then too.

Across a dropped connection (Redis restarted, a network blip) every call is retried with backoff
for up to `retry_s`, and nothing is lost or doubled: a publish is one atomic script keyed by a
token, so a retry after a lost reply adds nothing twice; a read whose reply was lost left its
entries in this consumer's pending list, so the next read goes through that list again and returns
only the entries not already handed out (`_held`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rl.trajectory import Trajectory

GROUP = "learners"
"""The consumer group every learner reads through."""
_FIELD = b"t"
_CLAIM_PAGE = 100
_SCAN_PAGE = 500
_RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
"""Errors of the connection or of a server still loading its data: worth retrying."""
_TOKEN_TTL_S = 3600
"""How long a publish token is remembered (a retry comes within seconds)."""
_T = TypeVar("_T")

# One publish, atomically: unless this token published already (then its ids are returned again),
# add every trajectory with its id, group and group size beside the payload (for scans that must
# not decode), and remember the ids under the token.
_PUBLISH = (
    """
if redis.call('EXISTS', KEYS[2]) == 1 then return redis.call('LRANGE', KEYS[2], 0, -1) end
local ids = {}
for i = 1, #ARGV, 4 do
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 't', ARGV[i], 'i', ARGV[i + 1], 'g', ARGV[i + 2],
                             'n', ARGV[i + 3])
end
redis.call('RPUSH', KEYS[2], unpack(ids))
redis.call('EXPIRE', KEYS[2], %d)
return ids
"""
    % _TOKEN_TTL_S
)

logger = logging.getLogger(__name__)


class BusUnavailable(ConnectionError):
    """Redis stayed unreachable for longer than the bus retries."""


@dataclass(frozen=True)
class EntryInfo:
    """What the stream says of one entry without decoding its trajectory."""

    entry_id: str
    trajectory_id: str | None
    group_id: str | None
    group_size: int | None


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

    def __init__(
        self,
        redis_url: str,
        run_id: str,
        consumer: str = "learner-0",
        *,
        claim_idle_ms: int = 60_000,
        retry_s: float = 120.0,
    ) -> None:
        """Connect and create the stream and its consumer group if missing.

        consumer: this reader's name in the group; a restarted learner should reuse its name.
        claim_idle_ms: on the first read, pending entries of other consumers idle at least this
            long are taken over. Keep it above the time a live learner holds entries unacknowledged
            (up to `checkpoint.every` steps), or a second live learner would train them twice; a
            resumed run, whose predecessor is known dead, takes them over at once (0).
        retry_s: how long a call is retried through a dropped connection before `BusUnavailable`.
        """
        self.key = stream_key(run_id)
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.retry_s = retry_s
        self.decode_errors = 0
        """Entries dropped because they did not decode to a `Trajectory`."""
        self.redelivered = 0
        """Trajectories returned from the pending list after a (re)start."""
        self.reconnects = 0
        """Calls that had to be retried after a dropped connection."""
        self.undecodable: list[EntryInfo] = []
        """Undecodable entries (acknowledged at once) not yet collected by `take_undecodable`."""
        # Reads block at most `block_ms` (kept well below this): a Redis that stops answering
        # altogether is a timeout, retried like a dropped connection, not a silent hang.
        # No retries inside redis-py: a read it repeated by itself after a lost reply would leave
        # the first reply's entries in the pending list unseen; `_call` retries knowingly.
        self._redis = redis.Redis.from_url(
            redis_url, socket_timeout=60, socket_connect_timeout=5, retry=Retry(NoBackoff(), 0)
        )
        self._publish_script = self._redis.register_script(_PUBLISH)
        self._lock = threading.Lock()  # serialises reads: the phase and pending cursor are shared
        self._phase: Literal["claim", "pending", "live"] = "claim"
        self._pending_cursor = b"0"
        self._held: set[str] = set()  # handed out by `read`, not yet acknowledged
        self._stash: list[tuple[str, Trajectory]] = []  # results of cancelled `aread` calls
        self._stash_lock = threading.Lock()  # never held during I/O: taken on the event loop
        self._call(self._create_group)

    def _create_group(self) -> None:
        try:
            self._redis.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _call(self, fn: Callable[..., _T], *args: object, _reading: bool = False, **kwargs: object) -> _T:
        """`fn(*args, **kwargs)`, retried with exponential backoff while the connection is down.
        `_reading`: the call reads entries (under the read lock)."""
        deadline, delay = time.monotonic() + self.retry_s, 0.05
        while True:
            try:
                return fn(*args, **kwargs)
            except _RETRYABLE as exc:
                self.reconnects += 1
                if _reading:
                    # The reply may be what was lost: its entries then sit in this consumer's
                    # pending list, and only a pass through that list gives them back.
                    self._phase, self._pending_cursor = "pending", b"0"
                if time.monotonic() + delay > deadline:
                    why = " ".join(str(exc).split())[:200]
                    raise BusUnavailable(
                        f"the trajectory bus {self.key}: Redis did not answer for "
                        f"{self.retry_s:.0f} s ({type(exc).__name__}: {why})."
                    ) from None
                logger.warning("trajectory bus %s: %s; retrying in %.2f s", self.key, type(exc).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def publish(self, trajectories: list[Trajectory]) -> list[str]:
        """Append trajectories in order, atomically (all or none) and at most once, however often
        a dropped connection makes the call repeat; returns their stream ids."""
        if not trajectories:
            return []
        args: list[bytes | str | int] = []
        for t in trajectories:
            args += [t.encode(), t.id, t.group_id, t.group_size]
        token = f"{self.key}:publish:{uuid.uuid4().hex}"
        ids = self._call(self._publish_script, keys=[self.key, token], args=args)
        return [entry_id.decode() for entry_id in ids]

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
            self._call(self._claim_idle)
            self._phase = "pending"
        while self._phase == "pending":
            entries = self._call(self._xreadgroup, self._pending_cursor, count, None, _reading=True)
            if not entries:
                self._phase = "live"
                break
            self._pending_cursor = entries[-1][0]
            good = self._hand_out(self._decode(entries))
            if good:  # a page of only bad or held entries: go on to the next page
                self.redelivered += len(good)
                return good
        entries = self._call(self._xreadgroup, b">", count, block_ms if block_ms > 0 else None, _reading=True)
        if self._phase == "pending":  # the connection dropped during this read: go through the list
            return self._read_locked(count, 0)
        return self._hand_out(self._decode(entries))

    def _hand_out(self, got: list[tuple[str, Trajectory]]) -> list[tuple[str, Trajectory]]:
        fresh = [(entry_id, t) for entry_id, t in got if entry_id not in self._held]
        self._held.update(entry_id for entry_id, _ in fresh)
        return fresh

    def _claim_idle(self) -> None:
        """Move pending entries idle >= claim_idle_ms (of any consumer) to this consumer's list.

        The claimed entries are read back through the pending list right after, so they are not
        returned here: that would return this consumer's own entries twice.
        """
        cursor, claimed = b"0-0", 0
        while True:
            cursor, entries, _deleted = self._redis.xautoclaim(
                self.key, GROUP, self.consumer, self.claim_idle_ms, cursor, count=_CLAIM_PAGE
            )
            claimed += len(entries)
            if cursor in (b"0-0", "0-0"):
                break
        if claimed:
            logger.info("trajectory bus %s: %s took over %d idle pending entries", self.key, self.consumer, claimed)

    def _xreadgroup(self, start: bytes, count: int, block_ms: int | None) -> list:
        response = self._redis.xreadgroup(GROUP, self.consumer, {self.key: start}, count=count, block=block_ms)
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
                self.undecodable.append(_info(entry_id, fields))
                reason = " ".join(str(exc).split())[:200]
                logger.warning(
                    "trajectory bus %s: dropped undecodable entry %s (%s: %s)",
                    self.key,
                    entry_id,
                    type(exc).__name__,
                    reason,
                )
        if bad:
            self.decode_errors += len(bad)
            self.ack(bad)
        return out

    def take_undecodable(self) -> list[EntryInfo]:
        """The undecodable entries met since the last call (their group lost a member)."""
        out, self.undecodable = self.undecodable, []
        return out

    def rewind(self) -> None:
        """Forget what was handed out: the next reads return every unacknowledged entry of this
        consumer again (the learner went back to a checkpoint and will train them anew)."""
        with self._lock, self._stash_lock:
            self._held.clear()
            self._stash.clear()
            self._phase, self._pending_cursor = "pending", b"0"

    def scan(self) -> list[EntryInfo]:
        """Every entry still on the stream (unacknowledged or undelivered), in order, without
        decoding a trajectory."""
        out: list[EntryInfo] = []
        start = "-"
        while True:
            page = self._call(self._redis.xrange, self.key, min=start, count=_SCAN_PAGE)
            out += [_info(raw_id.decode(), fields) for raw_id, fields in page]
            if len(page) < _SCAN_PAGE:
                return out
            start = "(" + page[-1][0].decode()

    def ack(self, ids: list[str]) -> int:
        """Acknowledge and delete entries; returns how many were pending."""
        if not ids:
            return 0

        def ack_and_delete() -> int:
            pipe = self._redis.pipeline(transaction=True)  # never an ack without its delete
            pipe.xack(self.key, GROUP, *ids)
            pipe.xdel(self.key, *ids)
            acked, _deleted = pipe.execute()
            return int(acked)

        acked = self._call(ack_and_delete)  # both are idempotent: a retry changes nothing
        self._held.difference_update(ids)
        return acked

    def pending_count(self) -> int:
        """Entries delivered to any consumer of the group and not yet acknowledged."""
        return int(self._call(self._redis.xpending, self.key, GROUP)["pending"])

    def backlog(self) -> int:
        """Entries published and not yet delivered to any consumer."""
        for group in self._call(self._redis.xinfo_groups, self.key):
            if group["name"] == GROUP.encode():
                if group["lag"] is not None:
                    return int(group["lag"])
                # Redis reports no lag when deletions make it uncomputable. Acknowledged entries
                # are deleted, so every entry left is either pending or undelivered.
                return int(self._call(self._redis.xlen, self.key)) - int(group["pending"])
        raise RuntimeError(f"consumer group {GROUP!r} of {self.key} is gone")

    def published_total(self) -> int:
        """Trajectories ever published on this stream (deletions do not lower it)."""
        return int(self._call(self._redis.xinfo_stream, self.key)["entries-added"])

    def delete(self) -> None:
        """Remove the stream (at the end of a run, once every entry is accounted for)."""
        self._call(self._redis.delete, self.key)

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


def _info(entry_id: str, fields: dict) -> EntryInfo:
    def text(key: bytes) -> str | None:
        value = fields.get(key)
        return value.decode(errors="replace") if isinstance(value, bytes) else None

    size = text(b"n")
    return EntryInfo(
        entry_id=entry_id,
        trajectory_id=text(b"i"),
        group_id=text(b"g"),
        group_size=int(size) if size is not None and size.isdigit() else None,
    )
