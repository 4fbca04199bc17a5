"""Host-side parts of code grading: canonical values, comparison, report parsing, judging."""

from __future__ import annotations

import collections
import json
import math
import random

import pytest

from reward.code import (
    CodeTests,
    HarnessReport,
    ReportRecord,
    judge,
    parse_report,
    reward_from,
    stdout_matches,
    values_match,
)
from reward.code_harness import MAX_DEPTH, Undecodable, Unencodable, decode, encode, to_source

CALL = CodeTests(mode="call")


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -7,
        2**80,
        1.5,
        "tab\there",
        b"\x00\xff",
        3 - 4j,
        [1, [2, (3, 4)]],
        (),
        (1,),
        {1, 2, 3},
        frozenset({"a"}),
        {"k": [1]},
        {(1, 2): {3}},
    ],
)
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
    # The tolerance applies where the expected value is a float; an expected integer is exact.
    assert values_match({"a": [1]}, {"a": [1.0000000001]}, CALL)
    assert not values_match({"a": [1.0000000001]}, {"a": [1]}, CALL)
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
    stdout = "\n".join(
        [
            'abc123 {"i": 0, "value": 3}',
            '{"i": 1, "value": 4}',  # printed by the program: no nonce
            "PASSED all tests",
            'wrong1 {"i": 1, "value": 4}',
            'abc123 {"done": 2}',
        ]
    )
    report = parse_report(stdout, nonce, count=2)
    assert report.records == {0: ReportRecord(i=0, value=3)} and report.records[0].got == 3
    assert report.done and report.malformed is None


@pytest.mark.parametrize(
    "line",
    [
        'abc123 {"i": 0, "value": 99}',  # a second record for a test the harness reported
        'abc123 {"i": 7, "value": 1}',  # out of range
        'abc123 {"done": 3}',  # the wrong count
    ],
)
def test_records_the_harness_cannot_write_fail_the_run(line: str) -> None:
    stdout = 'abc123 {"i": 0, "value": 3}\n' + line + '\nabc123 {"i": 1, "value": 4}\nabc123 {"done": 2}\n'
    report = parse_report(stdout, "abc123", count=2)
    assert report.malformed and not report.records


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
    tests = CodeTests(
        mode="call", probes=["f()"], expected=[[encode([7]), encode(7)]], alternatives=True, tuple_as_list=True
    )
    assert judge(tests, HarnessReport(records={0: {"i": 0, "value": 7}}))[0].passed
    assert judge(tests, HarnessReport(records={0: {"i": 0, "value": encode((7,))}}))[0].passed
    assert not judge(tests, HarnessReport(records={0: {"i": 0, "value": 8}}))[0].passed


FORGED_VALUES = {
    "unknown tag": {"__code__": "import os"},
    "two keys": {"__tuple__": [], "__set__": []},
    "no key": {},
    "tuple body not a list": {"__tuple__": "ab"},
    "set body not a list": {"__set__": 5},
    "dict item not a pair": {"__dict__": [[1, 2, 3]]},
    "dict body of scalars": {"__dict__": [1]},
    "odd hex": {"__bytes__": "abc"},
    "non-hex": {"__bytes__": "zz"},
    "upper-case hex": {"__bytes__": "AB"},
    "hex with spaces": {"__bytes__": "ab cd"},
    "bytes body not text": {"__bytes__": 12},
    "float body not a non-finite name": {"__float__": "1.5"},
    "float body a number": {"__float__": 2},
    "complex of one part": {"__complex__": [1.0]},
    "complex of a huge int": {"__complex__": [10**400, 0.0]},
    "complex of text": {"__complex__": ["1", "2"]},
    "integer too long": 10**4500,
    "NaN outside its tag": float("nan"),
    "infinity outside its tag": [float("inf")],
    "nested too deep": None,  # built below
    "tagged nesting too deep": None,  # built below
    "not a JSON type": object(),
    "tuple not a JSON type": (1, 2),
}
_deep = 1
for _ in range(70):
    _deep = [_deep]
FORGED_VALUES["nested too deep"] = _deep
_tagged = 1
for _ in range(70):
    _tagged = {"__tuple__": [_tagged]}
FORGED_VALUES["tagged nesting too deep"] = _tagged


@pytest.mark.parametrize("name", list(FORGED_VALUES))
def test_decode_rejects_what_encode_cannot_write(name: str) -> None:
    with pytest.raises(Undecodable):
        decode(FORGED_VALUES[name])


def test_decode_accepts_the_deepest_encodable_value_and_unhashable_looking_members() -> None:
    value: object = 1
    for _ in range(MAX_DEPTH):
        value = [value]
    assert decode(encode(value)) == value
    with pytest.raises(Unencodable):
        encode([value])
    # Forged but well-formed: a set member that decodes to a tuple holding a list is frozen whole.
    assert decode({"__set__": [{"__tuple__": [[1, 2]]}]}) == {((1, 2),)}


def _random_json(rng: random.Random, depth: int = 0) -> object:
    pick = rng.random()
    if depth > 6 or pick < 0.35:
        return rng.choice([None, True, 0, -3, 2**70, 1.5, "x", "", "__tuple__", 10**300])
    if pick < 0.6:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    tag = rng.choice(["__tuple__", "__set__", "__dict__", "__float__", "__bytes__", "__complex__", "__x__", "k"])
    body = rng.choice([_random_json(rng, depth + 1), "nan", "ab", [_random_json(rng, depth + 1)] * 2])
    return {tag: body} if rng.random() < 0.9 else {tag: body, "k": 1}


def test_decode_is_total_on_random_json() -> None:
    rng = random.Random(8)
    outcomes = collections.Counter()
    for _ in range(20_000):
        try:
            decode(_random_json(rng))
            outcomes["decoded"] += 1
        except Undecodable:
            outcomes["undecodable"] += 1
    assert outcomes["decoded"] > 1000 and outcomes["undecodable"] > 1000, outcomes


def test_report_fuzz_never_raises_and_fails_every_test_of_a_forged_run() -> None:
    """Random framed lines after an honest full report: parsing and judging never raise, and a
    report holding a line the harness cannot write passes no test."""
    rng = random.Random(3)
    tests = CodeTests(mode="call", probes=["f(1)", "f(2)"], expected=[encode(1), encode(2)])
    honest = 'n0 {"i": 0, "value": 1}\nn0 {"i": 1, "value": 2}\nn0 {"done": 2}\n'
    assert [o.passed for o in judge(tests, parse_report(honest, "n0", 2))] == [True, True]
    for _ in range(3000):
        line = json.dumps(_random_json(rng))
        if rng.random() < 0.5:
            line = json.dumps(
                {"i": rng.choice([0, 1, 2, -1, True]), rng.choice(["value", "error", "stdout"]): _random_json(rng)}
            )
        forged = honest.replace('n0 {"done"', f'n0 {line}\nn0 {{"done"')
        report = parse_report(forged, "n0", 2)
        assert report.malformed, line
        assert not any(o.passed for o in judge(tests, report))


@pytest.mark.parametrize(
    "body",
    ["[" * 50_000 + "]" * 50_000, "7" * 5000, "NaN", "-Infinity", '{"i": 0}{"i": 1}', "[1, 2]", '"text"', "null"],
)
def test_framed_lines_json_cannot_hold_make_the_report_malformed(body: str) -> None:
    stdout = f'n0 {body}\nn0 {{"i": 0, "value": 1}}\nn0 {{"done": 1}}\n'
    assert parse_report(stdout, "n0", 1).malformed


def test_a_record_cut_by_the_output_cap_is_only_missing() -> None:
    stdout = 'n0 {"i": 0, "value": 1}\nn0 {"i": 1, "value": [1, 2, 3'
    report = parse_report(stdout, "n0", 2)
    assert report.malformed is None and list(report.records) == [0] and not report.done


def test_integers_expected_are_matched_exactly() -> None:
    assert not values_match(1e9, 1000000007, CALL)  # a relative tolerance would pass it
    assert values_match(1000000007.0, 1000000007, CALL) and values_match(3.0, 3, CALL)
    assert not values_match(float(10**30), 10**30 + 1, CALL)
    assert not values_match(7.0000001, 7, CALL) and not values_match(6.9999999, 7, CALL)
    assert values_match(complex(3, 0), 3, CALL) and not values_match(complex(3, 1e-9), 3, CALL)
    # An expected float keeps the tolerance, and a huge integer never overflows the comparison.
    assert values_match(7, 7.0000001, CALL)
    assert not values_match(10**400, 0.5, CALL) and not values_match(10**400, complex(1, 1), CALL)
    assert not values_match(-(10**400), float("-inf"), CALL)


def test_integer_tokens_expected_are_matched_exactly() -> None:
    io = CodeTests(mode="stdio")
    assert not stdout_matches("1e9", "1000000007", io)
    assert not stdout_matches("1000000006.9999999", "1000000007", io)
    assert not stdout_matches("7.0000001", "7", io)
    assert stdout_matches("1000000007.0", "1000000007", io) and stdout_matches("7e0", "7", io)
    assert stdout_matches("-0", "0", io) and stdout_matches("+5", "5", io) and stdout_matches("-05", "-5", io)
    assert not stdout_matches("\u0661\u0662\u0663", "123", io)  # Arabic-Indic digits are not a number here
    assert not stdout_matches("1e999999999999999999999", "5", io)
    assert stdout_matches("3", "3.0000001", io)  # an expected float keeps the tolerance
