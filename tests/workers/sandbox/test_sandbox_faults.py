"""Real faults: a container killed from outside, an owner killed with its containers still up,
stale containers of dead and live owners, and the Docker daemon restarted mid-run."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest
from sandbox_testkit import TEST_LIMITS, pool_containers

from workers.sandbox import ExecRequest, SandboxPool, Status
from workers.sandbox.owner import Owner
from workers.sandbox.reaper import LABEL, owner_labels

pytestmark = pytest.mark.asyncio(loop_scope="session")

IMAGE = "codeworld-sandbox:py311"
DOCKERD_LOG = "/var/log/codeworld-dockerd.log"


async def test_container_killed_between_lease_and_run_is_retried_once() -> None:
    async with SandboxPool(backend="docker", size=1, limits=TEST_LIMITS) as pool:
        client = docker.from_env()
        lease = pool._acquire
        killed: list[str] = []

        async def lease_then_kill():
            box = await lease()
            if not killed:  # the real fault, injected at the one moment the test needs
                killed.append(box.container_id)
                await asyncio.to_thread(client.api.kill, box.container_id)
                for _ in range(250):
                    if box.channel.closed:
                        break
                    await asyncio.sleep(0.02)
            return box

        pool._acquire = lease_then_kill
        result = await pool.run(ExecRequest(command=["python3", "-c", "print('second try')"]))
        assert result.status is Status.OK and result.stdout == b"second try\n", result
        assert killed and pool.stats().retries == 1 and pool.stats().sandbox_errors == 0
        assert killed[0] not in pool_containers(pool)  # the dead one was removed, a new one made
        client.close()


async def test_program_already_running_is_never_run_twice() -> None:
    """A container that dies while its program runs gives SANDBOX_ERROR, not a second run."""
    async with SandboxPool(backend="docker", size=2, limits=TEST_LIMITS) as pool:
        client = docker.from_env()
        run = asyncio.ensure_future(pool.run(ExecRequest(command=["sleep", "30"], timeout_s=60)))
        await asyncio.sleep(1.0)
        busy = [box for box in pool._live if box not in pool._idle]
        await asyncio.to_thread(client.api.kill, busy[0].container_id)
        result = await run
        assert result.status is Status.SANDBOX_ERROR and pool.stats().retries == 0, result
        assert (await pool.run(ExecRequest(command=["true"]))).status is Status.OK
        client.close()


def _dead_owner(pool_id: str) -> Owner:
    proc = subprocess.Popen(["true"])
    me = Owner.current(pool_id)
    dead = me.model_copy(update={"pid": proc.pid})
    proc.wait()
    return dead


async def test_reaper_removes_dead_owners_containers_and_spares_live_ones() -> None:
    client = docker.from_env()
    keep = ["python3", "-c", "import time; time.sleep(600)"]
    dead = client.containers.run(
        IMAGE, keep, detach=True, network_mode="none", labels={LABEL: "1", **owner_labels(_dead_owner("deadpool0001"))}
    )
    live = client.containers.run(
        IMAGE,
        keep,
        detach=True,
        network_mode="none",
        labels={LABEL: "1", **owner_labels(Owner.current("livepool0001"))},
    )
    try:
        async with SandboxPool(backend="docker", size=1, limits=TEST_LIMITS):
            ids = {c["Id"] for c in client.api.containers(all=True, filters={"label": f"{LABEL}=1"})}
            assert dead.id not in ids and live.id in ids
    finally:
        live.remove(force=True)
        client.close()


TRAINER = """
import asyncio, sys
from workers.sandbox import ExecRequest, SandboxPool
async def main():
    pool = SandboxPool(backend=sys.argv[1], size=2)
    await pool.start()
    print(pool.owner.pool, flush=True)
    await pool.run(ExecRequest(command=["sleep", "600"], timeout_s=900))
asyncio.run(main())
"""
"""Starts a pool, says its id, and is killed while one of its sandboxes runs a program."""


def _start_trainer(backend: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAINER, backend],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    return proc, proc.stdout.readline().strip()


async def test_killed_trainer_leaks_nothing_past_next_start() -> None:
    proc, pool_id = await asyncio.to_thread(_start_trainer, "docker")
    client = docker.from_env()
    flt = {"label": f"codeworld.owner.pool={pool_id}"}
    assert len(client.api.containers(all=True, filters=flt)) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(client.api.containers(all=True, filters=flt)) == 2  # nothing could clean up yet
    async with SandboxPool(backend="docker", size=1, limits=TEST_LIMITS):
        assert client.api.containers(all=True, filters=flt) == []
    client.close()


async def test_killed_trainer_leaves_no_local_sandbox() -> None:
    from workers.sandbox.cgroup import stale_cgroup_dirs

    proc, pool_id = await asyncio.to_thread(_start_trainer, "local")
    assert len([d for d in stale_cgroup_dirs("codeworld-sbx-") if pool_id in d.name]) >= 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    low = 1_000_000_000 + (proc.pid % 1_000_000) * 1000
    for _ in range(100):  # they die with their parent at once; the host's init reaps them soon after
        rows = subprocess.run(["ps", "-eo", "uid=,stat=,pid=,ppid=,args="], capture_output=True, text=True).stdout
        left = [r for r in rows.splitlines() if low <= int(r.split()[0]) < low + 1000]
        if not left:
            break
        await asyncio.sleep(0.1)
    assert left == []
    async with SandboxPool(backend="local", size=1, limits=TEST_LIMITS):
        assert [d for d in stale_cgroup_dirs("codeworld-sbx-") if pool_id in d.name] == []


def _dockerd_pid() -> int:
    return int(Path("/var/run/docker.pid").read_text())


def _start_dockerd() -> None:
    with open(DOCKERD_LOG, "ab") as log:
        subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)


def _wait_docker_up(within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    raise TimeoutError(f"dockerd did not come back within {within_s} s; see {DOCKERD_LOG}")


def _wait_exit(pid: int, within_s: float) -> None:
    """dockerd removes its pid file last: a new one refuses to start until the old one is gone."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)


async def test_docker_daemon_restart_mid_run() -> None:
    """dockerd stopped (SIGTERM, as a service restart does) under two running programs: both end as
    SANDBOX_ERROR; once dockerd is back the same pool serves runs again by itself."""
    pool = SandboxPool(backend="docker", size=2, limits=TEST_LIMITS, acquire_timeout_s=120)
    await pool.start()
    stopped = False
    try:
        runs = [asyncio.ensure_future(pool.run(ExecRequest(command=["sleep", "60"], timeout_s=90))) for _ in range(2)]
        await asyncio.sleep(1.0)
        dockerd = _dockerd_pid()
        os.kill(dockerd, signal.SIGTERM)
        stopped = True
        results = await asyncio.wait_for(asyncio.gather(*runs), 60)
        assert [r.status for r in results] == [Status.SANDBOX_ERROR] * 2, results
    finally:
        if stopped:  # whatever happened above, the shared daemon is brought back
            await asyncio.to_thread(_wait_exit, dockerd, 60)
            _start_dockerd()
            await asyncio.to_thread(_wait_docker_up, 60)
    try:
        after = await pool.run(ExecRequest(command=["python3", "-c", "print('back')"]))
        assert after.status is Status.OK and after.stdout == b"back\n", after
    finally:
        await pool.close()
