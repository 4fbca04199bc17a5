"""One task's repository inside one sandbox session, and what the agent and the grader do to it.

Everything goes through `box.exec` with the image's own `bash`, `tar` and `python3` (the helper
script `box_helper.py` is passed as `python3 -c`), so the repository may live in the sandbox work
dir (tasks with a `source`) or anywhere in the image (SWE-bench's /testbed). The sandbox kills
every process after each call, so the "persistent" shell keeps its state in files: the working
directory and the exported environment are saved after each command and restored before the next.
"""

from __future__ import annotations

import base64
import json
import posixpath
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from envs.swe.build.pypi import read_tree, tree_tarball
from envs.swe.diffs import apply_diff, touched_paths, tree_diff
from envs.swe.task import SWEBENCH_SHELL_INIT, SourceSpec, SWETask
from workers.sandbox import ExecRequest, ExecResult, Status

REPO_DIR = "repo"
"""Where a task with a `source` is unpacked, relative to the sandbox work dir."""
DEPS_DIR = ".swe_deps"
STATE_DIR = ".swe_state"
_HELPER = (Path(__file__).parent / "box_helper.py").read_text()
_IO_OUTPUT_BYTES = 256 << 20
_EXIT_MARK = "__codeworld_exit__"

# The shell: restore cwd and exports, run the command (its output to a file, so that a flood of
# output neither kills the run nor is lost), then save the state and print the output's head.
# Its own variables have odd names so that the command's variables cannot clobber them.
_SHELL = r"""
__cw_s="$1"; __cw_limit="$2"; shift 2
cd "$(cat "$__cw_s/cwd")" 2>/dev/null || cd /
. "$__cw_s/env"
trap '__cw_rc=$?; pwd > "$__cw_s/cwd"; export -p > "$__cw_s/env"; head -c "$__cw_limit" "$__cw_s/out";
      echo; echo "__codeworld_exit__ $__cw_rc $(stat -c %s "$__cw_s/out")"' EXIT
ulimit -f 262144
. "$__cw_s/cmd.sh" > "$__cw_s/out" 2>&1 < /dev/null
"""


def base_tree(source: SourceSpec) -> dict[str, bytes]:
    """A task's base files: the tarball's tree with the host-side setup patch applied."""
    tree = read_tree(Path(source.tarball), source.prefix)
    reads, _ = touched_paths(source.setup_patch)
    for path, data in apply_diff({p: tree[p] for p in reads if p in tree}, source.setup_patch).items():
        if data is None:
            tree.pop(path, None)
        else:
            tree[path] = data
    return tree


class SandboxSession(Protocol):
    """What the workspace needs of a `workers.sandbox` session."""

    async def exec(self, request: ExecRequest) -> ExecResult: ...


class SandboxFailure(RuntimeError):
    """The sandbox could not do its part (SANDBOX_ERROR or a broken helper): no reward is given."""


@dataclass(frozen=True)
class ShellOutput:
    """What one shell command printed, and how it ended."""

    text: str
    """Its output (stdout and stderr interleaved), cut to the call's byte limit."""
    exit_code: int | None
    """Its exit status; None when unknown (timed out, or its state was not saved)."""
    timed_out: bool
    """Whether the sandbox killed it at the time limit."""
    total_bytes: int
    """How many bytes of output it wrote in all."""


class Workspace:
    """The repository of `task` in `box`: prepare it, run shell commands, read and write files,
    apply diffs, diff against the start, run the tests."""

    def __init__(self, box: SandboxSession, task: SWETask, memory_mb: int = 2048) -> None:
        self.box, self.task, self.memory_mb = box, task, memory_mb
        self.root = ""
        self.repo = task.image_workdir if task.image_resident() else REPO_DIR
        self.sandbox_s = 0.0
        """Seconds spent waiting on the sandbox (for the benchmark's share of wall time)."""

    async def _exec(self, command: list[str], stdin: bytes = b"", timeout_s: float = 120.0,
                    env: dict[str, str] | None = None, files: dict[str, bytes] | None = None) -> ExecResult:
        request = ExecRequest(command=command, stdin=stdin, timeout_s=timeout_s, memory_mb=self.memory_mb,
                              max_output_bytes=_IO_OUTPUT_BYTES, env=env or {}, files=files or {},
                              fast_path=False)
        start = time.perf_counter()
        try:
            result = await self.box.exec(request)
        finally:
            self.sandbox_s += time.perf_counter() - start
        if result.status == Status.SANDBOX_ERROR:
            raise SandboxFailure(f"sandbox error: {result.error}")
        return result

    async def _checked(self, command: list[str], what: str, **kw: Any) -> bytes:
        result = await self._exec(command, **kw)
        if result.status != Status.OK or result.exit_code != 0:
            tail = (result.stderr or result.stdout).decode(errors="replace")[-500:]
            raise SandboxFailure(f"{what} failed ({result.status.value}, exit {result.exit_code}): {tail}")
        return result.stdout

    async def _helper(self, *args: str, stdin: bytes = b"", timeout_s: float = 120.0) -> bytes:
        return await self._checked(["python3", "-c", _HELPER, *args], f"helper {args[0]}",
                                   stdin=stdin, timeout_s=timeout_s)

    def _abs(self, rel: str) -> str:
        return rel if rel.startswith("/") else f"{self.root}/{rel}"

    async def prepare(self) -> None:
        """Put the base repository (and its dependencies) in place and set up the shell state."""
        self.root = (await self._checked(["pwd"], "pwd")).decode().strip()
        path = [f"{self._abs(STATE_DIR)}/bin"]
        if self.task.source is not None:
            await self._unpack(base_tree(self.task.source), REPO_DIR)
            if self.task.source.deps:
                await self._unpack(read_tree(Path(self.task.source.deps)), DEPS_DIR)
                path.append(f"{self._abs(DEPS_DIR)}/bin")
        init = self.task.shell_init
        if init is None:
            init = SWEBENCH_SHELL_INIT if self.task.image_resident() else ""
        exports = [f"export PATH={shlex.quote(':'.join(path))}:\"$PATH\""]
        pythonpath = self._pythonpath()
        if pythonpath:
            exports.append(f"export PYTHONPATH={shlex.quote(':'.join(pythonpath))}")
        state = self._abs(STATE_DIR)
        setup = (f"mkdir -p {state}/bin && ln -sf \"$(command -v python3)\" {state}/bin/python && "
                 f"echo {shlex.quote(self._abs(self.repo))} > {state}/cwd && : > {state}/env")
        await self._checked(["bash", "-c", setup], "shell setup")
        await self.shell("\n".join([*exports, init]), timeout_s=120.0)

    def _pythonpath(self) -> list[str]:
        source = self.task.source
        if source is None:
            return []
        repo = self._abs(REPO_DIR)
        found = [posixpath.normpath(f"{repo}/{p}") for p in source.pythonpath]
        return found + ([self._abs(DEPS_DIR)] if source.deps else [])

    async def _unpack(self, tree: dict[str, bytes], dest: str) -> None:
        await self._checked(["bash", "-c", f"mkdir -p {dest} && tar -xzf - -C {dest}"], f"unpack into {dest}",
                            stdin=tree_tarball(tree), timeout_s=300.0)

    async def snapshot(self) -> None:
        """Remember the repository as it is now; `diff()` compares against this."""
        await self._helper("snapshot", self._abs(self.repo), self._abs(f"{STATE_DIR}/base"), timeout_s=600.0)

    async def diff(self) -> tuple[str, list[str]]:
        """The diff from the snapshot to now, and the changed files it leaves out (binary/huge)."""
        out = json.loads(await self._helper("changed", self._abs(self.repo), self._abs(f"{STATE_DIR}/base")))
        old = {p: base64.b64decode(v[0]) for p, v in out["files"].items() if v[0] is not None}
        new = {p: base64.b64decode(v[1]) for p, v in out["files"].items() if v[1] is not None}
        return tree_diff(old, new), out["skipped"]

    async def read_files(self, paths: list[str]) -> dict[str, bytes | None]:
        """Contents of `paths` (relative to the repository, or absolute); None = no such file."""
        out = json.loads(await self._helper("read", self._abs(self.repo), *paths))
        return {p: None if v is None else base64.b64decode(v) for p, v in out.items()}

    async def write_files(self, files: dict[str, bytes | None]) -> None:
        """Write (None = delete) files, paths relative to the repository or absolute."""
        payload = {p: None if d is None else base64.b64encode(d).decode() for p, d in files.items()}
        await self._helper("write", self._abs(self.repo), stdin=json.dumps(payload).encode())

    async def apply(self, diff: str) -> None:
        """Apply `diff` to the repository (with `git apply` on the host). Raises PatchError."""
        if not diff.strip():
            return
        reads, _ = touched_paths(diff)
        current = await self.read_files(reads)
        base = {p: d for p, d in current.items() if d is not None}
        await self.write_files(apply_diff(base, diff))

    async def shell(self, command: str, timeout_s: float, limit_bytes: int = 1 << 20) -> ShellOutput:
        """Run `command` in the persistent shell; its output (stdout and stderr interleaved) is
        cut to `limit_bytes`."""
        state = self._abs(STATE_DIR)
        result = await self._exec(["bash", "-c", _SHELL, "shell", state, str(limit_bytes)],
                                  files={f"{STATE_DIR}/cmd.sh": command.encode()}, timeout_s=timeout_s)
        text = result.stdout.decode(errors="replace")
        head, _, mark = text.rpartition(f"\n{_EXIT_MARK} ")
        if result.status == Status.TIMEOUT or not mark:
            partial = await self._exec(["head", "-c", str(limit_bytes), f"{state}/out"])
            return ShellOutput(partial.stdout.decode(errors="replace"), None,
                               result.status == Status.TIMEOUT, len(partial.stdout))
        code, size = mark.split()[:2]
        return ShellOutput(head, int(code), False, int(size))

    async def run_tests(self, timeout_s: float) -> ExecResult:
        """Run the task's test command in the repository (a plain shell, not the agent's)."""
        state = self._abs(STATE_DIR)
        script = f". {state}/env && cd {shlex.quote(self._abs(self.repo))} && {self.task.resolved_test_cmd()}"
        return await self._exec(["bash", "-c", script + " 2>&1"], timeout_s=timeout_s)
