"""Loaders for the public code benchmarks: HumanEval, MBPP (full and sanitized), MBPP+, LeetCode
contest, APPS (the MapCoder 150-problem subset and the full release).

Each loader turns a file of the public format into `CodeProblem`s whose tests hold only inputs
for the sandbox and expected values for the host. Where a dataset writes its tests as asserts
(`assert f(x) == 3`), the call side becomes the probe and the literal side the expected value;
where it has no literal (HumanEval's `check` loops, MBPP+'s extra inputs), the expected values
come from running the dataset's own solution in the sandbox (see `reward.code_reference`).
"""

from __future__ import annotations

import ast
import gzip
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from envs.code_evalplus import NOT_NONE_ENTRIES, restore_inputs
from envs.data import read_records as _read_plain
from reward.code import CodeTests, RecordSpec
from reward.code_harness import encode, to_source

# Imports that LeetCode and APPS solutions take for granted (their own graders prepend them too).
COMMON_HEADER = (
    "import bisect, collections, functools, heapq, itertools, math, re, string, sys\n"
    "from typing import *\n"
    "from collections import *\n"
    "from functools import *\n"
    "from itertools import *\n"
    "from heapq import *\n"
    "from bisect import *\n"
    "from math import *\n"
)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON/JSONL file, or of a gzipped one (HumanEval ships as .jsonl.gz)."""
    if path.suffix != ".gz":
        return _read_plain(path)
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / path.stem
        plain.write_bytes(gzip.decompress(path.read_bytes()))
        return _read_plain(plain)


class CodeProblem(BaseModel):
    """One programming problem, ready to become a `Task`."""

    model_config = ConfigDict(extra="forbid")

    id: str
    """Dataset-unique id, e.g. "HumanEval/0"."""
    statement: str
    """What the model is asked (problem text, signature, output instructions)."""
    prefix: str = ""
    """Source placed before the model's code to form the program (HumanEval's prompt with its
    helpers and imports; common imports for LeetCode and APPS)."""
    tests: CodeTests
    """The hidden tests that decide the reward."""
    public: CodeTests | None = None
    """Separate example tests the model may see (APPS samples); None: the first hidden tests."""
    gold: str | None = None
    """The dataset's own complete solution program, when it has one (for `validate`)."""
    meta: dict[str, Any] = Field(default_factory=dict)
    """Source file, difficulty and similar facts."""


def _host_literal(node: ast.expr) -> tuple[bool, Any]:
    """Evaluate an expected-value expression on the host if it is pure data: a literal, or a
    literal passed through set/frozenset/tuple/list/dict/sorted. Returns (ok, value)."""
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    builders = {"set": set, "frozenset": frozenset, "tuple": tuple, "list": list, "dict": dict, "sorted": sorted}
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in builders
        and not node.keywords
        and len(node.args) <= 1
    ):
        if not node.args:
            return True, builders[node.func.id]()
        ok, inner = _host_literal(node.args[0])
        if ok:
            try:
                return True, builders[node.func.id](inner)
            except TypeError:
                return False, None
    return False, None


class _Inline(ast.NodeTransformer):
    """Replace reads of per-test variables (LeetCode's `test_input`) by their bound expression."""

    def __init__(self, bindings: dict[str, ast.expr]) -> None:
        self.bindings = bindings

    def visit_Constant(self, node: ast.Constant) -> ast.expr:
        return node  # leaves: skip the generic walk (LeetCode inputs hold ~10^5 constants)

    def visit_Name(self, node: ast.Name) -> ast.expr:
        # Sharing the bound node between probes is safe: the trees are only unparsed.
        if isinstance(node.ctx, ast.Load) and node.id in self.bindings:
            return self.bindings[node.id]
        return node


class _Split(BaseModel):
    """One assert, split into what runs in the sandbox and what stays on the host."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    probe: ast.expr
    """The side that calls the program under test."""
    expected: Any = None
    """The host-evaluated expected value."""
    literal: bool = True
    """False when the expected side is not pure data (then a reference solution decides)."""
    rel_tol: float | None = None
    """A relative tolerance the assert itself asks for (`math.isclose(..., rel_tol=r)`)."""


def _is_isclose(test: ast.expr) -> bool:
    return isinstance(test, ast.Call) and ast.unparse(test.func) in ("math.isclose", "isclose") and len(test.args) == 2


def _split_assert(test: ast.expr, where: str) -> _Split | None:
    """Split `assert A == B`, `assert math.isclose(A, B, rel_tol=r)`, `assert A` or
    `assert not A`; None for asserts on constants only."""
    if _host_literal(test)[0]:
        return None
    if _is_isclose(test):
        ok, value = _host_literal(test.args[1])
        if not ok:
            raise ValueError(f"{where}: `assert {ast.unparse(test)}` needs a literal expected value.")
        tol = {k.arg: ast.literal_eval(k.value) for k in test.keywords}.get("rel_tol", 1e-9)
        return _Split(probe=test.args[0], expected=value, rel_tol=float(tol))
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
        left, right = test.left, test.comparators[0]
        (left_ok, left_value), (right_ok, right_value) = _host_literal(left), _host_literal(right)
        if right_ok:
            return _Split(probe=left, expected=right_value)
        if left_ok:
            return _Split(probe=right, expected=left_value)
        return _Split(probe=left, literal=False)
    if isinstance(test, (ast.Compare, ast.BoolOp)):
        raise ValueError(
            f"{where}: test `assert {ast.unparse(test)}` is not of a supported form "
            "(`A == B`, `math.isclose(A, B)`, `A`, `not A`)."
        )
    negated = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
    operand = test.operand if negated else test
    # A bare assert asks for truthiness; bool() runs in the sandbox, on the program's value.
    probe = ast.Call(func=ast.Name("bool", ast.Load()), args=[operand], keywords=[])
    return _Split(probe=probe, expected=not negated)


def asserts_to_tests(source: str, where: str) -> CodeTests:
    """Turn a block of assert statements (see `_split_assert`) (with helper statements between
    them) into call-mode tests. Variables assigned more than once are per-test inputs and get
    inlined into the probes; everything else that is not an assert becomes setup."""
    module = ast.parse(source)
    counts = Counter(
        s.targets[0].id
        for s in module.body
        if isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name)
    )
    setup, bindings, probes, expected, all_literal = [], {}, [], [], True
    rel_tol = CodeTests.model_fields["rel_tol"].default
    for stmt in module.body:
        if isinstance(stmt, ast.Assert):
            split = _split_assert(stmt.test, where)
            if split is None:
                continue
            probes.append(ast.unparse(_Inline(bindings).visit(split.probe)))
            expected.append(encode(split.expected) if split.literal else None)
            all_literal &= split.literal
            rel_tol = max(rel_tol, split.rel_tol or 0.0)
        elif (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
            and counts[stmt.targets[0].id] > 1
        ):
            bindings[stmt.targets[0].id] = _Inline(bindings).visit(stmt.value)
        else:
            setup.append(ast.unparse(stmt))
    if not probes:
        raise ValueError(f"{where}: no assert with a call to test found.")
    return CodeTests(
        mode="call", setup="\n".join(setup), probes=probes, expected=expected if all_literal else None, rel_tol=rel_tol
    )


def _code_block(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def load_humaneval(path: Path) -> list[CodeProblem]:
    """HumanEval(.jsonl[.gz]): tests are recorded from the file's own `check(candidate)`."""
    problems = []
    for row in read_records(path):
        gold = row["prompt"] + row["canonical_solution"]
        record = RecordSpec(program=gold + "\n\n" + row["test"], entry=row["entry_point"], check="check(__record__)")
        statement = (
            "Complete the following Python function. Reply with the complete function "
            "in a ```python code block.\n\n" + _code_block(row["prompt"])
        )
        problems.append(
            CodeProblem(
                id=row["task_id"],
                statement=statement,
                prefix=row["prompt"],
                tests=CodeTests(mode="call", record=record),
                gold=gold,
                meta={"entry_point": row["entry_point"], "source": path.name},
            )
        )
    return problems


def load_mbpp(path: Path) -> list[CodeProblem]:
    """MBPP: the full release (`text`, `test_list`, `test_setup_code`) or the sanitized one
    (`prompt`, `test_list`, `test_imports`). The first test is shown to fix the signature."""
    problems = []
    for row in read_records(path):
        where = f"{path.name} task {row['task_id']}"
        setup = "\n".join(row.get("test_imports") or []) or row.get("test_setup_code", "")
        tests = asserts_to_tests(setup + "\n" + "\n".join(row["test_list"]), where)
        if tests.expected is None:
            tests.reference = row["code"]
        text = row.get("text") or row.get("prompt")
        statement = (
            f"{text}\nYour code should pass this test:\n{row['test_list'][0]}\n"
            "Reply with the Python function in a ```python code block."
        )
        problems.append(
            CodeProblem(
                id=f"mbpp/{row['task_id']}",
                statement=statement,
                tests=tests,
                gold=row["code"],
                meta={"source": path.name},
            )
        )
    return problems


def load_mbpp_plus(path: Path) -> list[CodeProblem]:
    """MBPP+ (EvalPlus): base and extra inputs (their Python types restored as EvalPlus does);
    expected values are the reference solution's outputs, compared with the row's `atol` when
    it sets one. Functions that return regex matches are judged on `is not None`."""
    problems = []
    for row in read_records(path):
        inputs = restore_inputs(row["task_id"], list(row["base_input"]) + list(row["plus_input"]))
        call = row["entry_point"] + "(*{})"
        if row["entry_point"] in NOT_NONE_ENTRIES:
            call = f"({call} is not None)"
        probes = [call.format(to_source(list(args))) for args in inputs]
        tests = CodeTests(mode="call", probes=probes, reference=row["canonical_solution"])
        if row.get("atol"):
            tests.abs_tol = float(row["atol"])
        statement = (
            row["prompt"].strip().strip('"').strip() + "\nReply with the Python function in a ```python code block."
        )
        problems.append(
            CodeProblem(
                id=row["task_id"],
                statement=statement,
                tests=tests,
                gold=row["canonical_solution"],
                meta={"entry_point": row["entry_point"], "source": path.name},
            )
        )
    return problems


def _leetcode_prefix(prompt: str) -> str:
    """The imports plus the helper classes (ListNode, TreeNode) the prompt defines before
    `class Solution`."""
    code = prompt.rsplit('"""', 1)[-1]
    helpers = code.split("class Solution", 1)[0]
    return COMMON_HEADER + helpers.strip() + "\n"


def load_leetcode(path: Path) -> list[CodeProblem]:
    """LeetCode contest (DeepSeek-Coder format): `prompt` ends in a `class Solution` stub and
    `test` is `test_input = {...}` / `assert my_solution.f(**test_input) == value` pairs."""
    problems = []
    for row in read_records(path):
        tests = asserts_to_tests(row["test"], f"{path.name} task {row['task_id']}")
        if tests.expected is None:
            raise ValueError(
                f"{path.name} task {row['task_id']}: tests without literal "
                "expected values need a reference solution, which this format lacks."
            )
        statement = (
            "Complete the class below. Reply with the complete class in a ```python "
            "code block.\n\n" + _code_block(row["prompt"])
        )
        problems.append(
            CodeProblem(
                id=row["task_id"],
                statement=statement,
                prefix=_leetcode_prefix(row["prompt"]),
                tests=tests,
                meta={"difficulty": row.get("meta", {}).get("difficulty"), "source": path.name},
            )
        )
    return problems


def _signature(starter: str) -> tuple[str, int, bool]:
    """(function name, parameter count, is a `Solution` method) of an APPS starter stub."""
    stub = starter.strip()
    for body in ("\n    pass", "\n        pass", ""):
        try:
            module = ast.parse(stub + body)
            break
        except SyntaxError:
            continue
    else:
        raise ValueError(f"APPS starter code {starter[:60]!r} does not parse as Python.")
    function = next(n for n in ast.walk(module) if isinstance(n, ast.FunctionDef))
    is_method = any(isinstance(n, ast.ClassDef) for n in module.body)
    return function.name, len(function.args.args) - int(is_method), is_method


def _literal_or_text(line: str) -> Any:
    try:
        return ast.literal_eval(line)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return line


def _subset_args(text: str, n_params: int) -> list[Any]:
    """Arguments of a MapCoder-subset call test. MapCoder wrote each argument with `str()` on
    its own line, which loses quotes: a line is a Python literal if it parses as one, else a
    string. Lines beyond the parameter count belong to a leading multi-line string argument."""
    if n_params == 0:
        return []
    lines = text.split("\n")
    extra = len(lines) - n_params
    if extra > 0:
        lines = ["\n".join(lines[: extra + 1])] + lines[extra + 1 :]
    return [_literal_or_text(line) for line in lines]


def _apps_tests(pairs: list[tuple[Any, Any]], starter: str, subset: bool) -> CodeTests:
    """Call tests when there is a starter signature, stdin/stdout tests otherwise."""
    if not starter.strip():
        inputs = ["\n".join(i) if isinstance(i, list) else str(i) for i, _ in pairs]
        expected = ["\n".join(map(str, o)) if isinstance(o, list) else str(o) for _, o in pairs]
        if subset:  # MapCoder kept the APPS output wrapped in a one-item list
            expected = [str(o[0]) if isinstance(o, list) and o else str(o) for _, o in pairs]
        return CodeTests(mode="stdio", inputs=inputs, expected=expected)
    name, n_params, is_method = _signature(starter)
    target = f"Solution().{name}" if is_method else name
    probes, expected = [], []
    for args, output in pairs:
        args = _subset_args(args, n_params) if subset else args
        probes.append(f"{target}(*{to_source(args)})")
        # APPS's own grader accepts the listed output or, for a one-item list, its item.
        accepted = [output] + ([output[0]] if isinstance(output, list) and output else [])
        expected.append([encode(a) for a in accepted])
    return CodeTests(mode="call", probes=probes, expected=expected, tuple_as_list=True, alternatives=True)


def _apps_statement(question: str, starter: str) -> str:
    if starter.strip():
        how = (
            "Write the function below (its arguments are given, its return value is checked). "
            "Reply with the code in a ```python code block.\n\n" + _code_block(starter)
        )
    else:
        how = (
            "Read the input from standard input and write the answer to standard output. "
            "Reply with a complete Python program in a ```python code block."
        )
    return f"{question.strip()}\n\n{how}"


def _apps_subset_problem(row: dict[str, Any]) -> CodeProblem:
    starter = row.get("starter_code") or ""
    hidden = [(t["input"], t["output"]) for t in row["test_list"]]
    public = [(t["input"], t["output"]) for t in row.get("sample_io") or []]
    return CodeProblem(
        id=f"apps/{row['id']}",
        statement=_apps_statement(row["description"], starter),
        prefix=COMMON_HEADER,
        tests=_apps_tests(hidden, starter, subset=True),
        public=_apps_tests(public, starter, subset=True) if public else None,
        meta={"difficulty": row.get("difficulty"), "source": "apps-mapcoder-subset"},
    )


def _apps_full_problem(row: dict[str, Any]) -> CodeProblem:
    starter = row.get("starter_code") or ""
    io = json.loads(row["input_output"]) if isinstance(row["input_output"], str) else row["input_output"]
    solutions = row.get("solutions")
    solutions = json.loads(solutions) if isinstance(solutions, str) else solutions
    if io.get("fn_name") and not starter.strip():
        starter = f"def {io['fn_name']}(*args):\n"
    pairs = list(zip(io["inputs"], io["outputs"]))
    return CodeProblem(
        id=f"apps/{row['problem_id']}",
        statement=_apps_statement(row["question"], starter),
        prefix=COMMON_HEADER,
        tests=_apps_tests(pairs, starter, subset=False),
        gold=COMMON_HEADER + solutions[0] if solutions else None,
        meta={"difficulty": row.get("difficulty"), "source": "apps"},
    )


def load_apps(path: Path) -> list[CodeProblem]:
    """APPS: the MapCoder subset (`description`, `test_list`, `sample_io`; no solutions) or the
    full release (`question`, `input_output`, `solutions` as JSON strings). Rows without tests
    are left out."""
    problems = []
    for row in read_records(path):
        if "test_list" in row:
            problems.append(_apps_subset_problem(row))
        elif row.get("input_output"):
            problems.append(_apps_full_problem(row))
    return problems
