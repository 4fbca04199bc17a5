"""Host-side parts of code grading: canonical values, comparison, report parsing, judging."""

from __future__ import annotations

import json
import math

import pytest

from reward.code import (
    CodeTests,
    HarnessReport,
    judge,
    parse_report,
    reward_from,
    stdout_matches,
    values_match,
)
from reward.code_harness import Unencodable, decode, encode, to_source

CALL = CodeTests(mode="call")


@pytest.mark.parametrize("value", [
    None, True, 0, -7, 2**80, 1.5, "tab\there", b"\x00\xff", 3 - 4j,
    [1, [2, (3, 4)]], (), (1,), {1, 2, 3}, frozenset({"a"}), {"k": [1]}, {(1, 2): {3}},
])
def test_encode_decode_roundtrip(value) -> None:
    encoded = encode(value)
    json.dumps(encoded, allow_nan=False)  # canonical form is strict JSON
    assert decode(encoded) == value
    assert type(decode(encoded)) is type(value) or isinstance(value, frozenset)


def test_non_finite_floats_roundtrip_as_tags() -> None:
    assert encode(float("inf")) == {"__float__": "inf"}
    assert math.isnan(decode(encode(float("nan"))))


def test_to_source_rebuilds_values() -> None:
    for value in [[1, (2,), {3}], {"a": (1, 2), 5: frozenset([1])}, float("-inf"), (), set(), "q'\""]:
        assert eval(to_source(value)) == value


def test_custom_objects_are_unencodable() -> None:
    class AlwaysEqual:
        def __eq__(self, other):
            return True

    with pytest.raises(Unencodable):
        encode(AlwaysEqual())
    with pytest.raises(Unencodable):
        encode([1, AlwaysEqual()])


def test_builtin_subclass_reports_its_real_value() -> None:
    class LyingInt(int):
        def __eq__(self, other):
            return True

        def __index__(self):
            return 99

    class LyingList(list):
        def __iter__(self):
            return iter([42])

    assert encode(LyingInt(5)) == 5 and type(encode(LyingInt(5))) is int
    assert encode(LyingList([1, 2])) == [1, 2]


def test_values_match_follows_python_equality_with_float_tolerance() -> None:
    assert values_match(0.1 + 0.2, 0.3, CALL)
    assert not values_match(0.31, 0.3, CALL)
    assert values_match(True, 1, CALL) and values_match(2, 2.0, CALL)
    assert not values_match([1, 2], (1, 2), CALL)
    assert values_match([1, 2], (1, 2), CodeTests(mode="call", tuple_as_list=True))
    assert values_match({"a": [1.0000000001]}, {"a": [1]}, CALL)
    assert not values_match({"a": 1}, {"b": 1}, CALL)
    assert values_match(float("nan"), float("nan"), CALL)
    assert not values_match("1", 1, CALL)
    assert not values_match(None, 0, CALL)
    assert values_match({1, 2}, {2, 1}, CALL) and not values_match({1}, {1, 2}, CALL)


def test_stdout_tokens_with_float_tolerance() -> None:
    io = CodeTests(mode="stdio")
    assert stdout_matches("1 2\n3  \n", "1 2 3", io)
    assert stdout_matches("0.3333333", "0.333333333", io)
    assert not stdout_matches("0.34", "0.333", io)
    assert not stdout_matches("1 2", "1 2 3", io)
    assert not stdout_matches("YES", "yes", io)
    # Huge integers compare exactly: as floats they would look alike.
    assert not stdout_matches("1" + "0" * 30, "1" + "0" * 29 + "1", io)
    assert stdout_matches("007", "7", io)


def test_parse_report_reads_only_nonce_framed_records() -> None:
    nonce = "abc123"
    stdout = "\n".join([
        'abc123 {"i": 0, "value": 3}',
        'abc123 {"i": 0, "value": 99}',          # a second record for the same test is ignored
        '{"i": 1, "value": 4}',                  # printed by the program: no nonce
        'PASSED all tests',
        'wrong1 {"i": 1, "value": 4}',
        'abc123 {"i": 7, "value": 1}',           # out of range
        'abc123 {"done": 2}',
    ])
    report = parse_report(stdout, nonce, count=2)
    assert report.records == {0: {"i": 0, "value": 3}}
    assert report.done


def test_judge_fails_unreported_tests_and_rewards() -> None:
    tests = CodeTests(mode="call", probes=["f(1)", "f(2)", "f(3)"], expected=[encode(1), encode(2), encode(3)])
    report = HarnessReport(records={0: {"i": 0, "value": 1}, 1: {"i": 1, "value": 5}})
    outcomes = judge(tests, report)
    assert [o.passed for o in outcomes] == [True, False, False]
    assert "not reported" in outcomes[2].error
    assert reward_from(outcomes, "all") == 0.0
    assert reward_from(outcomes, "fraction") == pytest.approx(1 / 3)
    assert reward_from([], "all") == 0.0


def test_judge_alternatives_accept_any_listed_value() -> None:
    tests = CodeTests(mode="call", probes=["f()"], expected=[[encode([7]), encode(7)]],
                      alternatives=True, tuple_as_list=True)
    assert judge(tests, HarnessReport(records={0: {"i": 0, "value": 7}}))[0].passed
    assert judge(tests, HarnessReport(records={0: {"i": 0, "value": encode((7,))}}))[0].passed
    assert not judge(tests, HarnessReport(records={0: {"i": 0, "value": 8}}))[0].passed
