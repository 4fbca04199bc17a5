"""The Docker backend: hardened warm containers, each with the agent attached over one long-lived
`docker exec` stream (so a run costs a frame round trip, not an exec)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable

import docker
import docker.errors
import requests.exceptions

from workers.sandbox.box import Box, SandboxBroken, oom_kill_count
from workers.sandbox.channel import AGENT_ARGS, AgentChannel, ChannelClosed, TailBuffer
from workers.sandbox.config import ImagePolicy, SandboxLimits, SandboxProfile
from workers.sandbox.images import PRISTINE_ROOT, ImageStore, ImageUnavailable, ensure_pristine
from workers.sandbox.models import Isolation
from workers.sandbox.owner import Owner
from workers.sandbox.reaper import LABEL, owner_labels, reap_containers

log = logging.getLogger(__name__)
KEEPALIVE_UID = 65534
# PID 1 reaps zombies and exits on SIGTERM (so a stopping daemon need not wait). It starts as root,
# so that `docker exec` can give the agent the container's capabilities, and at once drops to a uid
# the program cannot signal or ptrace, with no capabilities left.
KEEPALIVE = f"""import os, signal
os.setgroups([])
os.setresgid({KEEPALIVE_UID}, {KEEPALIVE_UID}, {KEEPALIVE_UID})
os.setresuid({KEEPALIVE_UID}, {KEEPALIVE_UID}, {KEEPALIVE_UID})
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
while True:
    signal.sigwait([signal.SIGCHLD])
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
"""
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
"""The programs' environment."""
_AGENT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
_LAUNCHER_CAPS = ["SETUID", "SETGID", "KILL"]
"""All the agent and zygote (root in the container) may do beyond an ordinary user: become the
programs' uid, and kill the programs. Programs keep none of them."""
_OOM_FILES = ["/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events"]


def docker_available(base_url: str | None = None) -> bool:
    try:
        _client(base_url).ping()
        return True
    except Exception:  # any failure to reach the daemon means "not available"
        return False


def _client(base_url: str | None) -> docker.DockerClient:
    if base_url:
        return docker.DockerClient(base_url=base_url, max_pool_size=64)
    return docker.from_env(max_pool_size=64)


class _ExecStream(asyncio.Protocol):
    """Demultiplexes a non-tty `docker exec` stream: stdout frames go to the agent channel,
    stderr frames to a tail buffer; writes apply transport flow control."""

    def __init__(self, reader: asyncio.StreamReader, stderr: TailBuffer) -> None:
        self.reader, self.stderr = reader, stderr
        self._buf = bytearray()
        self._writable = asyncio.Event()
        self._writable.set()
        self.lost = False
        self.on_lost: Callable[[], None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        pos = 0
        while len(self._buf) - pos >= 8:
            size = int.from_bytes(self._buf[pos + 4 : pos + 8], "big")
            if len(self._buf) - pos - 8 < size:
                break
            payload = bytes(self._buf[pos + 8 : pos + 8 + size])
            (self.reader.feed_data if self._buf[pos] == 1 else self.stderr.add)(payload)
            pos += 8 + size
        del self._buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.on_lost is not None:
            self.on_lost()
        self.reader.feed_eof()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def write(self, data: bytes) -> None:
        if self.lost or self.transport is None:
            raise ChannelClosed("the docker exec stream is closed")
        self.transport.write(data)
        await self._writable.wait()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


OOM_QUERY_S = 10.0
"""How long the pool keeps asking a live container for its OOM kill count after losing its agent."""


class DockerBox(Box):
    """One warm container."""

    isolation = Isolation.DOCKER

    def __init__(
        self,
        channel: AgentChannel,
        limits: SandboxLimits,
        client: docker.DockerClient,
        container_id: str,
        memory_mb: int,
    ) -> None:
        super().__init__(channel, limits)
        self.client, self.container_id = client, container_id
        self.memory_mb = memory_mb

    async def set_memory(self, memory_mb: int) -> None:
        if memory_mb == self.memory_mb:
            return
        try:
            await asyncio.to_thread(
                self.client.api.update_container,
                self.container_id,
                mem_limit=f"{memory_mb}m",
                memswap_limit=f"{memory_mb}m",
            )
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise SandboxBroken(f"could not set the container's memory limit: {exc}", started=False) from exc
        self.memory_mb = memory_mb

    async def is_alive(self) -> bool:
        try:
            state = await asyncio.to_thread(self.client.api.inspect_container, self.container_id)
        except Exception:  # daemon gone or container gone: either way not alive
            return False
        return bool(state["State"]["Running"])

    async def oom_kills_now(self) -> int | None:
        # An exec can fail while the daemon shuts down (it still answers inspections for a while)
        # or lose its output; a program can also make it fail (a full pids limit). Asked again for
        # a while: the daemon's trouble shows as a stopped container or no answer, the program's
        # lasts (its processes outlive the agent until the container is removed).
        deadline = time.monotonic() + OOM_QUERY_S
        while True:
            stopped = await self._kills_if_stopped()
            if stopped is not None:
                return stopped
            try:
                exec_id = (
                    await asyncio.to_thread(
                        self.client.api.exec_create, self.container_id, ["cat", *_OOM_FILES], user="0:0"
                    )
                )["Id"]
                count = oom_kill_count((await asyncio.to_thread(self.client.api.exec_start, exec_id)).decode())
            except (docker.errors.DockerException, requests.exceptions.RequestException, UnicodeDecodeError):
                count = None
            if count is not None:
                return count
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.5)

    async def _kills_if_stopped(self) -> int | None:
        """The OOM kill count when the container is gone or stopped, None while it runs. Gone (or
        the daemon is): nothing a program can do. Stopped: only whether an OOM kill stopped it."""
        try:
            state = (await asyncio.to_thread(self.client.api.inspect_container, self.container_id))["State"]
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            return self.oom_kills
        return None if state["Running"] else self.oom_kills + bool(state.get("OOMKilled"))

    async def destroy(self) -> None:
        self.channel.close()
        try:
            await asyncio.to_thread(self.client.api.remove_container, self.container_id, force=True)
        except Exception:  # gone already, or daemon down: the reaper removes it at close or next start
            pass


class DockerBackend:
    """Creates hardened containers of one image for one pool."""

    def __init__(
        self,
        image: str,
        limits: SandboxLimits,
        owner: Owner,
        base_url: str | None = None,
        profile: SandboxProfile | None = None,
        images: ImagePolicy | None = None,
    ) -> None:
        self.image, self.limits, self.owner = image, limits, owner
        self.base_url = base_url
        self.profile = profile or SandboxProfile()
        self.images = images or ImagePolicy()
        self.client: docker.DockerClient | None = None
        self.memory_mb = 512
        self.pristine: list[str] = []
        """Per writable path, the volume holding the image's content there."""

    async def start(self) -> None:
        from workers.sandbox.pool import SandboxUnavailable

        try:
            self.client = await asyncio.to_thread(_client, self.base_url)
            await asyncio.to_thread(self.client.ping)
        except Exception as exc:
            raise SandboxUnavailable(
                f"the Docker daemon is not reachable ({exc}); start dockerd or use backend='local'."
            ) from exc
        store = ImageStore(self.client, self.images)
        try:
            image_id = await asyncio.to_thread(store.ensure, self.image)
        except ImageUnavailable as exc:
            hint = "" if self.images.pull else "; build it with `codeworld sandbox build-image`"
            raise SandboxUnavailable(f"sandbox image {self.image!r} does not exist{hint} ({exc})") from exc
        if self.profile.writable_paths:
            self.pristine = await asyncio.to_thread(
                ensure_pristine, self.client, self.image, image_id, self.profile.writable_paths, store.folder / "locks"
            )
        await asyncio.to_thread(reap_containers, self.client, None)

    async def close(self) -> None:
        if self.client is None:
            return
        try:
            await asyncio.to_thread(reap_containers, self.client, self.owner.pool)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            log.warning(
                "sandbox pool %s could not remove its containers (%s); the next pool start on this host removes them",
                self.owner.pool,
                exc,
            )
        self.client.close()

    def _container_kwargs(self) -> dict:
        lim, uid = self.limits, self.limits.workload_uid
        # Each writable path: a tmpfs of its own, filled by the agent from a read-only volume.
        writable = {
            path: f"size={self.profile.writable_mb}m,uid={uid},gid={uid},mode=0755,exec"
            for path in self.profile.writable_paths
        }
        sources = {name: {"bind": f"{PRISTINE_ROOT}/{i}", "mode": "ro"} for i, name in enumerate(self.pristine)}
        return dict(
            image=self.image,
            command=["python3", "-I", "-c", KEEPALIVE],
            detach=True,
            user="0:0",
            network_mode="none",
            read_only=True,
            cap_drop=["ALL"],
            cap_add=_LAUNCHER_CAPS,
            security_opt=["no-new-privileges"],
            ipc_mode="private",
            pids_limit=lim.pids,
            mem_limit=f"{self.memory_mb}m",
            memswap_limit=f"{self.memory_mb}m",
            nano_cpus=int(lim.cpus * 1e9),
            shm_size=f"{lim.shm_mb}m",
            hostname="sandbox",
            tmpfs={
                "/work": f"size={lim.work_mb}m,uid={uid},gid={uid},mode=0700,exec",
                "/tmp": f"size={lim.tmp_mb}m,mode=1777,exec",
                **writable,
            },
            volumes=sources,
            labels={LABEL: "1", **owner_labels(self.owner)},
        )

    async def create(self) -> DockerBox:
        assert self.client is not None, "DockerBackend.start() must run first"
        container = await asyncio.to_thread(self.client.containers.run, **self._container_kwargs())
        try:
            channel = await self._attach_agent(container.id)
            await asyncio.wait_for(channel.ready(), 60)
        except BaseException as exc:
            await asyncio.to_thread(self.client.api.remove_container, container.id, force=True)
            if isinstance(exc, Exception):
                raise SandboxBroken(f"the sandbox agent did not start in {container.short_id}: {exc}") from exc
            raise
        return DockerBox(channel, self.limits, self.client, container.id, self.memory_mb)

    async def _attach_agent(self, container_id: str) -> AgentChannel:
        writable = list(self.profile.writable_paths)
        config = {
            "work": "/work",
            "wipe": ["/work", "/tmp", "/dev/shm", "/dev/mqueue", *writable],
            "env": _ENV,
            "oom_files": _OOM_FILES,
            "program_uid": self.limits.workload_uid,
            "restore": [[f"{PRISTINE_ROOT}/{i}", path] for i, path in enumerate(writable)],
        }
        api = self.client.api
        exec_id = (
            await asyncio.to_thread(
                api.exec_create,
                container_id,
                ["python3", *AGENT_ARGS, json.dumps(config)],
                stdin=True,
                stdout=True,
                stderr=True,
                user="0:0",
                workdir="/",
                environment=_AGENT_ENV,
            )
        )["Id"]
        sock = await asyncio.to_thread(api.exec_start, exec_id, socket=True)
        raw = sock._sock  # the upgraded connection; docker-py hands it over wrapped in a SocketIO
        raw.setblocking(False)
        loop = asyncio.get_running_loop()
        reader, stderr = asyncio.StreamReader(limit=1 << 20), TailBuffer()
        _, stream = await loop.create_connection(lambda: _ExecStream(reader, stderr), sock=raw)
        channel = AgentChannel(reader, stream, stderr)
        stream.on_lost = channel.mark_closed
        return channel
