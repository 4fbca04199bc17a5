"""SWE grading: a model's diff against a task's hidden tests, in a fresh sandbox.

The diff loses its changes to trusted test files (and to files that would run code inside the
test process, and new modules that would import in place of installed ones) before it is
applied, the task's test_patch is applied after it, the FAIL_TO_PASS and PASS_TO_PASS tests run
(the interpreter by absolute path, safe-path semantics, no plugin autoloading), and `swebench`'s
own log parser and report functions read the output. Reward 1 only if every one of those tests
passes. No reward at all (None, the sample is dropped) when the sandbox fails or the task itself
is broken; a diff that cannot be read safely, does not apply or cannot be written, tests that
time out, a crashed test run or a broken sandbox (`workspace.blame`) are the model's doing and
score 0.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from pydantic import BaseModel, Field
from swebench.harness.constants import (
    END_TEST_OUTPUT,
    FAIL_TO_PASS,
    PASS_TO_PASS,
    START_TEST_OUTPUT,
    TEST_EXIT_CODE,
    ResolvedStatus,
)
from swebench.harness.grading import (
    get_eval_report,
    get_eval_tests_report,
    get_logs_eval,
    get_resolution_status,
)
from swebench.types import TestSpec

from envs.swe import official
from envs.swe.diffs import PatchError, drop_paths, drop_protected, package_inits, shadowing_paths
from envs.swe.task import SWETask
from envs.swe.workspace import PolicyFault, SandboxFailure, SandboxSession, Workspace
from workers.sandbox import ExecResult, SandboxError, SandboxUnavailable, Status


class SessionPool(Protocol):
    """What grading needs of a `workers.sandbox.SandboxPool`: fresh sessions."""

    def session(self) -> AbstractAsyncContextManager[SandboxSession]: ...


class TestOutcome(BaseModel):
    """Which tests of one group passed and which did not."""

    passed: list[str] = Field(default_factory=list)
    """Tests that passed (or, for PASS_TO_PASS, were skipped: not a regression)."""
    failed: list[str] = Field(default_factory=list)
    """Tests that failed, errored or did not run."""


class GradeResult(BaseModel):
    """The verdict on one diff."""

    reward: float | None
    """1.0 if every FAIL_TO_PASS and PASS_TO_PASS test passes, else 0.0; None when no verdict
    could be reached for reasons that are not the model's (sandbox failure, broken task)."""
    resolved: bool = False
    """SWE-bench's "resolved" (RESOLVED_FULL)."""
    applied: bool = False
    """Whether the model's diff (after dropping protected files) applied."""
    dropped_paths: list[str] = Field(default_factory=list)
    """Paths whose changes were ignored: protected files (trusted tests, files that run code in
    the test process), parts that are not plain text files, new modules that would shadow
    importable ones."""
    fail_to_pass: TestOutcome = Field(default_factory=TestOutcome)
    """Outcome of the tests the fix must make pass."""
    pass_to_pass: TestOutcome = Field(default_factory=TestOutcome)
    """Outcome of the tests the fix must not break."""
    error: str = ""
    """Why there is no test verdict (diff does not apply, timeout, sandbox failure), else ''."""
    log_tail: str = ""
    """The last lines of the test output, for people reading a sample."""
    log: str = Field(default="", exclude=True)
    """The whole test output (for tests and debugging; left out of dumps, it can be megabytes)."""
    sandbox_s: float = 0.0
    """Seconds spent waiting on the sandbox."""
    total_s: float = 0.0
    """Seconds the whole grading took."""


async def grade_swe(
    task: SWETask, diff: str, pool: SessionPool, *, timeout_s: float = 900.0, memory_mb: int = 2048
) -> GradeResult:
    """Grade `diff` (a unified diff against the task's base) on `task` in a fresh sandbox
    session from `pool`."""
    start = time.perf_counter()
    result = await _grade(task, diff, pool, timeout_s, memory_mb)
    result.total_s = time.perf_counter() - start
    return result


async def _grade(task: SWETask, diff: str, pool: SessionPool, timeout_s: float, memory_mb: int) -> GradeResult:
    if not task.FAIL_TO_PASS:
        return GradeResult(reward=None, error=f"task {task.instance_id} is broken: it has no FAIL_TO_PASS tests")
    try:
        trusted = task.trusted()
    except PatchError as err:
        return GradeResult(reward=None, error=f"task {task.instance_id} is broken: {err}")
    try:
        kept, dropped = drop_protected(diff, trusted) if diff.strip() else ("", [])
    except PatchError as err:
        return GradeResult(reward=0.0, error=f"model diff: {err}")
    workspace: Workspace | None = None
    try:
        async with pool.session() as box:
            workspace = Workspace(box, task, memory_mb)
            await workspace.prepare()
            await workspace.test_environment()  # read while the tree is still the task's own
            kept, shadowing = await _drop_shadowing(workspace, kept)
            dropped += shadowing
            run = _apply_and_run_eval_script if task.image_resident() else _apply_and_test
            verdict = await run(workspace, task, kept, timeout_s)
    except (SandboxFailure, SandboxError, SandboxUnavailable, PatchError) as err:
        # PatchError here: the task's own setup_patch does not apply, a broken task.
        return GradeResult(
            reward=None,
            dropped_paths=dropped,
            error=f"no verdict: {err}",
            sandbox_s=workspace.sandbox_s if workspace else 0.0,
        )
    verdict.dropped_paths, verdict.sandbox_s = dropped, workspace.sandbox_s
    return verdict


async def _drop_shadowing(workspace: Workspace, diff: str) -> tuple[str, list[str]]:
    """The diff without the files it adds that would shadow an importable module (what is
    importable and which folders are packages read from the sandbox before the diff touches
    it), and those files."""
    inits = package_inits(diff)
    if not inits:
        return diff, []
    present = {path for path, data in (await workspace.read_files(inits)).items() if data is not None}
    importable = set((await workspace.test_environment()).importable)
    shadowing = shadowing_paths(diff, importable, present)
    return (drop_paths(diff, set(shadowing)), shadowing) if shadowing else (diff, [])


async def _apply_model_diff(workspace: Workspace, kept: str) -> GradeResult | None:
    """Apply the model's kept diff; from here on a failure of the sandbox's tree is the policy's.
    Returns the 0 grade of a diff that does not apply, None when it applied."""
    workspace.policy_acted = True
    try:
        await workspace.apply(kept)
    except (PatchError, PolicyFault) as err:
        return GradeResult(reward=0.0, error=f"model diff: {err}", sandbox_s=workspace.sandbox_s)
    return None


async def _apply_and_test(workspace: Workspace, task: SWETask, kept: str, timeout_s: float) -> GradeResult:
    """Apply the model's diff, the task's test_patch, and run the tests."""
    if (refused := await _apply_model_diff(workspace, kept)) is not None:
        return refused
    try:
        await workspace.apply(task.test_patch)
    except PatchError as err:
        # The kept diff touches no trusted path nor a folder on the way to one, so only the
        # task can make its own test_patch fail.
        return GradeResult(reward=None, applied=True, error=f"task {task.instance_id} is broken: its test_patch: {err}")
    try:
        run = await workspace.run_tests(timeout_s)
    except PolicyFault as err:
        return GradeResult(reward=0.0, applied=True, error=str(err))
    verdict = judge(task, run)
    verdict.applied = True
    return verdict


async def _apply_and_run_eval_script(workspace: Workspace, task: SWETask, kept: str, timeout_s: float) -> GradeResult:
    """Official layout: apply the model's diff, then run the instance's SWE-bench evaluation
    script (which resets the test files, applies the test patch and runs the tests) and let
    swebench's report decide."""
    if (refused := await _apply_model_diff(workspace, kept)) is not None:
        return refused
    try:
        # The kept diff touches no trusted path, so only the task can make its test patch fail.
        await workspace.check_applies(task.test_patch)
    except PatchError as err:
        return GradeResult(reward=None, applied=True, error=f"task {task.instance_id} is broken: its test_patch: {err}")
    spec = official.test_spec(task, official.default_image(task))
    try:
        run = await workspace.run_script(spec.eval_script, timeout_s)
    except PolicyFault as err:
        return GradeResult(reward=0.0, applied=True, error=str(err))
    verdict = judge_report(spec, run, kept)
    verdict.applied = True
    return verdict


def judge_report(spec: TestSpec, run: ExecResult, diff: str) -> GradeResult:
    """The verdict on one run of an evaluation script: swebench's own `get_eval_report` on its
    log, as the official harness computes it."""
    output = run.stdout.decode(errors="replace")
    tail = "\n".join(output.splitlines()[-30:])
    if run.status in (Status.TIMEOUT, Status.OOM, Status.OUTPUT_LIMIT):
        return GradeResult(reward=0.0, error=f"tests ended as {run.status.value}", log_tail=tail, log=output)
    prediction = {"instance_id": spec.instance_id, "model_patch": diff, "model_name_or_path": "codeworld"}
    with tempfile.NamedTemporaryFile("w", suffix=".log") as f:
        f.write(output)
        f.flush()
        report = get_eval_report(spec, prediction, f.name, include_tests_status=True)[spec.instance_id]
    if "tests_status" not in report:
        # No parseable results (swebench's triage hint included): the policy's run, so 0 — a
        # drop here would let a failing diff print an infrastructure signature to escape its 0.
        why = f" ({report['infra_failure_reason']})" if report.get("infra_failure_reason") else ""
        return GradeResult(reward=0.0, error=f"the test output holds no test results{why}", log_tail=tail, log=output)
    tests = report["tests_status"]
    outcome = {
        k: TestOutcome(passed=tests[k]["success"], failed=tests[k]["failure"]) for k in (FAIL_TO_PASS, PASS_TO_PASS)
    }
    return GradeResult(
        reward=1.0 if report["resolved"] else 0.0,
        resolved=report["resolved"],
        fail_to_pass=outcome[FAIL_TO_PASS],
        pass_to_pass=outcome[PASS_TO_PASS],
        log_tail=tail,
        log=output,
    )


def judge(task: SWETask, run: ExecResult) -> GradeResult:
    """The verdict on one test run, read with swebench's parser and report functions."""
    output = run.stdout.decode(errors="replace")
    tail = "\n".join(output.splitlines()[-30:])
    if run.status in (Status.TIMEOUT, Status.OOM, Status.OUTPUT_LIMIT):
        return GradeResult(reward=0.0, error=f"tests ended as {run.status.value}", log_tail=tail)
    log = f"{START_TEST_OUTPUT}\n{output}\n{END_TEST_OUTPUT}\n{TEST_EXIT_CODE}: {run.exit_code}\n"
    spec = TestSpec(
        instance_id=task.instance_id,
        image=task.image or "",
        eval_script_list=[],
        repo=task.repo,
        version=task.version,
        FAIL_TO_PASS=task.FAIL_TO_PASS,
        PASS_TO_PASS=task.PASS_TO_PASS,
        log_parser=task.resolved_log_parser(),
    )
    with tempfile.NamedTemporaryFile("w", suffix=".log") as f:
        f.write(log)
        f.flush()
        status_map, found = get_logs_eval(spec, f.name)
    if not found:
        return GradeResult(reward=0.0, error="the test output holds no test results", log_tail=tail)
    report = get_eval_tests_report(status_map, {FAIL_TO_PASS: task.FAIL_TO_PASS, PASS_TO_PASS: task.PASS_TO_PASS})
    resolved = get_resolution_status(report) == ResolvedStatus.FULL.value
    outcome = {
        k: TestOutcome(passed=report[k]["success"], failed=report[k]["failure"]) for k in (FAIL_TO_PASS, PASS_TO_PASS)
    }
    return GradeResult(
        reward=1.0 if resolved else 0.0,
        resolved=resolved,
        fail_to_pass=outcome[FAIL_TO_PASS],
        pass_to_pass=outcome[PASS_TO_PASS],
        log_tail=tail,
    )
