"""Running code tests in a sandbox: grade a program, and fill in the expected values of tests
that take them from a trusted solution (recorded HumanEval checks, MBPP+ inputs).

Expected values computed from a trusted solution are cached per process, keyed by the tests'
content, so each task pays that extra sandbox run once.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reward.code import (
    HARNESS_SOURCE,
    PYTHON,
    CodeTests,
    ExecLimits,
    GradeResult,
    MalformedReport,
    judge,
    new_nonce,
    parse_report,
    report_lines,
    reward_from,
)
from reward.code_harness import WALL_FACTOR, Undecodable, decode


class Runner(Protocol):
    """What grading needs from a sandbox pool: `workers.sandbox.SandboxPool` satisfies it."""

    async def run(self, request: Any) -> Any: ...


class SandboxFailed(Exception):
    """The sandbox could not run the program (infrastructure); the sample gets no reward."""


class ReferenceFailed(Exception):
    """The dataset's trusted solution failed its own tests, so the task has no expected values."""


_expected_cache: dict[str, CodeTests] = {}


def _cache_key(tests: CodeTests) -> str:
    return hashlib.sha256(tests.model_dump_json().encode()).hexdigest()


async def run_harness(
    pool: Runner, spec: dict[str, Any], program: str, limits: ExecLimits, count: int
) -> tuple[Any, str]:
    """Run `program` under the harness with `spec` (mode, probes or inputs) in one sandbox
    execution; returns the sandbox result and the nonce framing its reports."""
    from workers.sandbox import ExecRequest, Status

    nonce = new_nonce()
    spec = {
        **spec,
        "program": "solution.py",
        "timeout_per_test": limits.timeout_per_test_s,
        "max_output_bytes": limits.max_output_bytes,
    }
    timeout = min(limits.timeout_total_s, 5.0 + WALL_FACTOR * limits.timeout_per_test_s * (count + 1))
    request = ExecRequest(
        command=[PYTHON, "harness.py", "spec.json"],
        files={"harness.py": HARNESS_SOURCE, "solution.py": program.encode(), "spec.json": json.dumps(spec).encode()},
        stdin=(nonce + "\n").encode(),
        timeout_s=timeout,
        memory_mb=limits.memory_mb,
        max_output_bytes=min(limits.max_total_output_bytes, 65536 + count * (limits.max_output_bytes + 1024)),
        # A fixed hash seed makes set and dict orders of strings the same in every run: the
        # reference's outputs and the candidate's must not differ by a random seed. The fast
        # path forks an interpreter whose seed is already drawn, so a fresh one is started.
        env={"PYTHONHASHSEED": "0"},
        fast_path=False,
    )
    result = await pool.run(request)
    if result.status == Status.SANDBOX_ERROR:
        raise SandboxFailed(result.error or "sandbox error")
    return result, nonce


def _spec(tests: CodeTests) -> dict[str, Any]:
    if tests.mode == "call":
        return {"mode": "call", "probes": tests.probes, "setup": tests.setup}
    return {"mode": "stdio", "inputs": tests.inputs}


class RecordedCall(BaseModel):
    """One call the recorder saw while the dataset's tests ran against the trusted solution."""

    model_config = ConfigDict(extra="forbid", strict=True)

    i: int = Field(ge=0)
    """The call's position in the recording."""
    probe: str
    """The call as a probe expression (the function's name and literal arguments)."""
    value: Any
    """The value the trusted solution returned, in canonical JSON."""


def read_recording(stdout: bytes, nonce: str) -> tuple[list[RecordedCall], str | None, bool]:
    """(calls, the check's error, whether the recording finished) from a record-mode run; the
    output is validated like a graded run's (ReferenceFailed when a line is malformed)."""
    calls, error, finished = [], None, False
    try:
        for item in report_lines(stdout, nonce):
            if item.keys() == {"check_error"} and type(item["check_error"]) is str:
                error = item["check_error"]
            elif item.keys() == {"recorded"} and type(item["recorded"]) is int:
                finished = item["recorded"] == len(calls)
            else:
                call = RecordedCall.model_validate(item)
                decode(call.value)
                if call.i != len(calls):
                    raise MalformedReport(f"recorded call {call.i} out of order")
                calls.append(call)
    except (MalformedReport, ValidationError, Undecodable) as exc:
        raise ReferenceFailed(f"the recording run's report is malformed: {str(exc)[:300]}") from None
    return calls, error, finished


async def _record(pool: Runner, tests: CodeTests, limits: ExecLimits) -> CodeTests:
    """Run the dataset's own test code against its solution, recording every call."""
    record = tests.record
    spec = {"mode": "record", "entry": record.entry, "check": record.check}
    result, nonce = await run_harness(pool, spec, record.program, limits, count=200)
    calls, error, finished = read_recording(result.stdout, nonce)
    if error or not finished or not calls:
        why = error or f"the recording run ended as {result.status.value} before finishing"
        raise ReferenceFailed(f"the reference solution failed the dataset's tests: {why}")
    return tests.model_copy(
        update={"probes": [c.probe for c in calls], "expected": [c.value for c in calls], "record": None}
    )


async def _reference(pool: Runner, tests: CodeTests, limits: ExecLimits) -> CodeTests:
    """Expected values = the trusted solution's outputs on the probes."""
    result, nonce = await run_harness(pool, _spec(tests), tests.reference, limits, tests.count)
    report = parse_report(result.stdout, nonce, tests.count)
    missing = [i for i in range(tests.count) if i not in report.records or not report.records[i].returned]
    if report.malformed or report.load_error or missing:
        unreported = f"not reported: the run ended as {result.status.value}"
        failed = report.records.get(missing[0]) if missing else None
        first = report.malformed or report.load_error or (failed and failed.error) or unreported
        raise ReferenceFailed(
            f"the reference solution failed on {len(missing)} of {tests.count} inputs (first: {first})"
        )
    values = [report.records[i].value for i in range(tests.count)]
    return tests.model_copy(update={"expected": values, "reference": None})


async def materialize(pool: Runner, tests: CodeTests, limits: ExecLimits) -> CodeTests:
    """`tests` with probes and expected values filled in (cached); unchanged if already full."""
    if tests.expected is not None and tests.record is None:
        return tests
    key = _cache_key(tests)
    if key not in _expected_cache:
        fill = _record if tests.record is not None else _reference
        if tests.record is None and tests.reference is None:
            raise ReferenceFailed("the tests have neither expected values nor a reference solution")
        _expected_cache[key] = await fill(pool, tests, limits)
    return _expected_cache[key]


def _why(result: Any) -> str:
    """What the sandbox said of a run that ended early: its error, else the exit code and the
    last line of stderr (the harness's traceback ends there)."""
    if result.error:
        return f" ({result.error})"
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    return f" (exit code {result.exit_code}{': ' + lines[-1][:200] if lines else ''})"


async def grade(
    pool: Runner, tests: CodeTests, program: str, limits: ExecLimits, reward_mode: Literal["all", "fraction"] = "all"
) -> GradeResult:
    """Run `program` on every test in the sandbox and compare on the host. Infrastructure
    failures and broken tasks give `reward=None` with the reason in `error`."""
    try:
        tests = await materialize(pool, tests, limits)
        result, nonce = await run_harness(pool, _spec(tests), program, limits, tests.count)
    except (SandboxFailed, ReferenceFailed) as exc:
        return GradeResult(
            reward=None,
            passed=0,
            total=tests.count,
            error=str(exc),
            status="sandbox_error" if isinstance(exc, SandboxFailed) else "no_reference",
        )
    report = parse_report(result.stdout, nonce, tests.count)
    outcomes = judge(tests, report)
    error = report.malformed or report.load_error
    if error is None and not report.done:
        error = f"run ended as {result.status.value} before all tests were reported{_why(result)}"
    return GradeResult(
        reward=reward_from(outcomes, reward_mode),
        passed=sum(o.passed for o in outcomes),
        total=len(outcomes),
        outcomes=outcomes,
        status=result.status.value,
        error=error,
        sandbox_s=result.wall_s,
        isolation=result.isolation.value if result.isolation else None,
    )
