"""The public API on both backends: statuses, exit codes, the Python fast path behaving like a
fresh `python3`, files, env, workdir, sessions, and the isolation label."""

from __future__ import annotations

import pytest
from sandbox_testkit import TEST_LIMITS

from workers.sandbox import ExecRequest, Isolation, SandboxPool, Status

pytestmark = pytest.mark.asyncio(loop_scope="session")

PARITY = r"""
import os, sys, pickle, dataclasses
@dataclasses.dataclass
class Point:
    x: int
here = os.path.dirname(os.path.abspath(sys.argv[0])) if sys.argv[0] != "-c" else ""
print(__name__, sys.argv[1:], sys.path[0] == here)
print(pickle.loads(pickle.dumps(Point(3))), os.environ["GREETING"], os.getcwd())
print(sys.stdin.read().upper(), end="")
"""

COUNT_SLEEPS = (
    "import os\nprint(sum(1 for p in os.listdir('/proc') if p.isdigit() and "
    "open('/proc/%s/cmdline' % p, 'rb').read().startswith(b'sleep')))"
)


async def test_echo_program_with_files_and_stdin(pool: SandboxPool) -> None:
    r = await pool.run(
        ExecRequest(
            command=["python3", "main.py"],
            files={"main.py": b"print(input())"},
            stdin=b"hi\n",
            timeout_s=5.0,
            memory_mb=256,
        )
    )
    assert (r.status, r.exit_code, r.stdout, r.stderr, r.stdout_truncated) == (Status.OK, 0, b"hi\n", b"", False)
    assert r.isolation == (Isolation.DOCKER if pool.backend_name == "docker" else Isolation.BWRAP_CGROUP)
    assert 0 < r.wall_s < 5


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "exec"])
async def test_fast_path_behaves_like_a_fresh_interpreter(pool: SandboxPool, fast: bool) -> None:
    r = await pool.run(
        ExecRequest(
            command=["python3", "sub/prog.py", "a", "b"],
            files={"sub/prog.py": PARITY.encode()},
            stdin=b"shout\n",
            env={"GREETING": "hello"},
            fast_path=fast,
        )
    )
    assert r.status is Status.OK, r.stderr
    assert r.stdout.decode().splitlines() == ["__main__ ['a', 'b'] True", "Point(x=3) hello /work", "SHOUT"]


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "exec"])
@pytest.mark.parametrize(
    ("code", "exit_code", "stderr_has"),
    [
        ("import sys; sys.exit(3)", 3, b""),
        ("import sys; sys.exit('bye')", 1, b"bye"),
        ("def f():\n    raise ValueError('boom')\nf()", 1, b"ValueError: boom"),
        ("import os; os.kill(os.getpid(), 9)", -9, b""),
        ("x = (", 1, b"SyntaxError"),
    ],
)
async def test_failures_report_exit_code_and_stderr(
    pool: SandboxPool, code: str, exit_code: int, stderr_has: bytes, fast: bool
) -> None:
    r = await pool.run(ExecRequest(command=["python3", "-c", code], fast_path=fast))
    assert (r.status, r.exit_code) == (Status.RUNTIME_ERROR, exit_code), r
    assert stderr_has in r.stderr
    assert b"agent" not in r.stderr and b"zygote" not in r.stderr  # the sandbox's own frames never show


async def test_module_and_shell_and_shebang(pool: SandboxPool) -> None:
    files = {
        "pkg/__init__.py": b"",
        "pkg/__main__.py": b"import sys; print('mod', sys.argv[1:])",
        "run.sh": b"#!/bin/sh\necho shell $1\n",
    }
    r = await pool.run(ExecRequest(command=["sh", "-c", "python3 -m pkg x && ./run.sh y"], files=files))
    assert r.stdout == b"mod ['x']\nshell y\n", r.stderr
    r = await pool.run(ExecRequest(command=["python3", "-m", "pkg", "z"], files=files))
    assert r.stdout == b"mod ['z']\n", r.stderr


async def test_workdir_and_cpu_time(pool: SandboxPool) -> None:
    program = "import os\nfor _ in range(3 * 10**6): pass\nprint(os.getcwd())"
    r = await pool.run(ExecRequest(command=["python3", "-c", program], files={"deep/er/x.txt": b""}, workdir="deep/er"))
    assert r.stdout == b"/work/deep/er\n" and r.cpu_s > 0.01, r
    missing = await pool.run(ExecRequest(command=["true"], workdir="nowhere"))
    assert missing.status is Status.RUNTIME_ERROR and "nowhere" in missing.error


async def test_memory_limit_follows_each_request(pool: SandboxPool) -> None:
    hog = "x = b'x' * (200 << 20); print(len(x) >> 20)"
    small = await pool.run(ExecRequest(command=["python3", "-c", hog], memory_mb=128))
    big = await pool.run(ExecRequest(command=["python3", "-c", hog], memory_mb=512))
    assert (small.status, big.status, big.stdout) == (Status.OOM, Status.OK, b"200\n")


async def test_session_keeps_files_between_calls_and_is_reset_after(pool: SandboxPool) -> None:
    async with pool.session() as box:
        await box.put_files({"state/count.txt": b"1"})
        bump = "echo $(( $(cat state/count.txt) + 1 )) > state/count.txt"
        r = await box.exec(ExecRequest(command=["sh", "-c", bump]))
        assert r.status is Status.OK
        r = await box.exec(ExecRequest(command=["sh", "-c", "sleep 100 & echo started"]))
        assert r.stdout == b"started\n"
        assert await box.get_files(["state/count.txt"]) == {"state/count.txt": b"2\n"}
        sleeping = await box.exec(ExecRequest(command=["python3", "-c", COUNT_SLEEPS]))
        assert sleeping.stdout == b"0\n"  # the background sleep of the last call was killed
    after = [await pool.run(ExecRequest(command=["ls", "-A", "/work"])) for _ in range(2)]
    assert [r.stdout for r in after] == [b"", b""]


async def test_rlimit_fallback_labels_itself_and_still_cleans_up() -> None:
    async with SandboxPool(backend="local", size=1, limits=TEST_LIMITS, local_isolation="rlimit") as pool:
        orphan = "import os, time\nif os.fork() == 0:\n    os.setsid(); time.sleep(30)\nprint('ok')"
        r = await pool.run(ExecRequest(command=["python3", "-c", orphan]))
        assert (r.status, r.isolation, r.stdout) == (Status.OK, Isolation.RLIMIT, b"ok\n")
        uid_procs = await pool.run(ExecRequest(command=["sh", "-c", "ps -o pid= -u $(id -u) | wc -l"]))
        assert int(uid_procs.stdout) == 3  # sh, ps, wc (the launcher runs as root): the orphan is gone
        t = await pool.run(ExecRequest(command=["python3", "-c", "while True: pass"], timeout_s=0.5))
        assert t.status is Status.TIMEOUT


async def test_unknown_backend_and_bad_size_are_refused() -> None:
    with pytest.raises(ValueError, match="backend"):
        SandboxPool(backend="podman")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        SandboxPool(backend="local", size=0)
