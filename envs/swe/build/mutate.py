"""AST-level bug injection: enumerate small, single-site mutations of a Python source file.

Each mutation rewrites one node on one line and splices `ast.unparse` of the mutated node back
into the original text at the node's exact position, so the rest of the file (comments,
formatting) is untouched and the gold fix is a one-line diff.
"""

from __future__ import annotations

import ast
import random
from collections.abc import Callable, Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict

MutationKind = Literal[
    "flip_comparison", "off_by_one", "swap_operands", "drop_return", "negate_condition", "swap_boolop"
]

_FLIP_COMPARE: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.In: ast.NotIn, ast.NotIn: ast.In,
}  # fmt: skip
# Only non-commutative operators: swapping `a + b` on numbers would change nothing.
_NON_COMMUTATIVE = (ast.Sub, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.LShift, ast.RShift)


class Mutation(BaseModel):
    """One injected bug: where it is and what the line becomes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    """File path relative to the repository root."""
    kind: MutationKind
    """Which rewrite was applied."""
    lineno: int
    """1-based line of the mutated node."""
    original: str
    """The node's source text before the mutation."""
    mutated: str
    """The node's source text after the mutation."""
    source: str
    """The whole mutated file."""


def _flip_comparison(node: ast.AST) -> ast.AST | None:
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _FLIP_COMPARE:
        return ast.Compare(node.left, [_FLIP_COMPARE[type(node.ops[0])]()], node.comparators)
    return None


def _off_by_one(node: ast.AST) -> ast.AST | None:
    # bool is an int subclass; True + 1 would be a type change, not an off-by-one.
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value in range(0, 100):
        return ast.Constant(node.value + 1 if node.value == 0 else node.value - 1)
    return None


def _swap_operands(node: ast.AST) -> ast.AST | None:
    if isinstance(node, ast.BinOp) and isinstance(node.op, _NON_COMMUTATIVE):
        return ast.BinOp(node.right, node.op, node.left)
    return None


def _drop_return(node: ast.AST) -> ast.AST | None:
    if isinstance(node, ast.Return) and node.value is not None:
        if isinstance(node.value, ast.Constant) and node.value.value is None:
            return None
        return ast.Return(ast.Constant(None))
    return None


def _negate_condition(node: ast.AST) -> ast.AST | None:
    # Applied to the condition of an `if`/`while`, never to the whole statement. Comparisons are
    # left to flip_comparison, and constant conditions (`while True`) would only hang the tests.
    if not isinstance(node, (ast.If, ast.While)) or isinstance(node.test, (ast.Compare, ast.Constant)):
        return None
    if isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not):
        return node.test.operand
    return ast.UnaryOp(ast.Not(), node.test)


def _swap_boolop(node: ast.AST) -> ast.AST | None:
    if isinstance(node, ast.BoolOp):
        return ast.BoolOp(ast.Or() if isinstance(node.op, ast.And) else ast.And(), node.values)
    return None


_REWRITES: dict[MutationKind, Callable[[ast.AST], ast.AST | None]] = {
    "flip_comparison": _flip_comparison,
    "off_by_one": _off_by_one,
    "swap_operands": _swap_operands,
    "drop_return": _drop_return,
    "negate_condition": _negate_condition,
    "swap_boolop": _swap_boolop,
}


def _target(node: ast.AST, kind: MutationKind) -> ast.AST:
    """The node whose text is replaced: for `negate_condition`, the condition, not the block."""
    return node.test if kind == "negate_condition" else node  # type: ignore[attr-defined]


def _splice(source: str, target: ast.AST, replacement: ast.AST) -> str:
    """Replace the single-line text span of `target` with `ast.unparse(replacement)`."""
    lines = source.splitlines(keepends=True)
    line = lines[target.lineno - 1]
    # col offsets are UTF-8 byte offsets.
    raw = line.encode()
    new = raw[: target.col_offset] + ast.unparse(replacement).encode() + raw[target.end_col_offset :]
    lines[target.lineno - 1] = new.decode()
    return "".join(lines)


def mutations(path: str, source: str) -> Iterator[Mutation]:
    """Every single-line mutation of `source` that still parses (rewrites build new nodes around
    the old children and never change the parsed tree, so one parse serves them all)."""
    for node in ast.walk(ast.parse(source)):
        for kind, rewrite in _REWRITES.items():
            replacement = rewrite(node)
            if replacement is None:
                continue
            target = _target(node, kind)
            if target.lineno != target.end_lineno:
                continue
            mutated_source = _splice(source, target, replacement)
            if mutated_source == source or not _parses(mutated_source):
                continue
            yield Mutation(
                path=path,
                kind=kind,
                lineno=target.lineno,
                original=ast.get_source_segment(source, target) or "",
                mutated=ast.unparse(replacement),
                source=mutated_source,
            )


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True


def sample_mutations(files: dict[str, str], seed: int) -> list[Mutation]:
    """All mutations of all `files` (path → source), shuffled reproducibly by `seed` so that the
    first few cover many files and kinds rather than the top of one file."""
    found = [m for path in sorted(files) for m in mutations(path, files[path])]
    random.Random(seed).shuffle(found)
    return found
