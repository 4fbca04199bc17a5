"""Code verification: run a candidate program on test inputs in a sandbox, compare on the host.

Only test *inputs* enter the sandbox (probe expressions for function-call tests, stdin texts for
stdin/stdout tests) together with `reward/code_harness.py`. The harness reports what the program
produced, framed by a per-run nonce; the host compares against the expected values it keeps in
`Task.hidden`. So a program cannot read the answers, cannot pass by exiting early, raising
SkipTest, printing "passed", or returning an object whose `__eq__` is always true: an unreported
test is a failed test, and reported values are plain data compared here.

Nothing read back from the sandbox is trusted. A program that reaches the report channel (frame
introspection finds the reporter in call mode; /proc gives a forked program the harness's pipe in
stdio mode) can write any line with the nonce: every framed line is validated (`ReportRecord`,
`decode`, both total), and one the harness cannot have written fails every test of the run; no
input makes the host raise.

A sandbox failure (status SANDBOX_ERROR) gives no reward (`None`), never 0.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    return tests.model_copy(
        update={"probes": tests.probes[:k], "inputs": tests.inputs[:k], "expected": tests.expected[:k]}
    )


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
    isolation: str | None = None
    """What isolated the graded run (`workers.sandbox.Isolation` value); None when none ran."""


class ReportRecord(BaseModel):
    """One test's record as the harness writes it, validated on the host: a record the harness
    cannot have written (wrong types, extra keys, a value outside the canonical form) fails
    validation and, with it, the run."""

    model_config = ConfigDict(extra="forbid", strict=True)

    i: int = Field(ge=0)
    """The test's index."""
    value: Any = None
    """Call mode: the returned value in canonical JSON (present only when the probe returned)."""
    error: str | None = None
    """Why the test did not produce a value (exception, time limit, output cap, exit code)."""
    stdout: str | None = None
    """Stdio mode: what the program printed."""
    exit: int | None = None
    """Stdio mode: the program's exit status."""
    s: float | None = None
    """Seconds the test took in the sandbox."""

    @model_validator(mode="after")
    def _canonical(self) -> ReportRecord:
        if self.returned:
            decode(self.value)  # Undecodable is a ValueError: pydantic reports it as invalid
        return self

    @property
    def returned(self) -> bool:
        """Whether the record carries a returned value (None is a value too)."""
        return "value" in self.model_fields_set

    @property
    def got(self) -> Any:
        """The returned value, decoded."""
        return decode(self.value)


class HarnessReport(BaseModel):
    """The nonce-framed records parsed from the harness's stdout."""

    model_config = ConfigDict(extra="forbid")

    records: dict[int, ReportRecord] = Field(default_factory=dict)
    """Per-test record by test index."""
    load_error: str | None = None
    """Set when the program failed while being loaded."""
    done: bool = False
    """Whether the harness reached its end; False means the run was cut short."""
    malformed: str | None = None
    """Set when a nonce-framed line is not a record the harness can have written (a program
    that reached the report channel): every test then fails with this reason."""


class MalformedReport(ValueError):
    """A nonce-framed line is not a record the harness writes."""


def new_nonce() -> str:
    """A fresh per-run secret that frames the harness's reports."""
    return secrets.token_hex(16)


def report_lines(stdout: bytes | str, nonce: str) -> list[dict[str, Any]]:
    """The JSON objects of the nonce-framed lines of a harness run. Lines without the nonce
    (anything the program printed) are skipped; so is a last framed line that is not complete
    JSON, since the output cap may cut the run mid-record. Any other framed line that is not a
    JSON object raises MalformedReport: only a program that reached the report channel writes
    one."""
    text = stdout.decode("utf-8", "replace") if isinstance(stdout, bytes) else stdout
    prefix = nonce + " "
    framed = [line[len(prefix) :] for line in text.split("\n") if line.startswith(prefix)]
    objects = []
    for n, body in enumerate(framed):
        try:
            item = json.loads(body, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            if n == len(framed) - 1 and not exc.msg.startswith("Extra data"):
                break  # the last record, cut by the output cap
            raise MalformedReport(f"a report line is not JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:  # integers over 4300 digits, deep nesting
            raise MalformedReport(f"a report line cannot be read ({type(exc).__name__})") from None
        if type(item) is not dict:
            raise MalformedReport(f"a report line holds a {type(item).__name__}, not a record")
        objects.append(item)
    return objects


def _no_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not canonical")


def parse_report(stdout: bytes | str, nonce: str, count: int) -> HarnessReport:
    """Read and validate the harness records for `count` tests from the sandbox stdout. A
    framed record the harness cannot have written for this run (not a record, an index out of
    range, a second record for a test, a value outside the canonical form) makes the report
    malformed: the program reached the report channel, and all its tests fail."""
    report = HarnessReport()
    try:
        for item in report_lines(stdout, nonce):
            _add_record(report, item, count)
    except MalformedReport as exc:
        return HarnessReport(malformed=f"malformed harness report: {exc}")
    return report


def _add_record(report: HarnessReport, item: dict[str, Any], count: int) -> None:
    keys = item.keys()
    if keys == {"load_error"}:
        if type(item["load_error"]) is not str or report.load_error is not None:
            raise MalformedReport("a second load_error, or one that is not text")
        report.load_error = item["load_error"]
    elif keys == {"done"}:
        if type(item["done"]) is not int or item["done"] != count or report.done:
            raise MalformedReport(f"a done record that does not say {count} tests, or a second one")
        report.done = True
    elif "i" in keys:
        try:
            record = ReportRecord.model_validate(item)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "record"
            raise MalformedReport(f"record field {where}: {first['msg']}"[:300]) from None
        if record.i >= count or record.i in report.records:
            raise MalformedReport(f"a second or out-of-range record for test {record.i}")
        report.records[record.i] = record
    else:
        raise MalformedReport(f"a record with unknown keys {sorted(keys)[:5]}"[:300])


def values_match(got: Any, expected: Any, tests: CodeTests) -> bool:
    """Python `==` semantics on decoded values, recursively, with a float tolerance where the
    expected value is a float or complex number (an expected integer is matched exactly)."""
    if _is_number(got) and _is_number(expected):
        return _numbers_match(got, expected, tests.rel_tol, tests.abs_tol)
    if tests.tuple_as_list:
        got = list(got) if isinstance(got, tuple) else got
        expected = list(expected) if isinstance(expected, tuple) else expected
    if type(got) is not type(expected):
        return False
    if isinstance(got, (list, tuple)):
        return len(got) == len(expected) and all(values_match(g, e, tests) for g, e in zip(got, expected))
    if isinstance(got, dict):
        return got.keys() == expected.keys() and all(values_match(got[k], expected[k], tests) for k in got)
    return got == expected


def _is_number(value: Any) -> bool:
    return isinstance(value, (bool, int, float, complex))


def _numbers_match(got: Any, expected: Any, rel_tol: float, abs_tol: float) -> bool:
    if isinstance(expected, int):
        # Python compares an int with a float exactly: 3.0 == 3, but 1e9 != 1000000007, which a
        # relative tolerance would accept.
        return got == expected
    try:
        if isinstance(got, complex) or isinstance(expected, complex):
            a, b = complex(got), complex(expected)
            return abs(a - b) <= max(rel_tol * max(abs(a), abs(b)), abs_tol)
        got = float(got)
    except OverflowError:  # an integer beyond the float range is near no float
        return False
    if math.isnan(got) and math.isnan(expected):
        return True
    return math.isclose(got, expected, rel_tol=rel_tol, abs_tol=abs_tol)


# ASCII digits only: `\d` would take other scripts' digits, which `float` reads but a judge does not.
_INT_TOKEN = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT_TOKEN = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")


def stdout_matches(got: str, expected: str, tests: CodeTests) -> bool:
    """Whitespace-split tokens equal one by one; numeric tokens by value: exactly when the
    expected token is an integer, within the float tolerance otherwise."""
    got_tokens, expected_tokens = got.split(), expected.split()
    if len(got_tokens) != len(expected_tokens):
        return False
    return all(_tokens_match(g, e, tests) for g, e in zip(got_tokens, expected_tokens))


def _tokens_match(got: str, expected: str, tests: CodeTests) -> bool:
    if got == expected:
        return True
    if not (_FLOAT_TOKEN.match(got) and _FLOAT_TOKEN.match(expected)):
        return False
    if _INT_TOKEN.match(expected):
        # Exact decimal value, as Python's 3.0 == 3: "007" and "7.0" are 7; "1e9" is not
        # 1000000007, and huge integers that look alike as floats stay apart.
        try:
            return Decimal(got) == Decimal(expected)
        except InvalidOperation:  # an exponent beyond Decimal's range equals no integer token
            return False
    return math.isclose(float(got), float(expected), rel_tol=tests.rel_tol, abs_tol=tests.abs_tol)


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def judge(tests: CodeTests, report: HarnessReport) -> list[TestOutcome]:
    """Compare every reported value with its expected value; unreported tests fail, and so does
    every test of a malformed report."""
    if tests.expected is None:
        raise ValueError("judge() needs expected values; compute them from the reference first.")
    if report.malformed is not None:
        return [TestOutcome(passed=False, error=report.malformed) for _ in range(tests.count)]
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


def _judge_call(record: ReportRecord, expected: Any, tests: CodeTests) -> TestOutcome:
    if not record.returned:
        return TestOutcome(passed=False, error=record.error or "no value")
    got = record.got
    accepted = expected if tests.alternatives else [expected]
    passed = any(values_match(got, decode(e), tests) for e in accepted)
    return TestOutcome(passed=passed, got=_short(got))


def _judge_stdio(record: ReportRecord, expected: str, tests: CodeTests) -> TestOutcome:
    got = record.stdout or ""
    if record.error:
        return TestOutcome(passed=False, error=record.error, got=_short(got))
    if record.stdout is None:
        return TestOutcome(passed=False, error="no output reported")
    return TestOutcome(passed=stdout_matches(got, expected, tests), got=_short(got))


def reward_from(outcomes: list[TestOutcome], reward_mode: Literal["all", "fraction"]) -> float:
    """1.0 only if every test passed ("all"), or the share passed ("fraction"); 0 with no tests."""
    if not outcomes:
        return 0.0
    passed = sum(o.passed for o in outcomes)
    if reward_mode == "fraction":
        return passed / len(outcomes)
    return 1.0 if passed == len(outcomes) else 0.0
