"""The program as an adversary of the sandbox itself, on both backends (issue #8): processes that
outlive their task, a launcher poisoned through the files a program leaves, a launcher or agent
whose limits or scheduling a program changes, and calls that could hang the host. After each
attack the next task sees nothing of it, and every later program runs normally from an untouched
launcher (or the sandbox has been replaced)."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import tempfile
import time
from pathlib import Path

import docker
import pytest
from sandbox_testkit import CLEAN_VIEW, PROBE, TEST_LIMITS, probe

from workers.sandbox import ExecRequest, SandboxError, SandboxPool, Status

pytestmark = pytest.mark.asyncio(loop_scope="session")

SYS_EXIT = {"x86_64": 60, "aarch64": 93}[platform.machine()]
"""The raw `exit` syscall: it ends the calling thread only, so a main thread that calls it leaves
a zombie thread-group leader whose other threads run on."""

# ------------------------------------------------------------------------------------ survivors
_LINGER = """
import ctypes, os, threading, time
libc = ctypes.CDLL(None, use_errno=True)
def linger():
    time.sleep(DELAY)
    for d in ("/work", "/tmp", "/dev/shm"):
        try:
            open(d + "/planted_by_survivor", "w").write("x")
        except OSError:
            pass
    time.sleep(600)
def zombie_leader():
    threading.Thread(target=linger).start()
    time.sleep(0.05)
    libc.syscall(SYS_EXIT, 0)
"""
SURVIVORS = {
    # A forked child in a session of its own ends its main thread; its thread plants files later.
    "forked_zombie_leader": _LINGER
    + """
if os.fork() == 0:
    os.setsid()
    zombie_leader()
time.sleep(0.3)
print("done")
""",
    # The same two forks down, so that it is reparented (to the launcher, a subreaper).
    "grandchild_zombie_leader": _LINGER
    + """
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        zombie_leader()
    os._exit(0)
os.wait()
time.sleep(0.3)
print("done")
""",
    # The survivor's thread forks a fresh, ordinary process later, from beyond the cleanup.
    "zombie_leader_that_respawns": _LINGER.replace(
        "time.sleep(600)",
        """if os.fork() == 0:
        os.setsid()
        time.sleep(600)
    time.sleep(600)""",
    )
    + """
if os.fork() == 0:
    os.setsid()
    zombie_leader()
time.sleep(0.3)
print("done")
""",
    # Several survivors at once, in their own process groups.
    "many_zombie_leaders": _LINGER
    + """
for _ in range(5):
    if os.fork() == 0:
        os.setpgid(0, 0)
        zombie_leader()
time.sleep(0.3)
print("done")
""",
}


@pytest.mark.parametrize("name", list(SURVIVORS))
async def test_no_process_survives_its_task(pool: SandboxPool, name: str) -> None:
    code = SURVIVORS[name].replace("DELAY", "1.0").replace("SYS_EXIT", str(SYS_EXIT))
    result = await pool.run(ExecRequest(command=["python3", "-c", code], timeout_s=10))
    assert (result.status, result.stdout) == (Status.OK, b"done\n"), (result.status, result.stderr[-500:])
    await asyncio.sleep(1.5)  # past the survivor's delay: it would have planted its files by now
    assert await asyncio.gather(probe(pool), probe(pool)) == [CLEAN_VIEW, CLEAN_VIEW]


async def test_a_session_shows_its_next_task_nothing(pool: SandboxPool) -> None:
    """A survivor left by a session's command (the SWE agent's shell) must not reach the next
    session, e.g. to drop a `conftest.py` into a later grading run."""
    code = SURVIVORS["forked_zombie_leader"].replace("DELAY", "1.0").replace("SYS_EXIT", str(SYS_EXIT))
    async with pool.session() as box:
        assert (await box.exec(ExecRequest(command=["python3", "-c", code]))).status is Status.OK
    await asyncio.sleep(1.5)
    async with pool.session() as box:
        listing = await box.exec(ExecRequest(command=["ls", "-A", "/work", "/tmp"]))
        assert b"planted" not in listing.stdout, listing.stdout
    assert await asyncio.gather(probe(pool), probe(pool)) == [CLEAN_VIEW, CLEAN_VIEW]


async def test_a_survivor_of_the_program_itself_ends_with_the_run(pool: SandboxPool) -> None:
    """The program's own main thread ends with the raw exit syscall: the run waits for its
    threads, ends at its deadline, and nothing of it remains."""
    code = (_LINGER + "\nprint('bye', flush=True)\nzombie_leader()\n").replace("DELAY", "0.5")
    result = await pool.run(
        ExecRequest(command=["python3", "-c", code.replace("SYS_EXIT", str(SYS_EXIT))], timeout_s=2)
    )
    assert result.status is Status.TIMEOUT and result.stdout == b"bye\n", result
    await asyncio.sleep(1.0)
    assert await asyncio.gather(probe(pool), probe(pool)) == [CLEAN_VIEW, CLEAN_VIEW]


# ------------------------------------------------------------------------------- poisoned launcher
# Runs wherever it is imported, then stands in for the module it shadows.
_PAYLOAD = """
import builtins, importlib, sys
builtins.CODEWORLD_POISONED = True
open("/tmp/poisoned_" + __name__, "a").write("x")
_me = sys.modules.pop(__name__)
sys.path = [p for p in sys.path if p not in ("", ".") and not p.startswith(("/work", "/tmp"))]
sys.modules[__name__] = importlib.import_module(__name__)
"""
_LAUNCHER = """
import os, signal
zygote = os.getppid()
agent = int(open("/proc/%d/stat" % zygote).read().rsplit(")", 1)[1].split()[1])
"""
_PLANT = """
import os
def plant(folder, names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        with open(os.path.join(folder, name), "w") as f:
            f.write(PAYLOAD)
"""
POISONS = {
    # Every module the launcher imports, as files in the work dir (its old working directory).
    "modules_in_the_work_dir": (
        "plant('/work', [m + '.py' for m in ('json', 'socket', 'select', 'struct', 'signal', "
        "'errno', 'io', 'stat', 'runpy', 'traceback', 'types', 'atexit', 'resource', 'gc')])",
        True,
    ),
    # A package directory that shadows ctypes (the launcher's first import).
    "ctypes_package": ("plant('/work/ctypes', ['__init__.py'])", True),
    # A user site directory under HOME (= /work) with a .pth line and usercustomize.
    "user_site": (
        "plant('/work/.local/lib/python3.11/site-packages', ['usercustomize.py'])\n"
        "open('/work/.local/lib/python3.11/site-packages/x.pth', 'w').write("
        "'import builtins; builtins.CODEWORLD_POISONED = True\\n')",
        True,
    ),
    # What the agent would import lazily when the session next sends or fetches files.
    "agent_lazy_imports": ("plant('/work', ['tarfile.py', 'shutil.py', 'copy.py', 'warnings.py'])", False),
}
CHECK = (
    "import builtins, os\nprint(getattr(builtins, 'CODEWORLD_POISONED', False), sorted(f for f in os.listdir('/tmp')))"
)


@pytest.mark.parametrize("name", list(POISONS))
async def test_files_a_program_leaves_never_poison_the_launcher(pool: SandboxPool, name: str) -> None:
    """The program plants modules where the launcher or the agent could import them, and (where
    marked) kills the launcher: a dead one used to be restarted in the work dir, before the wipe.
    Later programs must fork from clean code: on the fast path they inherit the launcher's memory."""
    plant, kill = POISONS[name]
    attack = (
        _PLANT.replace("PAYLOAD", repr(_PAYLOAD))
        + plant
        + _LAUNCHER
        + """
for pid in (zygote,) if DO_KILL else ():
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
print("planted")
""".replace("DO_KILL", str(kill))
    )
    async with pool.session() as box:
        planted = await box.exec(ExecRequest(command=["python3", "-c", attack]))
        assert planted.stdout == b"planted\n", planted.stderr.decode()
        await box.put_files({"after.txt": b"x"})  # the agent reads and writes files after the plant
        assert await box.get_files(["after.txt"]) == {"after.txt": b"x"}
        inside = await box.exec(ExecRequest(command=["python3", "-c", CHECK]))
        assert (inside.status, inside.stdout) == (Status.OK, b"False []\n"), inside
    for _ in range(4):  # both sandboxes, twice
        checked = await pool.run(ExecRequest(command=["python3", "-c", CHECK]))
        assert (checked.status, checked.stdout) == (Status.OK, b"False []\n"), checked


# --------------------------------------------------------------------------------- launcher limits
_TAMPER = (
    _LAUNCHER
    + """
import resource
out = []
def attempt(label, fn):
    try:
        fn()
        out.append(label + ":CHANGED")
    except OSError:
        out.append(label + ":blocked")
for who, pid in (("zygote", zygote), ("agent", agent)):
    ATTEMPTS
print(" ".join(out))
"""
)
TAMPERING = {
    "open_files": "attempt(who + ':nofile', lambda: resource.prlimit(pid, resource.RLIMIT_NOFILE, (4, 4)))",
    "file_size": "attempt(who + ':fsize', lambda: resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, 0)))",
    "address_space": "attempt(who + ':as', lambda: resource.prlimit(pid, resource.RLIMIT_AS, (1 << 22, 1 << 22)))",
    "processes": "attempt(who + ':nproc', lambda: resource.prlimit(pid, resource.RLIMIT_NPROC, (1, 1)))",
    "nice": "attempt(who + ':nice', lambda: os.setpriority(os.PRIO_PROCESS, pid, 19))",
    "scheduler": "attempt(who + ':sched', lambda: os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0)))",
    "affinity": "attempt(who + ':cpus', lambda: os.sched_setaffinity(pid, {0}))",
    "stop": "attempt(who + ':stop', lambda: os.kill(pid, signal.SIGSTOP))",
}


@pytest.mark.parametrize("name", list(TAMPERING))
async def test_programs_cannot_limit_or_reschedule_the_launcher(pool: SandboxPool, name: str) -> None:
    """With a uid of their own, programs cannot touch the agent or its launcher at all; and
    every later run gives its true result (a capped launcher used to fail them all, as zeros)."""
    attack = _TAMPER.replace("ATTEMPTS", TAMPERING[name])
    result = await pool.run(ExecRequest(command=["python3", "-c", attack], timeout_s=5))
    assert result.status is Status.OK, result
    assert b"CHANGED" not in result.stdout and result.stdout.count(b"blocked") == 2, result.stdout
    checks = await asyncio.gather(
        *(
            pool.run(
                ExecRequest(
                    command=["python3", "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, os.getppid()), 6 * 7)"],
                    files={"big.txt": b"x" * 1000},
                    timeout_s=5,
                )
            )
            for _ in range(4)
        )
    )
    assert [(c.status, c.stdout) for c in checks] == [(Status.OK, b"0 42\n")] * 4, checks


async def test_kill_everything_kills_only_the_program(pool: SandboxPool) -> None:
    """`kill -9 -1` reaches the program's own processes only: the shell itself survives, and the
    sandbox goes on serving (no replacement, no sandbox error)."""
    before = pool.stats()
    result = await pool.run(ExecRequest(command=["sh", "-c", "sleep 30 & kill -9 -1; echo survived"]))
    assert (result.status, result.stdout) == (Status.OK, b"survived\n"), result
    assert await probe(pool) == CLEAN_VIEW
    after = pool.stats()
    assert (after.sandbox_errors, after.replaced) == (before.sandbox_errors, before.replaced)


# ----------------------------------------------------------------------------------------- hangs
async def test_a_fifo_left_by_a_program_never_hangs_a_file_transfer(pool: SandboxPool) -> None:
    async with pool.session() as box:
        made = await box.exec(ExecRequest(command=["sh", "-c", "mkfifo pipe && mkdir -p d && mkfifo d/p2"]))
        assert made.status is Status.OK, made
        for path in ("pipe", "d/p2"):
            with pytest.raises(ValueError):
                await asyncio.wait_for(box.put_files({path: b"data"}), 20)
        assert await asyncio.wait_for(box.get_files(["pipe", "d/p2"]), 20) == {}
        again = await box.exec(ExecRequest(command=["python3", "-c", "print('alive')"]))
        assert again.stdout == b"alive\n"


# ----------------------------------------------------------------------- faults of the sandbox itself
def _host_processes(box: object) -> list[tuple[int, bytes]]:
    """(host pid, command line) of every process of one sandbox, seen from the host."""
    if hasattr(box, "container_id"):
        mark = box.container_id.encode()
        inside = lambda pid: mark in open(f"/proc/{pid}/cgroup", "rb").read()  # noqa: E731
    else:
        pids = {int(p) for p in (box.cgroup.memory_dir / "cgroup.procs").read_text().split()}
        inside = pids.__contains__  # noqa: E731
    found = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and inside(int(name)):
                found.append((int(name), open(f"/proc/{name}/cmdline", "rb").read()))
        except OSError:
            continue
    return found


def _zygote(box: object) -> int:
    return next(pid for pid, cmd in _host_processes(box) if b"\0zygote\0" in cmd)


def _agent(box: object) -> int:
    """The agent is the zygote's parent (seen from the host)."""
    stat = open(f"/proc/{_zygote(box)}/stat").read()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _freeze(box: object) -> None:
    """Stops every process of the sandbox from the host (a hung agent, for real)."""
    if hasattr(box, "container_id"):
        docker.from_env().api.pause(box.container_id)
        return
    for pid, _ in _host_processes(box):
        os.kill(pid, signal.SIGSTOP)


def _only_box(pool: SandboxPool) -> object:
    (box,) = pool._live
    return box


@pytest.fixture(params=["docker", "local"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


FAST = ExecRequest(command=["python3", "-c", "print(6 * 7)"], timeout_s=10)


async def test_a_hung_agent_never_hangs_the_host(backend: str) -> None:
    """File transfers and the reset have host deadlines: a stopped agent costs one session, and
    the pool replaces its sandbox."""
    limits = TEST_LIMITS.model_copy(update={"call_deadline_s": 2.0})
    async with SandboxPool(backend=backend, size=1, limits=limits, acquire_timeout_s=60) as pool:
        async with pool.session() as box:
            assert (await box.exec(FAST)).stdout == b"42\n"
            _freeze(_only_box(pool))
            started = time.monotonic()
            with pytest.raises(SandboxError):
                await box.put_files({"a.txt": b"x" * 1000})
            with pytest.raises(SandboxError):
                await box.get_files(["a.txt"])
            assert time.monotonic() - started < 10
        after = await asyncio.wait_for(pool.run(FAST), 60)
        assert (after.status, after.stdout) == (Status.OK, b"42\n") and pool.stats().replaced >= 1


async def test_a_cancelled_session_end_never_loses_the_sandbox(backend: str) -> None:
    """Cancelled while its sandbox is being reset, a session still hands the sandbox back (to be
    replaced): a pool of one keeps serving."""
    limits = TEST_LIMITS.model_copy(update={"call_deadline_s": 30.0})
    async with SandboxPool(backend=backend, size=1, limits=limits, acquire_timeout_s=30) as pool:
        entered = asyncio.Event()

        async def hold() -> None:
            async with pool.session() as box:
                await box.exec(FAST)
                _freeze(_only_box(pool))  # the reset at the end of the block now hangs
                entered.set()

        task = asyncio.ensure_future(hold())
        await entered.wait()
        await asyncio.sleep(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        after = await pool.run(FAST)
        assert (after.status, after.stdout) == (Status.OK, b"42\n"), after


async def test_a_launcher_killed_between_runs_is_noticed(backend: str) -> None:
    """The zygote dies between two tasks (killed from the host): the next run is moved to a
    fresh sandbox, instead of every later run failing as the program's fault."""
    async with SandboxPool(backend=backend, size=1, limits=TEST_LIMITS) as pool:
        assert (await pool.run(FAST)).status is Status.OK
        os.kill(_zygote(_only_box(pool)), signal.SIGKILL)
        await asyncio.sleep(0.3)
        results = [await pool.run(FAST) for _ in range(3)]
        assert [(r.status, r.stdout) for r in results] == [(Status.OK, b"42\n")] * 3, results
        assert pool.stats().sandbox_errors == 0 and pool.stats().replaced == 1


async def test_a_launcher_that_dies_mid_run_is_a_sandbox_error(backend: str) -> None:
    """Programs cannot reach the launcher, so its death during a run is the sandbox's fault: no
    reward for that run (never a zero), and the sandbox is replaced."""
    async with SandboxPool(backend=backend, size=1, limits=TEST_LIMITS) as pool:
        run = asyncio.ensure_future(pool.run(ExecRequest(command=["sleep", "20"], timeout_s=30)))
        await asyncio.sleep(1.0)
        os.kill(_zygote(_only_box(pool)), signal.SIGKILL)
        result = await asyncio.wait_for(run, 15)
        assert result.status is Status.SANDBOX_ERROR, result
        assert (await pool.run(FAST)).stdout == b"42\n" and pool.stats().replaced == 1


async def test_an_agent_killed_from_outside_mid_run_is_a_sandbox_error(backend: str) -> None:
    """The agent dies mid-run by no act of the program (programs run under a uid of their own and
    cannot signal it; here the host kills it, as a daemon or a stream fault would lose it): no
    reward for that run, never a zero charged to the program; the sandbox is replaced."""
    slow = ExecRequest(command=["python3", "-c", "import time; time.sleep(2); print(42)"], timeout_s=30)
    async with SandboxPool(backend=backend, size=1, limits=TEST_LIMITS) as pool:
        assert (await pool.run(FAST)).status is Status.OK
        run = asyncio.ensure_future(pool.run(slow))
        await asyncio.sleep(1.0)
        os.kill(_agent(_only_box(pool)), signal.SIGKILL)
        result = await asyncio.wait_for(run, 30)
        assert (result.status, result.broke_sandbox) == (Status.SANDBOX_ERROR, False), result
        assert (await pool.run(FAST)).stdout == b"42\n" and pool.stats().replaced == 1


async def test_memory_exhaustion_that_takes_the_agent_is_the_programs(backend: str) -> None:
    """A program can get the agent killed without signalling it: it takes back the OOM preference
    the launcher gave it (oom_score_adj 1000 -> 0) and runs the sandbox out of memory with
    processes smaller than the agent (here the host makes the agent the certain pick). The kill
    count shows it: the program's fault, a RUNTIME_ERROR that broke the sandbox, never a dropped
    sample nor a retry."""
    hog = ExecRequest(
        command=[
            "python3",
            "-c",
            "open('/proc/self/oom_score_adj', 'w').write('0')\nx = []\nwhile True: x.append(bytearray(1 << 20))",
        ],
        timeout_s=30,
        memory_mb=128,
    )
    async with SandboxPool(backend=backend, size=1, limits=TEST_LIMITS) as pool:
        assert (await pool.run(FAST)).status is Status.OK
        Path(f"/proc/{_agent(_only_box(pool))}/oom_score_adj").write_text("1000")
        result = await asyncio.wait_for(pool.run(hog), 60)
        assert (result.status, result.broke_sandbox) == (Status.RUNTIME_ERROR, True), result
        assert pool.stats().sandbox_errors == 0


async def test_sandboxes_are_recycled_after_a_number_of_tasks(backend: str) -> None:
    limits = TEST_LIMITS.model_copy(update={"recycle_after": 3})
    async with SandboxPool(backend=backend, size=1, limits=limits) as pool:
        first = _only_box(pool)
        for _ in range(3):
            assert (await pool.run(FAST)).status is Status.OK
        async with pool.session() as box:
            assert (await box.exec(FAST)).status is Status.OK
        assert first not in pool._live and pool.stats().replaced >= 1
        assert (await pool.run(FAST)).stdout == b"42\n"


# ------------------------------------------------------------------- the three attacks, 500 times
_COMBINED = (
    _PLANT.replace("PAYLOAD", repr(_PAYLOAD))
    + """
plant('/work', ['json.py', 'runpy.py', 'types.py', 'tarfile.py'])
plant('/work/ctypes', ['__init__.py'])
"""
    + _LAUNCHER
    + """
import ctypes, resource, threading, time
for pid in (zygote, agent):
    for attack in (lambda: resource.prlimit(pid, resource.RLIMIT_NOFILE, (4, 4)),
                   lambda: os.setpriority(os.PRIO_PROCESS, pid, 19),
                   lambda: os.kill(zygote, signal.SIGKILL)):
        try:
            attack()
        except OSError:
            pass
def plant_forever():
    while True:
        for d in ("/work", "/tmp"):
            try:
                open(d + "/survivor", "w").write("x")
            except OSError:
                pass
        time.sleep(0.002)
if os.fork() == 0:
    os.setsid()
    threading.Thread(target=plant_forever).start()
    time.sleep(0.005)
    ctypes.CDLL(None).syscall(SYS_EXIT, 0)
time.sleep(0.01)
print("attacked")
""".replace("SYS_EXIT", str(SYS_EXIT))
)
_AFTER = PROBE.replace(
    'print(json.dumps({"procs": procs, "files": files, "ipc": ipc}))',
    'import builtins\nprint(json.dumps({"procs": procs, "files": files, "ipc": ipc, '
    '"poisoned": getattr(builtins, "CODEWORLD_POISONED", False)}))',
)


async def test_500_attacks_leave_no_survivor_and_no_poisoned_run(backend: str) -> None:
    """A survivor, a poisoned module and limits on the launcher, 500 times against a pool of one:
    the task after each sees no process and no file of it, and runs from an unpoisoned launcher."""
    survivors = poisoned = 0
    async with SandboxPool(backend=backend, size=1, limits=TEST_LIMITS) as pool:
        for _ in range(500):
            attack = await pool.run(ExecRequest(command=["python3", "-c", _COMBINED], timeout_s=10))
            assert attack.status is Status.OK and attack.stdout == b"attacked\n", attack
            after = await pool.run(ExecRequest(command=["python3", "-c", _AFTER], timeout_s=10))
            view = json.loads(after.stdout) if after.status is Status.OK else None
            assert view is not None, after
            poisoned += view["poisoned"]
            survivors += view is not None and (view["procs"] != [] or any(view["files"].values()))
        stats = pool.stats()
    print(
        f"\n500 attacks on {backend}: {survivors} surviving, {poisoned} poisoned; "
        f"{stats.replaced} sandboxes replaced, {stats.sandbox_errors} sandbox errors"
    )
    assert (survivors, poisoned, stats.sandbox_errors) == (0, 0, 0)


# ------------------------------------------------------------------- an unprivileged user's sandbox
_UNPRIVILEGED = """
import asyncio, json, sys
from workers.sandbox import ExecRequest, SandboxLimits, SandboxPool
BOMB = '''
import os, time
n = 0
try:
    while n < 500:
        if os.fork() == 0:
            time.sleep(5)
            os._exit(0)
        n += 1
except OSError:
    pass
print(n)
'''
async def main():
    limits = SandboxLimits(pids=32)
    async with SandboxPool(backend="local", size=1, limits=limits) as pool:
        out = {}
        bomb = await pool.run(ExecRequest(command=["python3", "-c", BOMB], timeout_s=20))
        out["forks"] = int(bomb.stdout or -1)
        out["isolation"] = bomb.isolation.value
        tamper = await pool.run(ExecRequest(command=["python3", "-c", TAMPER], timeout_s=10))
        out["tamper"] = [tamper.status.value, tamper.stdout.decode()]
        survivor = await pool.run(ExecRequest(command=["python3", "-c", SURVIVOR], timeout_s=10))
        out["survivor"] = survivor.stdout.decode()
        await asyncio.sleep(1.5)
        after = [await pool.run(ExecRequest(command=["python3", "-c", PROBE])) for _ in range(3)]
        out["after"] = [json.loads(r.stdout) for r in after]
        out["replaced"] = pool.stats().replaced
    print(json.dumps(out))
asyncio.run(main())
"""


async def test_an_unprivileged_users_bubblewrap_caps_processes_and_replaces_a_tampered_launcher() -> None:
    """Run by a user without root, the local backend shares one uid between the launcher and the
    programs inside a user namespace: RLIMIT_NPROC (counted per user namespace) caps a fork bomb,
    a capped launcher makes the sandbox be replaced, and a zombie-leader survivor is killed."""
    # The checkout (and pytest's tmp_path) may sit where an unprivileged user cannot read them:
    # copy what the pool needs into a folder anyone can read.
    with tempfile.TemporaryDirectory(prefix="codeworld-unprivileged-") as tmp:
        out = await asyncio.to_thread(_run_unprivileged, Path(tmp))
    assert out["isolation"] == "bwrap+rlimit"
    assert 0 < out["forks"] < 32, out  # the agent, the zygote and its spare count too
    assert out["tamper"][0] in ("ok", "runtime_error") and "zygote:nofile:CHANGED" in out["tamper"][1], out
    assert out["survivor"] == "done\n" and out["replaced"] >= 1, out
    assert all(view == CLEAN_VIEW for view in out["after"]), out


def _run_unprivileged(tmp_path: Path) -> dict:
    import shutil
    import subprocess

    import annotated_types
    import pydantic
    import pydantic_core
    import typing_extensions
    import typing_inspection

    import workers

    site = tmp_path / "site"
    for module in (workers, pydantic, pydantic_core, annotated_types, typing_inspection):
        shutil.copytree(
            os.path.dirname(module.__file__), site / module.__name__, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(typing_extensions.__file__, site)
    tamper = _TAMPER.replace("ATTEMPTS", TAMPERING["open_files"])
    survivor = SURVIVORS["forked_zombie_leader"].replace("DELAY", "1.0").replace("SYS_EXIT", str(SYS_EXIT))
    script = (
        _UNPRIVILEGED.replace("TAMPER", repr(tamper)).replace("SURVIVOR", repr(survivor)).replace("PROBE", repr(PROBE))
    )
    (tmp_path / "main.py").write_text(script)
    os.chmod(tmp_path, 0o755)
    for path in tmp_path.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    python = shutil.which("python3", path="/usr/bin:/bin")  # a system interpreter anyone can run
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, str(tmp_path / "main.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(site)},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])
