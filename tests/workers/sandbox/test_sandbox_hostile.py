"""Hostile programs against both backends. Each case has its expected status and a check of what
it produced; after each case the next task sees nothing of it (PROBE), and at the end no
container, process or host file descriptor is left."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from typing import Callable

import pytest

from collections.abc import AsyncIterator

from sandbox_testkit import (
    BACKENDS,
    WRITABLE,
    clean_view,
    host_fd_count,
    make_pool,
    pool_containers,
    probe,
    sandbox_uid_processes,
)
from workers.sandbox import ExecRequest, ExecResult, SandboxPool, Status

pytestmark = pytest.mark.asyncio(loop_scope="session")

CAP = 1 << 20  # the default max_output_bytes


@dataclasses.dataclass
class Case:
    name: str
    code: str
    expect: Status
    check: Callable[[ExecResult], None] = lambda r: None
    timeout_s: float = 10.0
    memory_mb: int = 256
    stdin: bytes = b""
    probe_delay_s: float = 0.0


def blocked_lines(r: ExecResult) -> None:
    lines = r.stdout.decode().split()
    assert lines and all(line.endswith(":blocked") for line in lines), r.stdout


def exact_stdout(n: int) -> Callable[[ExecResult], None]:
    def check(r: ExecResult) -> None:
        pattern = bytes(range(256)) * (n // 256 + 1)
        assert r.stdout == pattern[:n] and not r.stdout_truncated

    return check


def truncated_at_cap(r: ExecResult) -> None:
    assert r.stdout_truncated and len(r.stdout) == CAP


TRY = """
import os, socket, sys, ctypes
def attempt(name, fn):
    try:
        ok = fn()
    except Exception:
        ok = False
    print(name + (":ESCAPED" if ok not in (False, -1) else ":blocked"))
"""

CASES = [
    Case("busy_loop", "while True: pass", Status.TIMEOUT, timeout_s=1.0),
    Case("sleep_forever", "import time; time.sleep(10**6)", Status.TIMEOUT, timeout_s=1.0),
    Case("memory_bomb_sudden", "x = b'x' * (2 << 30)", Status.OOM, memory_mb=128),
    Case("memory_bomb_gradual", "l = []\nwhile True: l.append(b'x' * (1 << 20))", Status.OOM, memory_mb=128),
    Case(
        "fd_exhaustion",
        "fs = []\ntry:\n    while True: fs.append(open('/dev/null'))\nexcept OSError as e:\n"
        "    print(len(fs), e.errno)",
        Status.OK,
        lambda r: (int(r.stdout.split()[0]) <= 256) and r.stdout.split()[1] == b"24" or pytest.fail(repr(r.stdout)),
    ),
    Case(
        "thread_bomb",
        "import threading, time\nn = 0\ntry:\n    while True:\n"
        "        threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); n += 1\n"
        "except RuntimeError:\n    print(n)",
        Status.OK,
        lambda r: int(r.stdout) < 96 or pytest.fail(repr(r.stdout)),
    ),
    Case(
        "disk_fill",
        "import os\nfor d in ['/work', '/tmp', '/dev/shm', '/var/tmp', '/run', '/home', '/',\n"
        "          '/dev/mqueue', '/testbed', '/.codeworld/pristine/0']:\n"
        "    n = 0\n    try:\n        with open(os.path.join(d, 'fill'), 'wb') as f:\n"
        "            while n < (1 << 30):\n                f.write(b'x' * (1 << 20)); f.flush(); n += 1 << 20\n"
        "    except OSError as e:\n        pass\n    print(d, n >> 20)",
        Status.OK,
        lambda r: all(int(mb) <= 64 for _, mb in (line.split() for line in r.stdout.decode().splitlines()))
        or pytest.fail(repr(r.stdout)),
    ),
    Case(
        "setsid_orphan",
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1.0)\n"
        "    open('/work/late_orphan', 'w').write('x')\n    os._exit(0)\nprint('parent done')",
        Status.OK,
        probe_delay_s=1.5,
    ),
    Case(
        "double_fork_daemon",
        "import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        "        time.sleep(1.0)\n        open('/tmp/late_daemon', 'w').write('x')\n"
        "        print('late', flush=True)\n"
        "    os._exit(0)\nos.wait()\nprint('parent done')",
        Status.OK,
        lambda r: r.stdout == b"parent done\n" or pytest.fail(repr(r.stdout)),
        probe_delay_s=1.5,
    ),
    Case(
        "stdout_50mb_one_write",
        "import sys; sys.stdout.buffer.write(b'x' * 50_000_000)",
        Status.OUTPUT_LIMIT,
        truncated_at_cap,
    ),
    Case(
        "ten_million_lines",
        "import sys\nw = sys.stdout.write\nfor _ in range(10**7): w('\\n')",
        Status.OUTPUT_LIMIT,
        truncated_at_cap,
    ),
    *[
        Case(
            f"exactly_{n >> 10}k",
            f"import sys; sys.stdout.buffer.write((bytes(range(256)) * {n // 256 + 1})[:{n}])",
            Status.OK,
            exact_stdout(n),
        )
        for n in (64 << 10, 128 << 10, CAP)
    ],
    Case(
        "huge_stderr_small_stdout",
        "import sys; sys.stderr.buffer.write(b'e' * 30_000_000); print('answer')",
        Status.OK,
        lambda r: (r.stdout == b"answer\n" and r.stderr_truncated and len(r.stderr) == CAP)
        or pytest.fail(repr(r.stdout)),
    ),
    Case(
        "invalid_utf8_and_nul",
        "import sys; sys.stdout.buffer.write(b'\\xff\\xfe\\x00abc\\x00\\xc3')",
        Status.OK,
        lambda r: r.stdout == b"\xff\xfe\x00abc\x00\xc3" or pytest.fail(repr(r.stdout)),
    ),
    Case(
        "network",
        TRY
        + """
attempt("tcp", lambda: socket.create_connection(("1.1.1.1", 80), timeout=1))
attempt("dns", lambda: socket.getaddrinfo("pypi.org", 443))
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
    query = b"\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x03www\\x00\\x00\\x01\\x00\\x01"
    s.sendto(query, ("8.8.8.8", 53))
    return s.recv(512)
attempt("udp_dns", udp)
attempt("ipv6", lambda: socket.create_connection(("2606:4700:4700::1111", 80), timeout=1))
attempt("gateway", lambda: socket.create_connection(("172.17.0.1", 2375), timeout=1))
attempt("metadata", lambda: socket.create_connection(("169.254.169.254", 80), timeout=1))
def docker_sock():
    for path in ("/var/run/docker.sock", "/run/docker.sock"):
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(path); return True
        except OSError:
            pass
    return False
attempt("docker_socket", docker_sock)
""",
        Status.OK,
        blocked_lines,
    ),
    Case(
        "system_writes",
        TRY
        + """
import sysconfig, site
def write(path):
    with open(path, "a") as f:
        f.write("owned")
    return True
attempt("etc", lambda: write("/etc/passwd"))
attempt("usr", lambda: write("/usr/bin/owned"))
attempt("site_packages", lambda: write(sysconfig.get_paths()["purelib"] + "/owned.py"))
for i, path in enumerate(site.getsitepackages()):
    attempt("site_%d" % i, lambda: write(path + "/owned.pth"))
""",
        Status.OK,
        blocked_lines,
    ),
    Case(
        "privilege",
        TRY
        + """
libc = ctypes.CDLL(None, use_errno=True)
attempt("setuid", lambda: os.setuid(0))
attempt("unshare_user", lambda: libc.unshare(0x10000000))
attempt("unshare_mount", lambda: libc.unshare(0x00020000))
attempt("mount", lambda: libc.mount(b"none", b"/work", b"tmpfs", 0, None))
attempt("ptrace_pid1", lambda: libc.ptrace(16, 1, 0, 0))
attempt("ptrace_launcher", lambda: libc.ptrace(16, os.getppid(), 0, 0))
""",
        Status.OK,
        blocked_lines,
    ),
    Case(
        "sysv_ipc_leftover",
        "import ctypes\nlibc = ctypes.CDLL(None)\nshmid = libc.shmget(0, 4096, 0o1600)\nprint(shmid >= 0)",
        Status.OK,
        lambda r: r.stdout == b"True\n" or pytest.fail(repr(r.stdout)),
    ),
    Case(
        "stdin_100mb",
        "import hashlib, sys\nd = sys.stdin.buffer.read()\nprint(len(d), hashlib.sha256(d).hexdigest())",
        Status.OK,
        lambda r: r.stdout.split() == [b"104857600", hashlib.sha256(b"s" * (100 << 20)).hexdigest().encode()]
        or pytest.fail(repr(r.stdout)),
        stdin=b"s" * (100 << 20),
        timeout_s=60,
    ),
]


@pytest.fixture(scope="module", params=[*BACKENDS, WRITABLE])
async def pool(request: pytest.FixtureRequest) -> AsyncIterator[SandboxPool]:
    """Two warm sandboxes of one backend (here also Docker in the official SWE layout's profile)."""
    async with make_pool(request.param) as sandbox_pool:
        yield sandbox_pool


@pytest.fixture(scope="module")
def baseline(pool: SandboxPool) -> dict:
    """Host fds when the module's pool was fresh (checked again at the end)."""
    return {"fds": host_fd_count()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_hostile_case(pool: SandboxPool, baseline: dict, case: Case) -> None:
    started = time.monotonic()
    result = await pool.run(
        ExecRequest(
            command=["python3", "-c", case.code], stdin=case.stdin, timeout_s=case.timeout_s, memory_mb=case.memory_mb
        )
    )
    elapsed = time.monotonic() - started
    assert result.status is case.expect, (result.status, result.exit_code, result.stderr[-500:], result.error)
    case.check(result)
    if case.expect is Status.TIMEOUT:
        assert elapsed <= case.timeout_s + 0.5, elapsed
    await asyncio.sleep(case.probe_delay_s)
    views = await asyncio.gather(probe(pool), probe(pool))  # both sandboxes: whichever ran the case
    assert views == [clean_view(pool), clean_view(pool)]


async def test_fork_bomb_leaves_other_sandboxes_running(pool: SandboxPool) -> None:
    bomb = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)"
    bomb_run = asyncio.ensure_future(pool.run(ExecRequest(command=["python3", "-c", bomb], timeout_s=3.0)))
    await asyncio.sleep(0.5)
    others = []
    while not bomb_run.done():
        others.append(await pool.run(ExecRequest(command=["python3", "-c", "print(6 * 7)"], timeout_s=5)))
    result = await bomb_run
    assert result.status is Status.TIMEOUT
    assert others and all(r.status is Status.OK and r.stdout == b"42\n" for r in others), others
    assert await probe(pool) == clean_view(pool)


async def test_symlinks_in_files_are_never_followed(pool: SandboxPool) -> None:
    async with pool.session() as box:
        made = await box.exec(
            ExecRequest(
                command=["sh", "-c", "ln -s /etc/passwd passwd_link; ln -s /tmp tmp_link; echo inside > real.txt"]
            )
        )
        assert made.status is Status.OK
        with pytest.raises(ValueError):
            await box.put_files({"tmp_link/planted": b"x"})
        got = await box.get_files(["passwd_link", "tmp_link/anything", "real.txt", "missing.txt"])
        assert got == {"real.txt": b"inside\n"}
        listing = await box.exec(ExecRequest(command=["ls", "-A", "/tmp"]))
        assert listing.stdout == b""


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../escape", "ok/\x00nul", ""])
async def test_path_traversal_in_files_is_refused(path: str) -> None:
    with pytest.raises(ValueError):
        ExecRequest(command=["true"], files={path: b"x"})


async def test_zz_nothing_leaks(pool: SandboxPool, baseline: dict) -> None:
    """Runs last in the module: every sandbox was reset, the pool is healthy, and closing it
    leaves no container, no sandbox process and no host file descriptor behind."""
    stats = pool.stats()
    assert stats.sandbox_errors == 0, stats
    await pool.close()
    assert pool_containers(pool) == []
    assert sandbox_uid_processes(pool) == []
    assert host_fd_count() <= baseline["fds"], (host_fd_count(), baseline)
