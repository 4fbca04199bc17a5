"""The host end of the agent protocol: length-prefixed JSON frames plus raw blobs (see agent.py),
over whatever byte stream reaches the agent (a docker exec socket or a local pipe pair)."""

from __future__ import annotations

import asyncio
import json
import struct
from collections import deque
from pathlib import Path
from typing import Any, Protocol

AGENT_SOURCE = (Path(__file__).with_name("agent.py")).read_text()
AGENT_ARGS = ["-I", "-c", AGENT_SOURCE, "agent"]
"""The interpreter's arguments that start the agent (its JSON config follows): the source travels on
the command line, so nothing has to be copied into a sandbox, and `-I` (isolated mode) keeps the
working directory, the user site and PYTHON* variables out of its imports."""

_HEADER = struct.Struct(">I")
_MAX_HEADER = 1 << 20


class ChannelClosed(ConnectionError):
    """The agent's byte stream ended: the agent, its sandbox or the daemon in between went away.
    `sent` is False when the request provably never reached the agent (the stream was already
    gone), so running it elsewhere cannot run the program twice."""

    def __init__(self, message: str, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class ByteSink(Protocol):
    """Where frames are written."""

    async def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class TailBuffer:
    """Keeps the last `limit` bytes of a stream (the agent's own stderr, for error messages)."""

    def __init__(self, limit: int = 8192) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._limit = limit

    def add(self, data: bytes) -> None:
        self._chunks.append(data[-self._limit :])
        self._size += len(self._chunks[-1])
        while self._size > self._limit and len(self._chunks) > 1:
            self._size -= len(self._chunks.popleft())

    def text(self) -> str:
        return b"".join(self._chunks)[-self._limit :].decode(errors="replace").strip()


class AgentChannel:
    """One request at a time to one agent; replies are parsed with size checks so a broken or
    hostile agent cannot make the host allocate without bound."""

    def __init__(self, reader: asyncio.StreamReader, sink: ByteSink, stderr: TailBuffer) -> None:
        self._reader = reader
        self._sink = sink
        self.stderr = stderr
        self._lock = asyncio.Lock()
        self.closed = False

    async def ready(self) -> dict[str, Any]:
        """Waits for the agent's first frame, which says it started."""
        header, _ = await self._read_frame(0)
        return header

    async def request(
        self, header: dict[str, Any], blobs: list[bytes] = (), max_reply_bytes: int = 0
    ) -> tuple[dict[str, Any], list[bytes]]:
        """Sends one request and reads its reply, whose blobs may total at most max_reply_bytes."""
        async with self._lock:
            if self.closed:
                raise ChannelClosed("the sandbox channel was already closed", sent=False)
            raw = json.dumps(dict(header, blobs=[len(b) for b in blobs])).encode()
            try:
                await self._sink.write(_HEADER.pack(len(raw)) + raw)
            except (ConnectionError, OSError) as exc:
                self.closed = True
                raise ChannelClosed(self._why(exc), sent=False) from exc
            try:
                for blob in blobs:
                    if blob:
                        await self._sink.write(blob)
                return await self._read_frame(max_reply_bytes)
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
                self.closed = True
                raise ChannelClosed(self._why(exc)) from exc
            except BaseException:
                # A cancelled or failed request leaves the stream mid-frame: nothing can follow it.
                self.closed = True
                raise

    async def _read_frame(self, max_reply_bytes: int) -> tuple[dict[str, Any], list[bytes]]:
        try:
            (size,) = _HEADER.unpack(await self._reader.readexactly(4))
            if size > _MAX_HEADER:
                raise ChannelClosed(f"the agent sent a {size}-byte header; the channel is corrupt")
            header = json.loads(await self._reader.readexactly(size))
            sizes = header.get("blobs", [])
            if sum(sizes) > max_reply_bytes:
                raise ChannelClosed(f"the agent announced {sum(sizes)} reply bytes, over the cap")
            blobs = [await self._reader.readexactly(n) if n else b"" for n in sizes]
        except asyncio.IncompleteReadError as exc:
            self.closed = True
            raise ChannelClosed(self._why(exc)) from exc
        return header, blobs

    def _why(self, exc: BaseException) -> str:
        tail = self.stderr.text()
        return f"the sandbox agent went away ({type(exc).__name__})" + (f": {tail}" if tail else "")

    def mark_closed(self) -> None:
        """Called by the transport when the stream ends, so an idle dead sandbox is never leased."""
        self.closed = True

    def close(self) -> None:
        self.closed = True
        self._sink.close()
