"""SandboxPool: a warm pool of sandboxes of one image behind one async API, for one-shot runs and
for sessions that keep a sandbox (and its files) across several calls."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import uuid
from typing import AsyncIterator, Literal, Protocol

from workers.sandbox.box import Box, SandboxBroken
from workers.sandbox.config import ImagePolicy, SandboxLimits, SandboxProfile
from workers.sandbox.models import ExecRequest, ExecResult, Isolation, PoolStats, Status
from workers.sandbox.owner import Owner

DEFAULT_IMAGE = "codeworld-sandbox:py311"
_CREATE_AT_ONCE = 4


_KILLED_AGENT = ExecResult(
    status=Status.RUNTIME_ERROR,
    exit_code=-9,
    broke_sandbox=True,
    error="the program killed the sandbox agent or ran it out of memory; the sandbox was replaced",
)
_BROKEN_BY_PROGRAM = "a program of this session broke its sandbox (killed or stopped its agent or launcher)"


async def program_killed_agent(box: Box) -> bool:
    """The agent's channel died while a program ran: was it the program's doing? Where programs
    have a uid of their own they cannot signal the agent, but their memory use can make the OOM
    killer take it (or the sandbox's init), which shows as a kill count above the one the agent
    last reported; an unreadable count blames the program, so that breaking a sandbox never earns
    a dropped sample in place of a zero. Where programs share the agent's uid, the program did it
    unless the sandbox itself is gone (the daemon's or the host's doing)."""
    if box.programs_own_uid:
        kills = await box.oom_kills_now()
        return kills is None or kills > box.oom_kills
    for _ in range(2):
        if not await box.is_alive():
            return False
        await asyncio.sleep(0.2)
    return True


class SandboxUnavailable(RuntimeError):
    """No sandbox can be had: the backend is down, or the wait for a free one ran out."""


class SandboxError(RuntimeError):
    """A session's sandbox failed; its state is lost. `by_program` is True when a program of the
    session broke it (killed its agent or launcher): the task's fault, not the infrastructure's."""

    def __init__(self, message: str, by_program: bool = False) -> None:
        super().__init__(message)
        self.by_program = by_program


class Backend(Protocol):
    """What a pool needs from a backend."""

    async def start(self) -> None:
        """Checks the backend works and removes what dead owners left behind."""

    async def create(self) -> Box:
        """Starts one warm sandbox."""

    async def close(self) -> None:
        """Removes whatever of this pool is left."""


class SandboxPool:
    """`async with SandboxPool(backend="docker", image=..., size=4) as pool: await pool.run(req)`."""

    def __init__(
        self,
        backend: Literal["docker", "local", "auto"] = "docker",
        image: str = DEFAULT_IMAGE,
        size: int = 4,
        *,
        limits: SandboxLimits | None = None,
        max_waiting: int = 10_000,
        acquire_timeout_s: float = 300.0,
        local_isolation: Literal["bwrap", "rlimit"] | None = None,
        docker_url: str | None = None,
        profile: SandboxProfile | None = None,
        images: ImagePolicy | None = None,
    ) -> None:
        if backend not in ("docker", "local", "auto"):
            raise ValueError(f"sandbox backend {backend!r} is unknown; use 'docker', 'local' or 'auto'.")
        if size < 1:
            raise ValueError(f"sandbox pool size must be at least 1, not {size}.")
        self.backend_name, self.image, self.size = backend, image, size
        self.limits = limits or SandboxLimits()
        self.max_waiting, self.acquire_timeout_s = max_waiting, acquire_timeout_s
        self._local_isolation, self._docker_url = local_isolation, docker_url
        self.profile = profile or SandboxProfile()
        """What the image's programs may write beyond the work dirs (Docker only)."""
        self.images = images or ImagePolicy()
        """How the image gets onto this node (Docker only): pulled or not, managed or not."""
        self.owner = Owner.current(uuid.uuid4().hex[:12])
        self._backend: Backend | None = None
        self._idle: collections.deque[Box] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[Box]] = collections.deque()
        self._live: set[Box] = set()
        self._need = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._replenisher: asyncio.Task | None = None
        self._last_error = ""
        self._closed = False
        self._counts = {"waiting": 0, "max_waiting": 0, "runs": 0, "sandbox_errors": 0, "retries": 0, "replaced": 0}

    async def __aenter__(self) -> "SandboxPool":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self, ready_timeout_s: float = 120.0) -> None:
        """Starts the backend and waits until every sandbox is warm."""
        self._backend = await self._make_backend()
        await self._backend.start()
        self._replenisher = asyncio.get_running_loop().create_task(self._replenish())
        self._need.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ready_timeout_s
        while len(self._live) < self.size:
            # Fail fast when not a single sandbox could be made: the cause is not transient.
            if loop.time() > deadline or (self._last_error and not self._live):
                await self.close()
                raise SandboxUnavailable(f"the {self.backend_name} sandbox pool did not start: {self._last_error}")
            await asyncio.sleep(0.02)

    async def _make_backend(self) -> Backend:
        # Backends are imported here: a local-only user never loads the docker SDK.
        if self.backend_name == "auto":
            from workers.sandbox.docker_backend import docker_available

            available = await asyncio.to_thread(docker_available, self._docker_url)
            self.backend_name = "docker" if available else "local"
        if self.backend_name == "docker":
            from workers.sandbox.docker_backend import DockerBackend

            return DockerBackend(self.image, self.limits, self.owner, self._docker_url, self.profile, self.images)
        if self.profile.writable_paths:
            paths = ", ".join(self.profile.writable_paths)
            raise SandboxUnavailable(
                f"writable paths ({paths}) need the docker backend; the local backend has no image to fill them from."
            )
        from workers.sandbox.local import LocalBackend

        return LocalBackend(self.limits, self.owner, self._local_isolation)

    async def close(self) -> None:
        """Destroys every sandbox of the pool; runs still in flight end as SANDBOX_ERROR."""
        if self._closed:
            return
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(SandboxUnavailable("the sandbox pool closed."))
        if self._replenisher is not None:
            self._replenisher.cancel()
            await asyncio.gather(self._replenisher, return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)  # destroys in progress finish
        await asyncio.gather(*(box.destroy() for box in list(self._live)), return_exceptions=True)
        self._live.clear()
        if self._backend is not None:
            await self._backend.close()

    def stats(self) -> PoolStats:
        return PoolStats(size=self.size, ready=len(self._idle), **self._counts)

    # ------------------------------------------------------------------------------------ running
    async def run(self, request: ExecRequest) -> ExecResult:
        """Runs one program in a clean sandbox. A sandbox found dead when the run is handed to it
        is replaced and the run retried once; a failure after the program started is never
        retried: RUNTIME_ERROR when the program caused it, SANDBOX_ERROR otherwise."""
        for attempt in range(2):
            try:
                box = await self._acquire()
            except SandboxUnavailable as exc:
                return self._sandbox_error(str(exc))
            try:
                result = await box.exec(request, wipe=True)
            except SandboxBroken as exc:
                result = await self._after_broken(box, exc)
                if result is None and attempt == 0 and not self._closed:
                    self._counts["retries"] += 1
                    continue
                return result or self._sandbox_error(str(exc))
            except BaseException:
                self._discard(box)
                raise
            box.tasks += 1
            self._release(box)
            self._counts["runs"] += 1
            self._counts["sandbox_errors"] += result.status is Status.SANDBOX_ERROR
            return result
        raise AssertionError("unreachable: the loop returns on its second attempt")

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator["Session"]:
        """Leases one sandbox for several calls; it is reset (or replaced) when the block ends."""
        box = await self._acquire()
        session = Session(box)
        try:
            yield session
        finally:
            await self._end_session(box)

    async def _end_session(self, box: Box) -> None:
        """Resets the session's sandbox for the next task, or replaces it; a cancellation in the
        middle still gives the sandbox back (to be replaced), so the pool never shrinks."""
        box.tasks += 1
        clean = False
        try:
            clean = not box.dirty and not box.broken_by_program and await box.reset()
        except SandboxBroken:
            clean = False
        finally:
            if clean:
                self._release(box)
            else:
                self._discard(box)

    def _sandbox_error(self, why: str) -> ExecResult:
        self._counts["sandbox_errors"] += 1
        self._counts["runs"] += 1
        return ExecResult(status=Status.SANDBOX_ERROR, error=why)

    async def _after_broken(self, box: Box, exc: SandboxBroken) -> ExecResult | None:
        """Replaces a broken sandbox. None: the program never started there, so it may be retried;
        a SANDBOX_ERROR, or RUNTIME_ERROR when the program itself killed the sandbox's agent."""
        killed_by_program = exc.started and await program_killed_agent(box)
        self._discard(box)
        if not exc.started:
            return None
        if killed_by_program:
            self._counts["runs"] += 1
            return _KILLED_AGENT.model_copy(update={"isolation": box.isolation})
        return self._sandbox_error(str(exc))

    # ------------------------------------------------------------------------------- pool upkeep
    async def _acquire(self) -> Box:
        if self._closed:
            raise SandboxUnavailable("the sandbox pool is closed.")
        if self._counts["waiting"] >= self.max_waiting:
            raise SandboxUnavailable(f"more than {self.max_waiting} callers are already waiting for a sandbox.")
        self._counts["waiting"] += 1
        self._counts["max_waiting"] = max(self._counts["max_waiting"], self._counts["waiting"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.acquire_timeout_s
        try:
            while True:
                try:
                    box = await self._next_idle(deadline)
                except TimeoutError:
                    raise SandboxUnavailable(
                        f"no sandbox became free within {self.acquire_timeout_s:.0f} s"
                        + (f"; last failure: {self._last_error}" if self._last_error else ".")
                    )
                if not box.channel.closed:
                    return box
                self._discard(box)
        finally:
            self._counts["waiting"] -= 1

    async def _next_idle(self, deadline: float) -> Box:
        """First come, first served: a freed sandbox goes straight to the longest waiter, so a
        caller that just released one cannot take it back ahead of the queue."""
        if self._idle and not self._waiters:
            return self._idle.popleft()
        handed: asyncio.Future[Box] = asyncio.get_running_loop().create_future()
        self._waiters.append(handed)
        try:
            async with asyncio.timeout_at(deadline):
                return await handed
        except BaseException:
            if handed.done() and not handed.cancelled():
                self._make_idle(handed.result())  # handed over just as we gave up: pass it on
            raise

    def _make_idle(self, box: Box) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(box)
                return
        self._idle.append(box)

    def _release(self, box: Box) -> None:
        if box.dirty or box.channel.closed or self._closed or box.worn_out:
            self._discard(box)
        else:
            self._make_idle(box)

    def _discard(self, box: Box) -> None:
        if box in self._live:
            self._live.discard(box)
            self._counts["replaced"] += 1
        self._spawn(box.destroy())
        self._need.set()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replenish(self) -> None:
        """Keeps `size` sandboxes alive, creating replacements with backoff while the backend is down."""
        delay = 0.2
        while True:
            await self._need.wait()
            self._need.clear()
            while len(self._live) < self.size:
                batch = min(self.size - len(self._live), _CREATE_AT_ONCE)
                results = await asyncio.gather(*(self._backend.create() for _ in range(batch)), return_exceptions=True)
                failed = False
                for result in results:
                    if isinstance(result, BaseException):
                        self._last_error, failed = f"{type(result).__name__}: {result}", True
                    else:
                        self._live.add(result)
                        self._make_idle(result)
                if failed:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                else:
                    delay, self._last_error = 0.2, ""


class Session:
    """One leased sandbox: files persist across exec calls; every process a call started is killed
    when that call returns."""

    def __init__(self, box: Box) -> None:
        self._box = box

    @property
    def isolation(self) -> Isolation | None:
        return self._box.isolation

    async def exec(self, request: ExecRequest) -> ExecResult:
        if self._box.broken_by_program:
            return ExecResult(
                status=Status.RUNTIME_ERROR,
                isolation=self._box.isolation,
                broke_sandbox=True,
                error=f"{_BROKEN_BY_PROGRAM}; nothing more can run in this session",
            )
        self._check()
        try:
            return await self._box.exec(request, wipe=False)
        except SandboxBroken as exc:
            if exc.started and await program_killed_agent(self._box):
                self._box.broken_by_program = True
                return _KILLED_AGENT.model_copy(update={"isolation": self._box.isolation})
            return ExecResult(status=Status.SANDBOX_ERROR, error=f"the session's sandbox was lost: {exc}")

    async def put_files(self, files: dict[str, bytes]) -> None:
        """Writes files into the work dir (paths relative to it; symlinks are never followed)."""
        self._check()
        try:
            await self._box.put_files(files)
        except SandboxBroken as exc:
            raise SandboxError(f"the session's sandbox was lost: {exc}") from exc

    async def get_files(self, paths: list[str]) -> dict[str, bytes]:
        """Reads regular files back; missing paths, symlinks and special files are left out."""
        self._check()
        try:
            return await self._box.get_files(paths)
        except SandboxBroken as exc:
            raise SandboxError(f"the session's sandbox was lost: {exc}") from exc

    def _check(self) -> None:
        if self._box.broken_by_program:
            raise SandboxError(_BROKEN_BY_PROGRAM, by_program=True)
        if self._box.channel.closed:
            raise SandboxError("the session's sandbox is gone (its agent or container died).")
