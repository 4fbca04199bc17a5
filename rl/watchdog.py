"""Watchdogs: every wait of a run has a deadline (`faults.*_s`), and a wait that passes it is
named, not silent.

`Watchdog.guard(what, seconds, awaitable)` awaits with a deadline. On expiry it writes a state dump
to `<run dir>/hang-<time>.json` — what hung and for how long, the groups in flight with their ages
and versions, the engines' queue depths, the buffer, the last step's timings (whatever the
orchestrator's `state` callback reports) — logs one line naming it, and raises `Hang`. The caller
decides what follows: restart the part (an engine, the learner ranks) or stop the run resumably.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class Hang(Exception):
    """A wait passed its deadline. The message names the wait and the dump."""

    def __init__(self, what: str, seconds: float, dump: Path | None) -> None:
        self.what, self.seconds, self.dump = what, seconds, dump
        where = f"; state dump: {dump}" if dump is not None else ""
        super().__init__(f"{what} did not finish within its deadline of {seconds:g} s{where}")


class Watchdog:
    """Deadlines and state dumps for one run."""

    def __init__(self, run_dir: Path, state: Callable[[], dict[str, Any]]) -> None:
        """`state`: the run's state for a dump (called on the event loop; must not block)."""
        self.run_dir, self.state = run_dir, state
        self.hangs: list[Hang] = []
        """Every hang so far, oldest first."""

    async def guard(self, what: str, seconds: float, awaitable: Awaitable[_T]) -> _T:
        """`await awaitable`, or `Hang` (after a dump) once `seconds` have passed. The awaitable is
        cancelled then; a thread or a remote call behind it may run on, which the caller handles
        by restarting that part."""
        start = time.time()
        try:
            return await asyncio.wait_for(awaitable, seconds)
        except TimeoutError:
            raise self.hung(what, seconds, started=start) from None

    def hung(self, what: str, seconds: float, started: float | None = None) -> Hang:
        """Record a hang found by the caller itself: dump the state and return the `Hang`."""
        dump = self.dump(what, seconds, started)
        hang = Hang(what, seconds, dump)
        self.hangs.append(hang)
        log.error("watchdog: %s", hang)
        return hang

    def dump(self, what: str, seconds: float, started: float | None = None) -> Path | None:
        """Write `hang-<time>.json`; a failure to write is logged, never raised (the hang matters more)."""
        now = time.time()
        try:
            state = self.state()
        except Exception as exc:  # a dump that fails half-way must still name the hang
            state = {"state_error": f"{type(exc).__name__}: {exc}"}
        body = {
            "what": what,
            "deadline_s": seconds,
            "time": now,
            "waited_s": None if started is None else now - started,
            **state,
        }
        stamp = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{int(now * 1000) % 1000:03d}"
        path = self.run_dir / f"hang-{stamp}.json"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(body, indent=1, default=str))
        except OSError as exc:
            log.error("watchdog: could not write the state dump %s: %s", path, exc)
            return None
        return path
