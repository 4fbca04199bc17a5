"""Helpers of the sandbox tests: limits, the probe a next task runs, and leak counters."""

from __future__ import annotations

import json
import os

import docker

from workers.sandbox import ExecRequest, SandboxLimits, SandboxPool

BACKENDS = ["docker", "local"]
TEST_LIMITS = SandboxLimits(pids=96, work_mb=64, tmp_mb=32, shm_mb=8, nofile=256)
"""Tight limits so hostile programs hit them fast."""

PROBE = r"""
import json, os
me = os.getpid()
launcher_session = os.getsid(os.getppid())
procs = []
for name in os.listdir("/proc"):
    if not name.isdigit() or int(name) == me:
        continue
    try:
        if os.getsid(int(name)) == launcher_session:  # agent, zygote and its waiting spare
            continue
    except OSError:
        continue
    try:
        with open("/proc/%s/status" % name) as f:
            fields = dict(l.split(":", 1) for l in f if ":" in l)
        # A zombie leader may lead live threads: a process is alive while any thread is.
        states = [open("/proc/%s/task/%s/stat" % (name, t)).read().rsplit(")", 1)[1].split()[0]
                  for t in os.listdir("/proc/%s/task" % name)]
    except OSError:
        continue
    if int(fields["Uid"].split()[0]) == os.getuid() and any(s not in "ZX" for s in states):
        procs.append(fields["Name"].strip())
files = {d: sorted(os.listdir(d)) for d in ("/work", "/tmp", "/dev/shm") if os.path.isdir(d)}
ipc = {t: open("/proc/sysvipc/" + t).read().splitlines()[1:] for t in ("shm", "msg", "sem")}
print(json.dumps({"procs": procs, "files": files, "ipc": ipc}))
"""
"""Run as the next task: lists what it can see of earlier tasks (processes of its uid with a live
thread, other than itself and, where programs share the launcher's uid, the sandbox's own agent,
zygote and spare, which share a session no program can join; files in writable dirs; System V IPC
objects)."""

CLEAN_VIEW = {"procs": [], "files": {"/work": [], "/tmp": [], "/dev/shm": []}, "ipc": {"shm": [], "msg": [], "sem": []}}


async def probe(pool: SandboxPool) -> dict:
    result = await pool.run(ExecRequest(command=["python3", "-c", PROBE], timeout_s=10))
    assert result.status.value == "ok", (result.status, result.stderr, result.error)
    return json.loads(result.stdout)


def host_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def pool_containers(pool: SandboxPool) -> list[str]:
    client = docker.from_env()
    try:
        found = client.api.containers(all=True, filters={"label": f"codeworld.owner.pool={pool.owner.pool}"})
    finally:
        client.close()
    return [c["Id"] for c in found]


def sandbox_uid_processes(pool: SandboxPool) -> list[int]:
    """Host processes running under the local backend's uids of this pool (none may outlive it)."""
    from workers.sandbox.local_layout import unprivileged_uid

    low, high = unprivileged_uid(pool.owner.pid, 0), unprivileged_uid(pool.owner.pid, 999)
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                uid = int([line for line in f if line.startswith("Uid:")][0].split()[1])
        except (OSError, IndexError):
            continue
        if low <= uid <= high:
            found.append(int(name))
    return found
