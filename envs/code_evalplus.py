"""The input format of MBPP+ (EvalPlus), which JSON cannot carry as is.

MBPP+ stores tuples, sets and complex numbers as JSON lists and strings; EvalPlus's loader
(`mbpp_deserialize_inputs` in evalplus/data/mbpp.py) turns them back per task. The rules below
restate that format, task by task, so that reference and candidate receive the argument types
the problem was written for. Three tasks return `re.Match` objects, which EvalPlus judges only
by whether the result is None.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

NOT_NONE_ENTRIES = frozenset({"check_str", "text_match_three", "text_starta_endb"})
"""Entry points judged on `result is not None` (they return regex match objects)."""

Args = list[Any]


def _deep_tuple(value: Any) -> Any:
    return tuple(_deep_tuple(v) for v in value) if isinstance(value, list) else value


def _each_tuple(args: Args) -> Args:
    return [tuple(a) for a in args]


def _each_tuple_list(args: Args) -> Args:
    return [[tuple(x) for x in a] for a in args]


def _rules() -> dict[int, Callable[[Args], Any]]:
    table: dict[int, Callable[[Args], Any]] = {}
    groups: list[tuple[set[int], Callable[[Args], Any]]] = [
        (
            {
                2,
                116,
                132,
                143,
                222,
                261,
                273,
                394,
                399,
                421,
                424,
                429,
                470,
                560,
                579,
                596,
                616,
                630,
                726,
                740,
                744,
                809,
            },
            _each_tuple,
        ),
        ({63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780}, _each_tuple_list),
        ({75, 413, 444, 753}, lambda a: [[tuple(x) for x in a[0]], a[1]]),
        ({106, 750}, lambda a: [a[0], tuple(a[1])]),
        ({250, 405, 446, 617, 720, 763, 808}, lambda a: [tuple(a[0]), a[1]]),
        ({259, 401, 445}, lambda a: [tuple(tuple(x) for x in arg) for arg in a]),
        ({580, 615, 791}, _deep_tuple),
        # An empty member becomes {} (an empty dict), as in EvalPlus.
        ({115}, lambda a: [[set(x) if isinstance(x, list) and x else {} for x in a[0]]]),
        ({124}, lambda a: [float(a[0]), complex(a[1])]),
        ({252}, lambda a: [complex(a[0])]),
        ({278}, lambda a: [tuple(tuple(x) if isinstance(x, list) else x for x in a[0])]),
        ({307}, lambda a: [tuple(a[0]), a[1], a[2]]),
        ({722}, lambda a: [{k: tuple(v) for k, v in a[0].items()}, *a[1:]]),
    ]
    for numbers, rule in groups:
        table.update(dict.fromkeys(numbers, rule))
    return table


_RULES = _rules()


def restore_inputs(task_id: str, inputs: list[Args]) -> list[Any]:
    """The argument lists of MBPP+ task `task_id` ("Mbpp/123") with their Python types back."""
    rule = _RULES.get(int(task_id.rsplit("/", 1)[-1]))
    return [rule(args) for args in inputs] if rule else inputs
