"""Helpers of the sandbox tests: limits, the probe a next task runs, and leak counters."""

from __future__ import annotations

import json
import os

import docker
import docker.errors

from workers.sandbox import DEFAULT_IMAGE, ExecRequest, SandboxLimits, SandboxPool, SandboxProfile

BACKENDS = ["docker", "local"]
WRITABLE = "docker+testbed"
"""The Docker backend in the official SWE layout's profile: the image's /testbed writable per sandbox."""
TEST_LIMITS = SandboxLimits(pids=96, work_mb=64, tmp_mb=32, shm_mb=8, nofile=256)
"""Tight limits so hostile programs hit them fast."""
TESTBED_IMAGE = "codeworld-sandbox-testbed:test"
TESTBED_PROFILE = SandboxProfile(writable_paths=("/testbed",), writable_mb=48)
# The image's /testbed: a package, an executable, a read-only file, a symbolic link, a nested
# folder; made offline from the sandbox image.
_TESTBED_SETUP = (
    "mkdir -p /testbed/pkg/deep/er && echo 'VALUE = 1' > /testbed/pkg/__init__.py"
    " && printf '#!/bin/sh\necho run\n' > /testbed/run.sh && chmod 755 /testbed/run.sh"
    " && echo keep > /testbed/readonly.txt && chmod 444 /testbed/readonly.txt"
    " && ln -s pkg/__init__.py /testbed/link.py && echo x > /testbed/pkg/deep/er/leaf.txt"
    " && chmod -R o+rX /testbed"
)

PROBE = r"""
import hashlib, json, os
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
def tree(root):
    out = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + names):
            path = os.path.join(folder, name)
            st = os.lstat(path)
            data = os.readlink(path) if os.path.islink(path) else (
                hashlib.sha256(open(path, "rb").read()).hexdigest()[:12] if os.path.isfile(path) else "")
            out.append([os.path.relpath(path, root), oct(st.st_mode), data])
    return out
if os.path.isdir("/testbed"):
    files["/testbed"] = tree("/testbed")
ipc = {t: open("/proc/sysvipc/" + t).read().splitlines()[1:] for t in ("shm", "msg", "sem")}
print(json.dumps({"procs": procs, "files": files, "ipc": ipc}))
"""
"""Run as the next task: lists what it can see of earlier tasks (processes of its uid with a live
thread, other than itself and, where programs share the launcher's uid, the sandbox's own agent,
zygote and spare, which share a session no program can join; files in writable dirs; System V IPC
objects)."""

CLEAN_VIEW = {"procs": [], "files": {"/work": [], "/tmp": [], "/dev/shm": []}, "ipc": {"shm": [], "msg": [], "sem": []}}


def clean_view(pool: SandboxPool) -> dict:
    """What PROBE sees in a clean sandbox of `pool`: nothing, and writable paths as in the image."""
    if not pool.profile.writable_paths:
        return CLEAN_VIEW
    return {**CLEAN_VIEW, "files": {**CLEAN_VIEW["files"], "/testbed": PRISTINE_TESTBED}}


PRISTINE_TESTBED = [
    ["link.py", "0o120777", "pkg/__init__.py"],
    ["pkg", "0o40755", ""],
    ["readonly.txt", "0o100444", "f660a7996dea"],
    ["run.sh", "0o100755", "a4e0317eafab"],
    ["pkg/__init__.py", "0o100644", "e13df8c44af5"],
    ["pkg/deep", "0o40755", ""],
    ["pkg/deep/er", "0o40755", ""],
    ["pkg/deep/er/leaf.txt", "0o100644", "73cb3858a687"],
]
"""PROBE's view of TESTBED_IMAGE's /testbed."""


def ensure_testbed_image() -> str:
    """TESTBED_IMAGE, made from the sandbox image (offline, about a second) unless it exists."""
    client = docker.from_env()
    try:
        client.images.get(TESTBED_IMAGE)
        return TESTBED_IMAGE
    except docker.errors.ImageNotFound:
        pass
    container = client.containers.run(DEFAULT_IMAGE, ["sh", "-c", _TESTBED_SETUP], detach=True, network_mode="none")
    try:
        assert container.wait()["StatusCode"] == 0, container.logs()
        repository, tag = TESTBED_IMAGE.split(":")
        container.commit(repository, tag, changes=["WORKDIR /work"])
    finally:
        container.remove(force=True)
        client.close()
    return TESTBED_IMAGE


def make_pool(kind: str, size: int = 2) -> SandboxPool:
    """A pool of one of BACKENDS, or of WRITABLE (Docker, TESTBED_IMAGE, TESTBED_PROFILE)."""
    if kind == WRITABLE:
        return SandboxPool(
            backend="docker", image=ensure_testbed_image(), size=size, limits=TEST_LIMITS, profile=TESTBED_PROFILE
        )
    return SandboxPool(backend=kind, size=size, limits=TEST_LIMITS)  # type: ignore[arg-type]


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
