"""The local backend: the same agent, run in bubblewrap namespaces as an unprivileged uid (or, with
no bubblewrap, under rlimits only). Its `isolation` label says which."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from workers.sandbox.box import Box, SandboxBroken, oom_kill_count
from workers.sandbox.cgroup import SlotCgroup, remove_cgroup_dir, stale_cgroup_dirs
from workers.sandbox.channel import AGENT_ARGS, AgentChannel, TailBuffer
from workers.sandbox.config import SandboxLimits
from workers.sandbox.models import ExecRequest, Isolation
from workers.sandbox.owner import Owner
from workers.sandbox.local_layout import BwrapLayout, launcher_privileges, unprivileged_uid

log = logging.getLogger(__name__)
CGROUP_PREFIX = "codeworld-sbx"
_LAUNCHER_PROCESSES = 3
"""The agent, the zygote and its waiting spare."""
_SANDBOX_VENV = "/opt/codeworld/venv"


class _PipeSink:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()


class LocalBox(Box):
    """One local sandbox: a long-lived agent process tree."""

    def __init__(
        self,
        channel: AgentChannel,
        limits: SandboxLimits,
        process: asyncio.subprocess.Process,
        cgroup: SlotCgroup | None,
        isolation: Isolation,
        scratch: Path | None,
    ) -> None:
        super().__init__(channel, limits)
        self.process = process
        self.cgroup = cgroup
        self.isolation = isolation
        self.scratch = scratch
        self.programs_own_uid = os.geteuid() == 0  # as `_command` gives the agent a `program_uid`

    async def set_memory(self, memory_mb: int) -> None:
        if self.memory_mb == memory_mb:
            return
        if self.cgroup is not None:
            try:
                self.cgroup.set_memory(memory_mb)
            except OSError as exc:
                raise SandboxBroken(f"could not set the sandbox's memory limit: {exc}", started=False) from exc
        self.memory_mb = memory_mb

    async def oom_kills_now(self) -> int | None:
        if self.cgroup is None:
            return None
        try:
            return oom_kill_count(self.cgroup.oom_file.read_text())
        except OSError:
            return None

    def rlimits(self, request: ExecRequest) -> dict[str, int]:
        limits = super().rlimits(request)
        if self.cgroup is None:
            limits["AS"] = request.memory_mb << 20
        if os.geteuid() == 0:  # a dedicated uid, so NPROC counts this sandbox only
            limits["NPROC"] = self.limits.pids
        elif self.isolation is Isolation.BWRAP_RLIMIT:
            # Counted per user namespace (Linux >= 5.14), where the agent, the zygote and its
            # spare share the programs' one uid.
            limits["NPROC"] = self.limits.pids + _LAUNCHER_PROCESSES
        return limits

    async def is_alive(self) -> bool:
        return self.process.returncode is None

    async def destroy(self) -> None:
        # An idle agent exits on EOF; a busy or stopped one is killed with its sandbox: killing
        # bwrap ends its pid namespace, and removing the cgroup kills whatever is still inside.
        self.channel.close()
        try:
            await asyncio.wait_for(self.process.wait(), 0.5)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        if self.cgroup is not None:
            await asyncio.to_thread(self.cgroup.remove)
        try:  # returns once the agent's pipes close, i.e. once nothing of the sandbox is left
            await asyncio.wait_for(self.process.wait(), 10)
        except asyncio.TimeoutError:
            log.warning("local sandbox (bwrap pid %d) did not end within 10 s of being killed", self.process.pid)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


class LocalBackend:
    """Starts local sandboxes for one pool."""

    def __init__(
        self, limits: SandboxLimits, owner: Owner, isolation: str | None = None, python: str | None = None
    ) -> None:
        self.limits = limits
        self.owner = owner
        self.use_bwrap = shutil.which("bwrap") is not None and isolation != "rlimit"
        # Without bwrap's mounts, a root-owned private interpreter (pyenv under /root, say) is
        # unreadable by the sandbox uid, so the system python3 is used.
        system_python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
        self.python = python or (sys.executable if self.use_bwrap or os.geteuid() != 0 else system_python)
        if isolation == "bwrap" and not self.use_bwrap:
            raise RuntimeError("local isolation 'bwrap' was required but bubblewrap (bwrap) is not installed.")
        self._count = 0

    async def start(self) -> None:
        """Removes cgroups left by local pools whose owner process died."""
        for path in stale_cgroup_dirs(CGROUP_PREFIX + "-"):
            parts = path.name.split("-")
            owner = self.owner.model_copy(update={"pid": int(parts[2]), "start": int(parts[3])})
            if not owner.is_alive():
                await asyncio.to_thread(remove_cgroup_dir, path)

    async def close(self) -> None:
        """Nothing to do: every sandbox is destroyed by the pool and dies with its parent anyway."""

    async def create(self) -> LocalBox:
        self._count += 1
        name = f"{CGROUP_PREFIX}-{self.owner.pid}-{self.owner.start}-{self.owner.pool}-{self._count}"
        cgroup = await asyncio.to_thread(SlotCgroup.create, name) if os.geteuid() == 0 else None
        if cgroup is not None:
            cgroup.set_pids(self.limits.pids)
            cgroup.set_cpus(self.limits.cpus)
        uid = unprivileged_uid(self.owner.pid, self._count) if os.geteuid() == 0 else os.geteuid()
        scratch = None if self.use_bwrap else Path(tempfile.mkdtemp(prefix="codeworld-sbx-"))
        try:
            argv, config, isolation = self._command(uid, cgroup, scratch)
            process = await self._spawn(argv + [json.dumps(config)], cgroup)
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            raise
        stderr = TailBuffer()
        channel = AgentChannel(process.stdout, _PipeSink(process.stdin), stderr)
        asyncio.get_running_loop().create_task(_watch(process, stderr, channel))
        box = LocalBox(channel, self.limits, process, cgroup, isolation, scratch)
        try:
            await asyncio.wait_for(channel.ready(), 30)
        except BaseException as exc:
            await box.destroy()
            raise SandboxBroken(f"the local sandbox did not start: {stderr.text() or exc!r}") from exc
        return box

    def _command(self, uid: int, cgroup: SlotCgroup | None, scratch: Path | None) -> tuple[list[str], dict, Isolation]:
        if self.use_bwrap:
            layout = BwrapLayout(
                self.python, self.limits, uid, _SANDBOX_VENV, oom_file=cgroup.oom_file if cgroup else None
            )
            isolation = Isolation.BWRAP_CGROUP if cgroup else Isolation.BWRAP_RLIMIT
            return layout.argv() + AGENT_ARGS, layout.agent_config(), isolation
        assert scratch is not None
        work, tmp = scratch / "work", scratch / "tmp"
        for path in (work, tmp):
            path.mkdir()
            os.chown(path, uid, uid)
        os.chown(scratch, uid, uid)
        env = {
            "PATH": f"{Path(self.python).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(work),
            "TMPDIR": str(tmp),
            "LANG": "C.UTF-8",
        }
        config = {
            "work": str(work),
            "wipe": [str(work), str(tmp)],
            "env": env,
            "oom_files": [str(cgroup.oom_file)] if cgroup else [],
        }
        if os.geteuid() == 0:  # the agent keeps only the launcher's capabilities; programs get `uid`
            config["program_uid"] = uid
            return launcher_privileges() + [self.python, *AGENT_ARGS], config, Isolation.RLIMIT
        config["kill_scope"] = "session"  # no pid namespace and one shared uid: the user's other processes
        return [self.python, *AGENT_ARGS], config, Isolation.RLIMIT

    async def _spawn(self, argv: list[str], cgroup: SlotCgroup | None) -> asyncio.subprocess.Process:
        join_fds = [os.open(p, os.O_WRONLY) for p in cgroup.procs_files()] if cgroup else []

        def join_cgroup() -> None:  # runs in the child before exec: nothing escapes the cgroup
            for fd in join_fds:
                os.write(fd, b"0")

        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
                preexec_fn=join_cgroup if join_fds else None,
                start_new_session=True,
                limit=1 << 20,
            )
        finally:
            for fd in join_fds:
                os.close(fd)


async def _watch(process: asyncio.subprocess.Process, tail: TailBuffer, channel: AgentChannel) -> None:
    """Keeps the agent's stderr tail and marks the channel closed as soon as the agent exits."""
    while chunk := await process.stderr.read(4096):
        tail.add(chunk)
    await process.wait()
    channel.mark_closed()
