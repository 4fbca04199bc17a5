"""The official SWE layout's profile (`SandboxProfile.writable_paths`): the image's /testbed is
writable per sandbox and nothing else is; nothing one task leaves there reaches the next; the
profile's paths are checked before any container starts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from pydantic import ValidationError
from sandbox_testkit import PRISTINE_TESTBED, PROBE, WRITABLE, clean_view, make_pool, probe

from workers.sandbox import ExecRequest, SandboxPool, SandboxProfile, SandboxUnavailable, Status

session_loop = pytest.mark.asyncio(loop_scope="session")

WRITES = r"""
import os, sys
for path in sys.argv[1:]:
    try:
        with open(path, "a") as f:
            f.write("owned")
        print(path, "written")
    except OSError as exc:
        print(path, "refused", exc.errno)
"""


@pytest.fixture(scope="module")
async def pool() -> AsyncIterator[SandboxPool]:
    async with make_pool(WRITABLE, size=1) as sandbox_pool:
        yield sandbox_pool


@session_loop
async def test_writes_outside_the_writable_paths_fail(pool: SandboxPool) -> None:
    outside = [
        "/etc/passwd",
        "/usr/lib/python3/dist-packages/owned.pth",
        "/owned",
        "/opt/owned",
        "/var/owned",
        "/home/owned",
        "/.codeworld/pristine/0/pkg/__init__.py",
        "/.codeworld/owned",
        "/testbed/../owned",
    ]
    inside = ["/testbed/pkg/__init__.py", "/testbed/new.py", "/testbed/pkg/deep/er/leaf.txt"]
    result = await pool.run(ExecRequest(command=["python3", "-c", WRITES, *outside, *inside]))
    assert result.status is Status.OK, result.stderr
    lines = {line.split()[0]: line.split()[1] for line in result.stdout.decode().splitlines()}
    assert {path: lines[path] for path in outside} == {path: "refused" for path in outside}
    assert {path: lines[path] for path in inside} == {path: "written" for path in inside}
    # The image's own copy, seen read-only, is untouched; the next task sees the image's tree.
    assert await probe(pool) == clean_view(pool)


ATTACKS = {
    "edit, delete, add": "echo evil >> pkg/__init__.py; rm run.sh; echo new > pkg/new.py; mkdir -p a/b/c",
    "modes and links": "chmod 000 pkg/deep; chmod 777 readonly.txt; ln -sf /etc/passwd link.py; ln -s /work w",
    "special files": 'mkfifo pkg/fifo; mkdir locked && touch locked/x && chmod 0 locked; python3 -c "'
    "import socket; s = socket.socket(socket.AF_UNIX); s.bind('sock')\"",
    "fill to the cap": "dd if=/dev/zero of=big bs=1M count=100 2>/dev/null; ls",
    "a late writer": "echo now > now.txt; (sleep 0.5; echo late > late.txt) & setsid sh -c 'sleep 0.6; echo x > l2' &",
    "lock the root": "chmod 000 /testbed",
    "swap the tree": "cd / && mv /testbed/pkg /testbed/pkg2 && mkdir /testbed/pkg && echo 'VALUE = 2' > "
    "/testbed/pkg/__init__.py",
}


@session_loop
@pytest.mark.parametrize("attack", ATTACKS.values(), ids=list(ATTACKS))
async def test_nothing_written_in_one_task_is_seen_by_the_next(pool: SandboxPool, attack: str) -> None:
    replaced = pool.stats().replaced
    async with pool.session() as box:
        done = await box.exec(ExecRequest(command=["sh", "-c", f"cd /testbed && {attack}"], timeout_s=20))
        assert done.status is Status.OK, (done.stdout, done.stderr)
        seen = await box.exec(ExecRequest(command=["python3", "-c", PROBE]))
        assert json.loads(seen.stdout)["files"]["/testbed"] != PRISTINE_TESTBED  # the attack changed the tree
    # A session's writes are gone for the next task (late writers too), and so are one-shot runs'.
    await asyncio.sleep(1.0)
    assert await probe(pool) == clean_view(pool)
    await pool.run(ExecRequest(command=["sh", "-c", f"cd /testbed && {attack}"], timeout_s=20))
    assert await probe(pool) == clean_view(pool)
    # The reset restored the tree in place: nothing the program did forced a new sandbox.
    assert pool.stats().sandbox_errors == 0 and pool.stats().replaced == replaced


@session_loop
async def test_a_writable_path_is_capped(pool: SandboxPool) -> None:
    fill = (
        "import os\nn = 0\ntry:\n    with open('/testbed/fill', 'wb') as f:\n        while True:\n"
        "            f.write(b'x' * (1 << 20)); f.flush(); n += 1\n"
        "except OSError as e:\n    print(n, e.errno)"
    )
    result = await pool.run(ExecRequest(command=["python3", "-c", fill], memory_mb=256))
    mb, errno = result.stdout.split()
    assert 40 <= int(mb) <= 48 and errno == b"28", result.stdout  # ENOSPC at the 48 MB cap
    assert await probe(pool) == clean_view(pool)


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/proc",
        "/proc/self",
        "/sys/fs",
        "/dev",
        "/work",
        "/work/repo",
        "/tmp/x",
        "/run",
        "/.codeworld",
        "/.codeworld/pristine/0",
        "testbed",
        "/testbed/",
        "/a/../etc",
        "/a//b",
        "/a/./b",
        "/a,b",
        "/a:b",
        "/a b",
        "/a\x00b",
        "/a\nb",
        "/$HOME",
    ],
)
def test_writable_paths_that_would_break_the_sandbox_are_refused(path: str) -> None:
    with pytest.raises(ValidationError):
        SandboxProfile(writable_paths=(path,))


def test_nested_or_repeated_writable_paths_are_refused() -> None:
    for paths in (("/testbed", "/testbed/src"), ("/opt", "/opt/conda"), ("/testbed", "/testbed")):
        with pytest.raises(ValidationError):
            SandboxProfile(writable_paths=paths)
    assert SandboxProfile(writable_paths=("/testbed", "/opt/miniconda3/envs/testbed")).writable_paths


@session_loop
async def test_the_local_backend_refuses_writable_paths() -> None:
    pool = SandboxPool(backend="local", size=1, profile=SandboxProfile(writable_paths=("/testbed",)))
    with pytest.raises(SandboxUnavailable, match="/testbed.*need the docker backend"):
        await pool.start()
