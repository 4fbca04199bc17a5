"""The host-side handle of one warm sandbox, whatever holds it (a container or a local process)."""

from __future__ import annotations

import abc
import asyncio
import time

from workers.sandbox.channel import AgentChannel, ChannelClosed
from workers.sandbox.config import SandboxLimits
from workers.sandbox.files import pack_files, unpack_files
from workers.sandbox.models import ExecRequest, ExecResult, Isolation, Status, validate_relative_path

HOST_GRACE_S = 2.0
"""The agent enforces the deadline; the host gives up this much later (agent hung or stopped)."""
TRANSFER_BYTES_PER_S = 20e6
"""Slowest transfer rate assumed when stretching the host deadline for big stdin or files."""
_OUTCOMES = {
    "timeout": Status.TIMEOUT,
    "output_limit": Status.OUTPUT_LIMIT,
    "oom": Status.OOM,
    "launcher_killed": Status.RUNTIME_ERROR,
    "launcher_died": Status.SANDBOX_ERROR,
}
_OUTCOME_ERRORS = {
    "launcher_killed": "the program killed or stopped the sandbox's process launcher; the sandbox is replaced",
    "launcher_died": "the sandbox's process launcher died during the run; the sandbox is replaced",
}


def oom_kill_count(text: str) -> int | None:
    """The `oom_kill N` count of a cgroup's memory.events (v2) or memory.oom_control (v1)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


class SandboxBroken(Exception):
    """This sandbox can no longer be used (its agent, container or daemon failed). `started` is
    False when the request never reached the sandbox, so it is safe to run it elsewhere."""

    def __init__(self, message: str, started: bool = True) -> None:
        super().__init__(message)
        self.started = started


class SandboxHung(SandboxBroken):
    """The agent did not answer within the host's deadline; the sandbox is dirty and closed."""


class Box(abc.ABC):
    """One warm sandbox: runs programs through its agent, resets between tasks."""

    isolation: Isolation
    programs_own_uid: bool = True
    """Programs run under a uid of their own, so they cannot signal the agent: an agent that dies
    in a live sandbox was killed by something else (the OOM killer, the host), see `oom_kills_now`."""

    def __init__(self, channel: AgentChannel, limits: SandboxLimits) -> None:
        self.channel = channel
        self.limits = limits
        self.dirty = False
        self.memory_mb: int | None = None
        self.tasks = 0
        """Tasks served (one-shot runs and sessions); the pool replaces the sandbox at the limit."""
        self.broken_by_program = False
        """A program of the current task broke this sandbox (killed its agent or launcher)."""
        self.oom_kills = 0
        """OOM kills in this sandbox as of the agent's last reply (a fresh sandbox has had none)."""

    @property
    def worn_out(self) -> bool:
        """Whether the sandbox has served as many tasks as one may (see SandboxLimits.recycle_after)."""
        return self.tasks >= self.limits.recycle_after

    @abc.abstractmethod
    async def set_memory(self, memory_mb: int) -> None:
        """Applies the request's memory limit to the whole sandbox."""

    @abc.abstractmethod
    async def is_alive(self) -> bool:
        """Whether the sandbox itself (not just the agent) still exists."""

    @abc.abstractmethod
    async def oom_kills_now(self) -> int | None:
        """OOM kills in this sandbox so far, read from outside the agent (also once the sandbox
        has died, as far as the backend can tell); None if unreadable."""

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Kills the sandbox and frees everything it held; safe to call twice."""

    def rlimits(self, request: ExecRequest) -> dict[str, int]:
        """Per-process limits the agent sets before the program starts."""
        return {"NOFILE": self.limits.nofile, "CORE": 0, "FSIZE": max(self.limits.work_mb, self.limits.tmp_mb) << 20}

    async def exec(self, request: ExecRequest, wipe: bool) -> ExecResult:
        """Runs one program; `wipe` also empties the work dirs afterwards (end of a task)."""
        await self.set_memory(request.memory_mb)
        header = {
            "op": "exec",
            "argv": request.command,
            "env": request.env,
            "cwd": request.workdir,
            "timeout_s": request.timeout_s,
            "max_output": request.max_output_bytes,
            "fast": request.fast_path,
            "wipe": wipe,
            "rlimits": self.rlimits(request),
        }
        files = pack_files(request.files)
        limit = request.timeout_s + HOST_GRACE_S + (len(files) + len(request.stdin)) / TRANSFER_BYTES_PER_S
        started = time.monotonic()
        try:
            reply, blobs = await self._request(header, [files, request.stdin], 2 * request.max_output_bytes, limit)
        except SandboxHung:
            return ExecResult(
                status=Status.TIMEOUT,
                wall_s=time.monotonic() - started,
                isolation=self.isolation,
                error=f"the sandbox did not report within {limit:.1f} s; it was destroyed",
            )
        if not reply.get("ok"):
            return ExecResult(status=Status.RUNTIME_ERROR, isolation=self.isolation, error=reply.get("error", ""))
        self.dirty = self.dirty or not reply.get("clean", False)
        self.broken_by_program = self.broken_by_program or reply.get("tampered", False)
        self.oom_kills = reply.get("oom_kills", self.oom_kills)
        return self._result(reply, blobs)

    def _result(self, reply: dict, blobs: list[bytes]) -> ExecResult:
        stdout, stderr = blobs
        status = _OUTCOMES.get(reply["outcome"])
        if status is None:
            status = Status.OK if reply["exit_code"] == 0 else Status.RUNTIME_ERROR
        if status is Status.RUNTIME_ERROR and self.isolation in (Isolation.BWRAP_RLIMIT, Isolation.RLIMIT):
            # Without a cgroup, memory runs out as a failed allocation, not as an OOM kill.
            if b"MemoryError" in stderr[-4096:] or b"std::bad_alloc" in stderr[-4096:]:
                status = Status.OOM
        error = _OUTCOME_ERRORS.get(reply["outcome"], "")
        if reply.get("tampered") and not error:
            error = "the program tampered with the sandbox's process launcher; the sandbox is replaced"
        if reply.get("detail"):
            error += f" ({reply['detail']})"
        return ExecResult(
            status=status,
            exit_code=reply["exit_code"],
            stdout=stdout,
            stderr=stderr,
            stdout_truncated=reply["stdout_truncated"],
            stderr_truncated=reply["stderr_truncated"],
            wall_s=reply["wall_s"],
            cpu_s=reply["cpu_s"],
            isolation=self.isolation,
            error=error,
            broke_sandbox=reply.get("tampered", False),
        )

    async def put_files(self, files: dict[str, bytes]) -> None:
        blob = pack_files({validate_relative_path(p): d for p, d in files.items()})
        reply, _ = await self._request({"op": "put"}, [blob], 0, self._transfer_deadline(len(blob)))
        if not reply.get("ok"):
            raise ValueError(f"could not write files into the sandbox: {reply.get('error')}")

    async def get_files(self, paths: list[str]) -> dict[str, bytes]:
        names = [validate_relative_path(p) for p in paths]
        # Tar adds at most a 512-byte header and 511 bytes of padding per file.
        cap = self.limits.max_file_bytes + 1024 * (len(names) + 2)
        reply, blobs = await self._request(
            {"op": "get", "paths": names, "max_bytes": self.limits.max_file_bytes},
            [],
            cap,
            self._transfer_deadline(cap),
        )
        if not reply.get("ok"):
            raise ValueError(f"could not read files from the sandbox: {reply.get('error')}")
        return unpack_files(blobs[0])

    async def reset(self) -> bool:
        """Kills every process of the last task and wipes the work dirs; False if that failed."""
        try:
            reply, _ = await self._request({"op": "reset"}, [], 0, 2 * self.limits.call_deadline_s)
        except SandboxHung:
            return False
        return bool(reply.get("ok") and reply.get("clean"))

    def _transfer_deadline(self, size: int) -> float:
        return self.limits.call_deadline_s + size / TRANSFER_BYTES_PER_S

    async def _request(
        self, header: dict, blobs: list[bytes], max_reply_bytes: int, deadline_s: float
    ) -> tuple[dict, list[bytes]]:
        """One request to the agent, given up after `deadline_s` (the sandbox is then dirty and its
        channel closed, so nothing can follow a half-read reply)."""
        try:
            reply, out = await asyncio.wait_for(self.channel.request(header, blobs, max_reply_bytes), deadline_s)
        except asyncio.TimeoutError:
            self.dirty = True
            self.channel.close()
            raise SandboxHung(
                f"the sandbox's agent did not answer a {header['op']} within {deadline_s:.0f} s"
            ) from None
        except ChannelClosed as exc:
            self.dirty = True
            raise SandboxBroken(str(exc), started=exc.sent) from exc
        if reply.get("dirty"):  # the agent refused: its last cleanup failed, nothing was run
            self.dirty = True
            raise SandboxBroken(reply.get("error", "the sandbox is dirty"), started=False)
        return reply, out
