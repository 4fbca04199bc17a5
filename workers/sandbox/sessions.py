"""Sessions held on behalf of remote callers (the HTTP service and the Ray actor), by id, with an
idle timeout so a caller that vanishes does not keep a sandbox forever."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

from pydantic import BaseModel, ConfigDict

from workers.sandbox.pool import SandboxPool, Session


class FilesPayload(BaseModel):
    """Files for put_files, or returned by get_files."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64", extra="forbid")

    files: dict[str, bytes]
    """Relative path -> content."""


class PathsRequest(BaseModel):
    """Paths to read back with get_files."""

    paths: list[str]
    """Relative paths inside the work dir."""


class SessionOpened(BaseModel):
    """Reply to opening a session."""

    id: str
    """Session id to pass to the session calls."""


class SessionRegistry:
    """Open sessions of one pool, closed after `idle_s` without a call."""

    def __init__(self, pool: SandboxPool, idle_s: float = 600.0) -> None:
        self.pool, self.idle_s = pool, idle_s
        self._open: dict[str, tuple[contextlib.AsyncExitStack, Session, list[float]]] = {}

    async def open(self) -> str:
        stack = contextlib.AsyncExitStack()
        session = await stack.enter_async_context(self.pool.session())
        session_id = uuid.uuid4().hex
        self._open[session_id] = (stack, session, [time.monotonic()])
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
