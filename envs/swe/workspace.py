"""One task's repository inside one sandbox session, and what the agent and the grader do to it.

Everything goes through `box.exec` with the image's own `bash`, `tar` and `python3` (the helper
script `box_helper.py` is passed as `python3 -c`), so the repository may live in the sandbox work
dir (tasks with a `source`) or anywhere in the image (SWE-bench's /testbed). The sandbox kills
every process after each call, so the "persistent" shell keeps its state in files: the working
directory and the exported environment are saved after each command and restored before the next.

Nothing that comes back from the sandbox is trusted: the helper runs isolated (`python3 -I`), its
JSON reports and the shell's exit marker are validated, and a failure is blamed in one place
(`blame`): on the policy once it has acted on the sandbox (the episode scores 0), on the
infrastructure before that or when the sandbox layer says so (no reward).
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, RootModel, ValidationError

from envs.swe.build.pypi import read_tree, tree_tarball
from envs.swe.diffs import PatchError, apply_diff, safe_diff_path, touched_paths, tree_diff
from envs.swe.task import SWEBENCH_SHELL_INIT, SourceSpec, SWETask
from workers.sandbox import ExecRequest, ExecResult, SandboxError, Status

REPO_DIR = "repo"
"""Where a task with a `source` is unpacked, relative to the sandbox work dir."""
DEPS_DIR = ".swe_deps"
STATE_DIR = ".swe_state"
_HELPER = (Path(__file__).parent / "box_helper.py").read_text()
_IO_OUTPUT_BYTES = 256 << 20
# The trap's last line. Validated whole: a command that replaces the trap can print anything.
_EXIT_LINE = re.compile(r"\n__codeworld_exit__ ([0-9]{1,3}) ([0-9]{1,19})\n?\Z")
# Prints the interpreter's absolute path and every top-level name importable in the test
# environment: on sys.path without the working folder (the tests run that way), the repository's
# root and src/ (an editable install may import them through a finder, not sys.path), builtins
# and the standard library. Written for every Python 3 a SWE-bench image may hold.
_PROBE = r"""
import sys
del sys.path[0]
import importlib.machinery, json, os, pkgutil
names = set(sys.builtin_module_names) | set(getattr(sys, "stdlib_module_names", ()))
names |= set(m[1] for m in pkgutil.iter_modules())
suffixes = tuple(importlib.machinery.all_suffixes())
for entry in sys.path + [os.getcwd(), os.path.join(os.getcwd(), "src")]:
    try:
        children = os.listdir(entry or ".")
    except OSError:
        continue
    for child in children:
        stem = child.split(".", 1)[0]
        if child.endswith(suffixes) or (stem == child and os.path.isdir(os.path.join(entry, child))):
            names.add(stem)
print(json.dumps({"python": sys.executable, "importable": sorted(n for n in names if n.isidentifier())}))
"""

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


class PolicyFault(RuntimeError):
    """The policy broke its sandbox or its repository (it killed the sandbox's agent, or left a
    tree the helper cannot work in): the episode scores 0, it is never dropped."""


def blame(result: ExecResult, policy_acted: bool) -> Literal["policy", "infrastructure"]:
    """Who a failed sandbox call is on. The one place this is decided:

    * the sandbox layer reports that the program broke the sandbox (`broke_sandbox`): the policy;
    * SANDBOX_ERROR otherwise: the infrastructure (the sandbox layer blames programs as above);
    * any other failure of our own calls (a helper that exits non-zero, times out, runs out of
      memory or output, or prints something that is not its report): the policy once it has
      acted on this sandbox's files (the tree is then its doing), the infrastructure before."""
    if result.broke_sandbox:
        return "policy"
    if result.status == Status.SANDBOX_ERROR:
        return "infrastructure"
    return "policy" if policy_acted else "infrastructure"


class RunEnvironment(BaseModel):
    """What the test run will import from and run with, read before a model's diff is applied."""

    model_config = ConfigDict(extra="forbid", strict=True)

    python: str
    """Absolute path of the interpreter the tests run with."""
    importable: list[str]
    """Top-level module names importable in the test environment (standard, installed, the
    repository's own): a file a diff adds must not shadow them."""


class _Changed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    files: dict[str, tuple[str | None, str | None]]
    """Changed file -> (old, new) content in base64 (None: absent on that side)."""
    skipped: list[str]
    """Changed files left out of the diff (binary, huge, unreadable)."""


class _ReadReport(RootModel[dict[str, str | None]]):
    """Path -> content in base64 (None: no such readable file)."""

    model_config = ConfigDict(strict=True)


class _Written(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    errors: dict[str, str]
    """Path -> why it could not be written."""


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
        self.policy_acted = False
        """Set once the policy has changed anything in this sandbox (see `blame`)."""
        self._test_env: RunEnvironment | None = None

    async def _exec(
        self,
        command: list[str],
        stdin: bytes = b"",
        timeout_s: float = 120.0,
        env: dict[str, str] | None = None,
        files: dict[str, bytes] | None = None,
    ) -> ExecResult:
        request = ExecRequest(
            command=command,
            stdin=stdin,
            timeout_s=timeout_s,
            memory_mb=self.memory_mb,
            max_output_bytes=_IO_OUTPUT_BYTES,
            env=env or {},
            files=files or {},
            fast_path=False,
        )
        start = time.perf_counter()
        try:
            result = await self.box.exec(request)
        except SandboxError as err:  # the session is unusable: by an earlier program, or by itself
            if err.by_program:
                raise PolicyFault(f"the policy broke its sandbox: {err}"[:800]) from err
            raise SandboxFailure(str(err)[:800]) from err
        finally:
            self.sandbox_s += time.perf_counter() - start
        if result.status == Status.SANDBOX_ERROR or blame(result, False) == "policy":
            raise self._fault(result, f"sandbox error: {result.error}")
        return result

    def _fault(self, result: ExecResult, why: str) -> Exception:
        """The exception for a failed call: PolicyFault or SandboxFailure, as `blame` says."""
        if blame(result, self.policy_acted) == "policy":
            return PolicyFault(f"the policy broke its sandbox: {why}"[:800])
        return SandboxFailure(why[:800])

    async def _checked(self, command: list[str], what: str, **kw: Any) -> bytes:
        result = await self._exec(command, **kw)
        if result.status != Status.OK or result.exit_code != 0:
            tail = (result.stderr or result.stdout).decode(errors="replace")[-500:]
            why = f"{what} failed ({result.status.value}, exit {result.exit_code}): {tail}"
            raise self._fault(result, why)
        return result.stdout

    async def _helper(self, *args: str, stdin: bytes = b"", timeout_s: float = 120.0) -> bytes:
        return await self._checked(
            ["python3", "-I", "-c", _HELPER, *args], f"helper {args[0]}", stdin=stdin, timeout_s=timeout_s
        )

    async def _report(self, model: type[BaseModel], *args: str, **kw: Any) -> Any:
        """The helper's JSON report, validated: a report that does not parse is a failed call."""
        out = await self._helper(*args, **kw)
        try:
            return model.model_validate_json(out)
        except ValidationError as exc:
            ok = ExecResult(status=Status.OK, exit_code=0)
            raise self._fault(
                ok, f"helper {args[0]} printed something that is not its report ({exc.errors()[0]['msg']})"
            ) from None

    def _abs(self, rel: str) -> str:
        return rel if rel.startswith("/") else f"{self.root}/{rel}"

    async def prepare(self) -> None:
        """Put the base repository (and its dependencies) in place and set up the shell state."""
        self.root = (await self._checked(["pwd"], "pwd")).decode().strip()
        path = [f"{self._abs(STATE_DIR)}/bin"]
        if self.task.image_resident() and self.task.setup_patch:
            await self.apply(self.task.setup_patch)  # e.g. a SWE-smith task's bug
        if self.task.source is not None:
            await self._unpack(base_tree(self.task.source), REPO_DIR)
            if self.task.source.deps:
                await self._unpack(read_tree(Path(self.task.source.deps)), DEPS_DIR)
                path.append(f"{self._abs(DEPS_DIR)}/bin")
        init = self.task.shell_init
        if init is None:
            init = SWEBENCH_SHELL_INIT if self.task.image_resident() else ""
        exports = [f'export PATH={shlex.quote(":".join(path))}:"$PATH"']
        pythonpath = self._pythonpath()
        if pythonpath:
            exports.append(f"export PYTHONPATH={shlex.quote(':'.join(pythonpath))}")
        state = self._abs(STATE_DIR)
        setup = (
            f'mkdir -p {state}/bin && ln -sf "$(command -v python3)" {state}/bin/python && '
            f"echo {shlex.quote(self._abs(self.repo))} > {state}/cwd && : > {state}/env"
        )
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
        await self._checked(
            ["bash", "-c", f"mkdir -p {dest} && tar -xzf - -C {dest}"],
            f"unpack into {dest}",
            stdin=tree_tarball(tree),
            timeout_s=300.0,
        )

    async def snapshot(self) -> None:
        """Remember the repository as it is now; `diff()` compares against this."""
        await self._helper("snapshot", self._abs(self.repo), self._abs(f"{STATE_DIR}/base"), timeout_s=600.0)

    async def diff(self) -> tuple[str, list[str]]:
        """The diff from the snapshot to now, and the changed files it leaves out (binary, huge,
        unreadable, or named so that a diff cannot carry them plainly)."""
        out = await self._report(_Changed, "changed", self._abs(self.repo), self._abs(f"{STATE_DIR}/base"))
        skipped = list(out.skipped) + [p for p in out.files if not safe_diff_path(p)]
        kept = {p: v for p, v in out.files.items() if p not in skipped}
        old = {p: self._b64(v[0]) for p, v in kept.items() if v[0] is not None}
        new = {p: self._b64(v[1]) for p, v in kept.items() if v[1] is not None}
        return tree_diff(old, new), skipped

    def _b64(self, text: str) -> bytes:
        try:
            return base64.b64decode(text, validate=True)
        except binascii.Error:
            ok = ExecResult(status=Status.OK, exit_code=0)
            raise self._fault(ok, "the helper's report holds bad base64") from None

    async def read_files(self, paths: list[str]) -> dict[str, bytes | None]:
        """Contents of `paths` (relative to the repository, or absolute); None = no such file."""
        if not paths:
            return {}
        out = await self._report(_ReadReport, "read", self._abs(self.repo), *paths)
        if set(out.root) != set(paths):
            raise self._fault(ExecResult(status=Status.OK, exit_code=0), "the helper read other paths")
        return {p: None if v is None else self._b64(v) for p, v in out.root.items()}

    async def write_files(self, files: dict[str, bytes | None]) -> dict[str, str]:
        """Write (None = delete) files, paths relative to the repository or absolute. Returns,
        for the paths that could not be written (a folder in the way, a symbolic link), why."""
        payload = {p: None if d is None else base64.b64encode(d).decode() for p, d in files.items()}
        out = await self._report(_Written, "write", self._abs(self.repo), stdin=json.dumps(payload).encode())
        return dict(out.errors)

    async def apply(self, diff: str) -> None:
        """Apply `diff` to the repository (with `git apply` on the host). Raises PatchError, also
        when a file it changes cannot be written."""
        if not diff.strip():
            return
        reads, _ = touched_paths(diff)
        current = await self.read_files(reads)
        base = {p: d for p, d in current.items() if d is not None}
        errors = await self.write_files(apply_diff(base, diff))
        if errors:
            path, why = next(iter(errors.items()))
            raise PatchError(f"The diff cannot be written: {path}: {why}.")

    async def check_applies(self, diff: str) -> None:
        """PatchError unless `diff` applies to the repository as it is now (nothing is written)."""
        if not diff.strip():
            return
        reads, _ = touched_paths(diff)
        current = await self.read_files(reads)
        apply_diff({p: d for p, d in current.items() if d is not None}, diff)

    async def run_script(self, script: str, timeout_s: float) -> ExecResult:
        """Run a bash script (an evaluation script) in a plain shell from the sandbox's root, its
        stderr merged into its stdout as the official harness reads them."""
        name = f"{STATE_DIR}/eval.sh"
        return await self._exec(
            ["bash", "-c", f"bash {shlex.quote(self._abs(name))} 2>&1"],
            files={name: script.encode()},
            timeout_s=timeout_s,
        )

    async def shell(self, command: str, timeout_s: float, limit_bytes: int = 1 << 20) -> ShellOutput:
        """Run `command` in the persistent shell; its output (stdout and stderr interleaved) is
        cut to `limit_bytes`."""
        state = self._abs(STATE_DIR)
        result = await self._exec(
            ["bash", "-c", _SHELL, "shell", state, str(limit_bytes)],
            files={f"{STATE_DIR}/cmd.sh": command.encode()},
            timeout_s=timeout_s,
        )
        text = result.stdout.decode(errors="replace")
        mark = _EXIT_LINE.search(text)
        if result.status == Status.TIMEOUT or mark is None:
            partial = await self._exec(["head", "-c", str(limit_bytes), f"{state}/out"])
            return ShellOutput(
                partial.stdout.decode(errors="replace"), None, result.status == Status.TIMEOUT, len(partial.stdout)
            )
        return ShellOutput(text[: mark.start()], int(mark.group(1)), False, int(mark.group(2)))

    async def test_environment(self) -> RunEnvironment:
        """The interpreter and the importable module names of the test environment, read once
        (before a model's diff is applied, when grading)."""
        if self._test_env is None:
            state = self._abs(STATE_DIR)
            repo = shlex.quote(self._abs(self.repo))
            script = f". {state}/env && cd {repo} && python -c {shlex.quote(_PROBE)}"
            out = await self._checked(["bash", "-c", script], "test environment probe")
            last = out.strip().splitlines()[-1:] or [b""]
            try:
                self._test_env = RunEnvironment.model_validate_json(last[0])
            except ValidationError:
                raise self._fault(
                    ExecResult(status=Status.OK, exit_code=0), "the test environment probe printed something else"
                ) from None
            if not self._test_env.python.startswith("/"):
                raise SandboxFailure(f"the test interpreter {self._test_env.python!r} has no absolute path")
        return self._test_env

    async def run_tests(self, timeout_s: float) -> ExecResult:
        """Run the task's test command in the repository (a plain shell, not the agent's): the
        interpreter by its absolute path, pytest's plugin autoloading off (an entry point a diff
        planted would be a plugin)."""
        python = (await self.test_environment()).python
        state = self._abs(STATE_DIR)
        script = (
            f". {state}/env && cd {shlex.quote(self._abs(self.repo))} "
            f"&& export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 && {self.task.resolved_test_cmd(python)}"
        )
        return await self._exec(["bash", "-c", script + " 2>&1"], timeout_s=timeout_s)
