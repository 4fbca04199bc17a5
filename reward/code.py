"""Code verification: run a candidate program on test inputs in a sandbox, compare on the host.

Only test *inputs* enter the sandbox (probe expressions for function-call tests, stdin texts for
stdin/stdout tests) together with `reward/code_harness.py`. The harness reports what the program
produced, framed by a per-run nonce; the host compares against the expected values it keeps in
`Task.hidden`. So a program cannot read the answers, cannot pass by exiting early, raising
SkipTest, printing "passed", or returning an object whose `__eq__` is always true: an unreported
test is a failed test, and reported values are plain data compared here.

A sandbox failure (status SANDBOX_ERROR) gives no reward (`None`), never 0.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from reward.code_harness import decode

HARNESS_SOURCE = (Path(__file__).parent / "code_harness.py").read_bytes()
PYTHON = "python3"


class RecordSpec(BaseModel):
    """How to obtain tests by running a dataset's own test code against its trusted solution."""

    model_config = ConfigDict(extra="forbid")

    program: str
    """The trusted program: the solution followed by the dataset's test code (e.g. `check`)."""
    entry: str
    """The name of the function under test; calls to it are recorded as probes."""
    check: str
    """Expression that runs the dataset's tests with `__record__` in place of the function."""


class CodeTests(BaseModel):
    """The hidden tests of one code task (lives in `Task.hidden["tests"]`)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["call", "stdio"]
    """"call": evaluate probe expressions against the program; "stdio": feed stdin, read stdout."""
    setup: str = ""
    """Call mode: source run after the program and before the probes (helpers, fixtures)."""
    probes: list[str] = Field(default_factory=list)
    """Call mode: one Python expression per test, e.g. ``add(*[1, 2])``; inputs only."""
    inputs: list[str] = Field(default_factory=list)
    """Stdio mode: the stdin text of each test."""
    expected: list[Any] | None = None
    """Call mode: canonical JSON of each expected value; stdio mode: expected stdout texts.
    None until computed from `reference` (see `reward.code_reference`)."""
    reference: str | None = None
    """A trusted program whose outputs define `expected` when the dataset gives no literal."""
    record: RecordSpec | None = None
    """When set, `probes` and `expected` come from recording the dataset's own test code."""
    alternatives: bool = False
    """Each expected entry is a list of acceptable values (APPS: the output or its first item)."""
    tuple_as_list: bool = False
    """Treat tuples and lists alike (for datasets whose expected values went through JSON)."""
    rel_tol: float = 1e-6
    """Relative tolerance when either side of a comparison is a float."""
    abs_tol: float = 1e-6
    """Absolute tolerance when either side of a comparison is a float."""

    @property
    def count(self) -> int:
        """Number of tests."""
        return len(self.probes) if self.mode == "call" else len(self.inputs)


def first_tests(tests: CodeTests, k: int) -> CodeTests:
    """The first `k` tests of filled-in `tests` (self-debug shows these as examples)."""
    if tests.expected is None:
        raise ValueError("first_tests() needs expected values; compute them from the reference first.")
    return tests.model_copy(update={"probes": tests.probes[:k], "inputs": tests.inputs[:k],
                                    "expected": tests.expected[:k]})


class ExecLimits(BaseModel):
    """Resource limits for one grading run in the sandbox."""

    model_config = ConfigDict(extra="forbid")

    timeout_per_test_s: float = 10.0
    """CPU-time limit for one test (one probe, or one run of a stdin/stdout program), so that
    a busy machine does not fail correct programs; the wall-clock bound is 3x this."""
    timeout_total_s: float = 90.0
    """Wall-clock limit for the whole run; tests not reported by then fail."""
    memory_mb: int = 1024
    """Memory limit of the sandboxed process tree."""
    max_output_bytes: int = 4_000_000
    """Output of one test (stdout, or a returned value as JSON) above this fails that test."""
    max_total_output_bytes: int = 64_000_000
    """Output of the whole run above this ends it (tests not reported by then fail)."""


class TestOutcome(BaseModel):
    """The result of one test."""

    model_config = ConfigDict(extra="forbid")

    passed: bool
    """Whether the produced value (or stdout) matched the expected one."""
    error: str | None = None
    """Why the test failed when it did not run to a value (exception, timeout, not reported)."""
    got: str | None = None
    """A short rendering of what the program produced (for feedback and logs)."""


class GradeResult(BaseModel):
    """The outcome of grading one program."""

    model_config = ConfigDict(extra="forbid")

    reward: float | None
    """All-pass (1/0) or fraction passed; None when the sandbox failed (sample dropped)."""
    passed: int
    """Tests passed."""
    total: int
    """Tests run."""
    outcomes: list[TestOutcome] = Field(default_factory=list)
    """Per-test results, in test order."""
    status: str = ""
    """The sandbox status of the run (OK, RUNTIME_ERROR, TIMEOUT, ...)."""
    error: str | None = None
    """Program-level failure (does not load, crashed the harness) or the infrastructure fault."""
    sandbox_s: float = 0.0
    """Wall time the sandbox reported for the run."""


class HarnessReport(BaseModel):
    """The nonce-framed records parsed from the harness's stdout."""

    model_config = ConfigDict(extra="forbid")

    records: dict[int, dict[str, Any]] = Field(default_factory=dict)
    """Per-test record by test index (first record wins)."""
    load_error: str | None = None
    """Set when the program failed while being loaded."""
    done: bool = False
    """Whether the harness reached its end; False means the run was cut short."""


def new_nonce() -> str:
    """A fresh per-run secret that frames the harness's reports."""
    return secrets.token_hex(16)


def parse_report(stdout: bytes | str, nonce: str, count: int) -> HarnessReport:
    """Read the harness records for `count` tests from the sandbox stdout; lines without the
    nonce (anything the program printed) are ignored."""
    text = stdout.decode("utf-8", "replace") if isinstance(stdout, bytes) else stdout
    prefix = nonce + " "
    report = HarnessReport()
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        try:
            record = json.loads(line[len(prefix):])
        except json.JSONDecodeError:
            continue  # a record cut by the output cap
        if "load_error" in record:
            report.load_error = str(record["load_error"])
        elif record.get("done") == count:
            report.done = True
        elif isinstance(record.get("i"), int) and 0 <= record["i"] < count:
            report.records.setdefault(record["i"], record)
    return report


def values_match(got: Any, expected: Any, tests: CodeTests) -> bool:
    """Python `==` semantics on decoded values, with a float tolerance, recursively."""
    if _is_number(got) and _is_number(expected):
        return _numbers_match(got, expected, tests.rel_tol, tests.abs_tol)
    if tests.tuple_as_list:
        got = list(got) if isinstance(got, tuple) else got
        expected = list(expected) if isinstance(expected, tuple) else expected
    if type(got) is not type(expected):
        return False
    if isinstance(got, (list, tuple)):
        return len(got) == len(expected) and all(
            values_match(g, e, tests) for g, e in zip(got, expected)
        )
    if isinstance(got, dict):
        return got.keys() == expected.keys() and all(
            values_match(got[k], expected[k], tests) for k in got
        )
    return got == expected


def _is_number(value: Any) -> bool:
    return isinstance(value, (bool, int, float, complex))


def _numbers_match(got: Any, expected: Any, rel_tol: float, abs_tol: float) -> bool:
    if isinstance(got, (bool, int)) and isinstance(expected, (bool, int)):
        return got == expected
    if isinstance(got, complex) or isinstance(expected, complex):
        return abs(complex(got) - complex(expected)) <= max(
            rel_tol * max(abs(complex(got)), abs(complex(expected))), abs_tol
        )
    if math.isnan(got) and math.isnan(expected):
        return True
    return math.isclose(got, expected, rel_tol=rel_tol, abs_tol=abs_tol)


_INT_TOKEN = re.compile(r"[+-]?\d+\Z")
_FLOAT_TOKEN = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")


def stdout_matches(got: str, expected: str, tests: CodeTests) -> bool:
    """Whitespace-split tokens equal one by one; numeric tokens within the float tolerance."""
    got_tokens, expected_tokens = got.split(), expected.split()
    if len(got_tokens) != len(expected_tokens):
        return False
    return all(_tokens_match(g, e, tests) for g, e in zip(got_tokens, expected_tokens))


def _tokens_match(got: str, expected: str, tests: CodeTests) -> bool:
    if got == expected:
        return True
    if _INT_TOKEN.match(got) and _INT_TOKEN.match(expected):
        # Integers compare exactly: huge integers would all look alike as floats.
        return got.lstrip("+").lstrip("0") == expected.lstrip("+").lstrip("0")
    if _FLOAT_TOKEN.match(got) and _FLOAT_TOKEN.match(expected):
        return math.isclose(float(got), float(expected), rel_tol=tests.rel_tol, abs_tol=tests.abs_tol)
    return False


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def judge(tests: CodeTests, report: HarnessReport) -> list[TestOutcome]:
    """Compare every reported value with its expected value; unreported tests fail."""
    if tests.expected is None:
        raise ValueError("judge() needs expected values; compute them from the reference first.")
    outcomes = []
    for i in range(tests.count):
        record = report.records.get(i)
        if record is None:
            reason = report.load_error or "not reported: the program exited or timed out first"
            outcomes.append(TestOutcome(passed=False, error=reason))
        elif tests.mode == "call":
            outcomes.append(_judge_call(record, tests.expected[i], tests))
        else:
            outcomes.append(_judge_stdio(record, tests.expected[i], tests))
    return outcomes


def _judge_call(record: dict[str, Any], expected: Any, tests: CodeTests) -> TestOutcome:
    if "value" not in record:
        return TestOutcome(passed=False, error=str(record.get("error", "no value")))
    got = decode(record["value"])
    accepted = expected if tests.alternatives else [expected]
    passed = any(values_match(got, decode(e), tests) for e in accepted)
    return TestOutcome(passed=passed, got=_short(got))


def _judge_stdio(record: dict[str, Any], expected: str, tests: CodeTests) -> TestOutcome:
    got = str(record.get("stdout", ""))
    if record.get("error"):
        return TestOutcome(passed=False, error=str(record["error"]), got=_short(got))
    return TestOutcome(passed=stdout_matches(got, expected, tests), got=_short(got))


def reward_from(outcomes: list[TestOutcome], reward_mode: Literal["all", "fraction"]) -> float:
    """1.0 only if every test passed ("all"), or the share passed ("fraction"); 0 with no tests."""
    if not outcomes:
        return 0.0
    passed = sum(o.passed for o in outcomes)
    if reward_mode == "fraction":
        return passed / len(outcomes)
    return 1.0 if passed == len(outcomes) else 0.0
