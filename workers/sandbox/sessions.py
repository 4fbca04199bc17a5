"""Sessions held on behalf of remote callers (the HTTP service and the Ray actor), by id, with an
idle timeout so a caller that vanishes does not keep a sandbox forever."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid

from pydantic import BaseModel, ConfigDict, field_validator

from workers.sandbox.models import validate_relative_path
from workers.sandbox.pool import SandboxPool, Session


class FilesPayload(BaseModel):
    """Files for put_files, or returned by get_files."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64", extra="forbid")

    files: dict[str, bytes]
    """Relative path -> content."""

    @field_validator("files")
    @classmethod
    def _inside(cls, files: dict[str, bytes]) -> dict[str, bytes]:
        for path in files:
            validate_relative_path(path)
        return files


class PathsRequest(BaseModel):
    """Paths to read back with get_files."""

    model_config = ConfigDict(extra="forbid")

    paths: list[str]
    """Relative paths inside the work dir."""

    @field_validator("paths")
    @classmethod
    def _inside(cls, paths: list[str]) -> list[str]:
        for path in paths:
            validate_relative_path(path)
        return paths


class SessionLimit(RuntimeError):
    """Opening one more session would pass a cap; the message says which."""


class SessionOpened(BaseModel):
    """Reply to opening a session."""

    id: str
    """Session id to pass to the session calls."""


class SessionRegistry:
    """Open sessions of one pool, closed after `idle_s` without a call; at most `max_sessions`
    in all and `max_per_owner` per owner (None: no cap), counting those still being opened."""

    def __init__(
        self,
        pool: SandboxPool,
        idle_s: float = 600.0,
        max_sessions: int | None = None,
        max_per_owner: int | None = None,
    ) -> None:
        self.pool, self.idle_s = pool, idle_s
        self.max_sessions, self.max_per_owner = max_sessions, max_per_owner
        self._open: dict[str, tuple[contextlib.AsyncExitStack, Session, list[float]]] = {}
        self._owners: collections.Counter[str] = collections.Counter()
        self._owner_of: dict[str, str] = {}

    async def open(self, owner: str = "") -> str:
        """Open a session for `owner`; SessionLimit when a cap would be passed."""
        if self.max_sessions is not None and self._owners.total() >= self.max_sessions:
            raise SessionLimit(
                f"the service already holds its maximum of {self.max_sessions} sessions; "
                "close one or wait for idle ones to expire."
            )
        if self.max_per_owner is not None and self._owners[owner] >= self.max_per_owner:
            raise SessionLimit(
                f"this client already holds its maximum of {self.max_per_owner} sessions; close one first."
            )
        self._owners[owner] += 1  # counted before the wait for a sandbox: concurrent opens see it
        try:
            stack = contextlib.AsyncExitStack()
            session = await stack.enter_async_context(self.pool.session())
        except BaseException:
            self._owners[owner] -= 1
            raise
        session_id = uuid.uuid4().hex
        self._open[session_id] = (stack, session, [time.monotonic()])
        self._owner_of[session_id] = owner
        return session_id

    def get(self, session_id: str) -> Session:
        if session_id not in self._open:
            raise KeyError(f"sandbox session {session_id!r} does not exist (closed or expired).")
        _, session, used = self._open[session_id]
        used[0] = time.monotonic()
        return session

    async def close(self, session_id: str) -> None:
        entry = self._open.pop(session_id, None)
        if entry is not None:
            self._owners[self._owner_of.pop(session_id)] -= 1
            await entry[0].aclose()

    async def close_all(self) -> None:
        for session_id in list(self._open):
            await self.close(session_id)

    async def expire_forever(self) -> None:
        """Background task: closes sessions idle for longer than idle_s."""
        while True:
            await asyncio.sleep(min(self.idle_s / 4, 30.0))
            now = time.monotonic()
            for session_id, (_, _, used) in list(self._open.items()):
                if now - used[0] > self.idle_s:
                    await self.close(session_id)
