"""Execution-trace prediction (CWM's world modelling): given a Python function and a call, predict
the lines it executes and its local variables at each step.

Tasks come from the code datasets: each MBPP or HumanEval solution with the first test call whose
arguments are literals. The ground truth is produced by `envs/exec_trace_tracer.py` under
`sys.settrace` in the sandbox (computed once per task, then cached). Reward: the fraction of
steps predicted exactly, position by position, over the longer of the two traces.

The trace format shown to the model (one step per line, between <trace> and </trace>):

    <line number>: <name>=<value>, <name>=<value>     a line about to run, with the function's
                                                      locals at that moment (alphabetical, repr)
    exception: <ExceptionType>                        an exception raised in the function
    return: <value>                                   the function returns
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from envs.base import Action, EnvParams, Environment, Message, Observation, StepResult, Task
from envs.code import SandboxParams, sandbox_pool
from envs.code_datasets import CodeProblem, load_humaneval, load_mbpp
from envs.data import resolve
from envs.exec_trace_tracer import MAX_REPR
from envs.registry import register_env

TRACER_SOURCE = (Path(__file__).parent / "exec_trace_tracer.py").read_bytes()
_TRACE_BLOCK = re.compile(r"<trace>(.*?)(?:</trace>|\Z)", re.DOTALL)
_SOURCES = {"mbpp": (load_mbpp, "mbpp/mbpp.jsonl"), "humaneval": (load_humaneval, "humaneval/HumanEval.jsonl")}


class ExecTraceParams(EnvParams):
    """Parameters of the execution-trace environment."""

    source: Literal["mbpp", "humaneval"] = "mbpp"
    """Which code dataset supplies the functions and calls (its file: the env's `data`)."""
    max_steps: int = Field(40, ge=1, le=1000)
    """Steps asked for at most; longer executions are cut to their first `max_steps` steps."""
    timeout_s: float = Field(10.0, gt=0)
    """Wall-clock limit of the tracing run in the sandbox."""
    sandbox: SandboxParams = Field(default_factory=SandboxParams)
    """Which sandbox pool runs the tracer."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N tasks."""


def render_step(step: list[Any]) -> str:
    """One tracer step in the textual format of the prompt."""
    if step[0] == "line":
        names = ", ".join(f"{name}={value}" for name, value in step[2])
        return f"{step[1]}: {names}".rstrip()
    return f"{step[0]}: {step[1]}"


def parse_trace(text: str) -> list[str] | None:
    """The predicted steps (whitespace-normalised lines inside the last <trace> block); None when
    the reply has no <trace> block."""
    blocks = _TRACE_BLOCK.findall(text)
    if not blocks:
        return None
    return [" ".join(line.split()) for line in blocks[-1].splitlines() if line.strip()]


def score(predicted: list[str], gold: list[str]) -> float:
    """Share of positions where the predicted step equals the true step, over the longer trace."""
    longest = max(len(predicted), len(gold))
    if longest == 0:
        return 1.0
    same = sum(p == " ".join(g.split()) for p, g in zip(predicted, gold))
    return same / longest


def _literal_call(node: ast.AST, callee: str) -> bool:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == callee):
        return False
    try:
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            ast.literal_eval(arg)
    except (ValueError, TypeError, SyntaxError):
        return False
    return not any(isinstance(a, ast.Starred) for a in node.args)


def first_call(problem: CodeProblem) -> tuple[str, str] | None:
    """(entry function, call source) of the problem's first test call, with literal arguments,
    of a function the solution defines at top level (not a class, not a builtin wrapper)."""
    if problem.tests.record is not None:  # HumanEval: calls to `candidate` inside check()
        entry = problem.tests.record.entry
        tree, callees = ast.parse(problem.tests.record.program), {"candidate"}
    else:
        entry, tree = None, ast.parse("\n".join(problem.tests.probes))
        with warnings.catch_warnings():  # MBPP solutions hold invalid escapes like "\d"
            warnings.simplefilter("ignore", DeprecationWarning)
            gold = ast.parse(problem.gold)
        callees = {n.name for n in gold.body if isinstance(n, ast.FunctionDef)}
    for node in ast.walk(tree):
        name = node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else None
        if name in callees and _literal_call(node, name):
            entry = entry or name
            node.func = ast.Name(entry, ast.Load())
            return entry, ast.unparse(node)
    return None


def _numbered(program: str) -> str:
    return "\n".join(f"{i:>3} | {line}" for i, line in enumerate(program.splitlines(), 1))


def _prompt(program: str, entry: str, call: str, max_steps: int) -> str:
    return (
        "Predict how this Python program executes the call below.\n\n"
        f"```\n{_numbered(program)}\n```\n\nCall: `{call}`\n\n"
        f"List, in order, every line of `{entry}` that executes, one step per line:\n"
        "  <line number>: <name>=<value>, <name>=<value>\n"
        f"with the local variables of `{entry}` right before that line runs, in alphabetical "
        f"order, each value as Python's repr (longer than {MAX_REPR} characters: its first "
        f'{MAX_REPR - 3} and "..."); no variables yet: just `<line number>:`. Lines inside '
        "other functions it calls are not listed. An exception raised in it is a step "
        "`exception: <ExceptionType>`; the last step is `return: <value>`.\n"
        f"Write at most {max_steps} steps, between <trace> and </trace>."
    )


def trace_tasks(problems: list[CodeProblem], max_steps: int) -> list[Task]:
    """One task per problem that has a gold solution and a test call with literal arguments."""
    tasks = []
    for problem in problems:
        found = first_call(problem) if problem.gold else None
        if found is None:
            continue
        entry, call = found
        program = problem.gold.replace("\r\n", "\n").expandtabs(4)
        tasks.append(
            Task(
                id=f"trace/{problem.id}",
                prompt=[Message(role="user", content=_prompt(program, entry, call, max_steps))],
                hidden={"program": program, "entry": entry, "call": call},
                meta={"source_task": problem.id},
            )
        )
    return tasks


class TraceFailed(Exception):
    """The ground-truth trace could not be produced (sandbox failure or a program that breaks)."""


_Step = tuple[Literal["line"], int, list[tuple[str, str]]] | tuple[Literal["exception", "return"], str]


class TracerReport(BaseModel):
    """What `exec_trace_tracer.py` prints as its last line."""

    model_config = ConfigDict(extra="forbid", strict=True)

    steps: list[_Step]
    """The steps of the traced call: ["line", n, [[name, repr], ...]], ["exception", type] or
    ["return", repr]."""
    truncated: bool
    """Whether the call ran past the step budget."""


def read_trace(stdout: bytes, max_steps: int) -> list[str]:
    """The rendered steps of the tracer's report: the last line of its stdout (the traced program
    may print before it), validated, since nothing read from a sandbox is trusted. TraceFailed
    when it is not a tracer report."""
    lines = stdout.strip().splitlines()
    try:
        report = TracerReport.model_validate_json(lines[-1] if lines else b"")
    except ValidationError as exc:  # bad JSON and deep nesting included
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "report"
        raise TraceFailed(f"the tracer's report is malformed ({where}: {first['msg']})"[:300]) from None
    if len(report.steps) > max_steps:
        raise TraceFailed(
            f"the tracer's report is malformed: {len(report.steps)} steps, over the {max_steps} asked for"
        )
    return [render_step(list(step)) for step in report.steps]


_truth_cache: dict[str, list[str]] = {}


@register_env("exec_trace")
class ExecTraceEnv(Environment):
    """Predict a function's execution trace (lines and locals), graded against sys.settrace."""

    Params = ExecTraceParams

    @classmethod
    def load_tasks(cls, params: ExecTraceParams, data: Path | None, split: str) -> Sequence[Task]:
        """Tasks from the source dataset's file (one split: `split` is not used)."""
        loader, default = _SOURCES[params.source]
        return trace_tasks(loader(resolve(data, default)), params.max_steps)[: params.limit]

    async def reset(self, task: Task) -> Observation:
        self.task = task
        return Observation(messages=task.prompt)

    async def ground_truth(self) -> list[str]:
        """The true trace of this task's call, rendered; run in the sandbox once, then cached."""
        from workers.sandbox import ExecRequest, Status

        hidden = self.task.hidden
        key = json.dumps([hidden, self.params.max_steps], sort_keys=True)
        if key in _truth_cache:
            return _truth_cache[key]
        spec = {
            "program": "program.py",
            "entry": hidden["entry"],
            "call": hidden["call"],
            "max_steps": self.params.max_steps,
        }
        pool = await sandbox_pool(self.params.sandbox)
        result = await pool.run(
            ExecRequest(
                command=["python3", "tracer.py", "spec.json"],
                timeout_s=self.params.timeout_s,
                env={"PYTHONHASHSEED": "0"},
                fast_path=False,  # reprs of string sets: one order
                files={
                    "tracer.py": TRACER_SOURCE,
                    "program.py": hidden["program"].encode(),
                    "spec.json": json.dumps(spec).encode(),
                },
            )
        )
        if result.status != Status.OK:
            raise TraceFailed(
                f"tracer ended as {result.status.value}: "
                f"{(result.error or result.stderr.decode('utf-8', 'replace'))[-300:]}"
            )
        _truth_cache[key] = read_trace(result.stdout, self.params.max_steps)
        return _truth_cache[key]

    async def step(self, action: Action) -> StepResult:
        try:
            gold = await self.ground_truth()
        except TraceFailed as exc:
            return StepResult(done=True, reward=None, info={"error": str(exc)})
        predicted = parse_trace(action.text)
        if predicted is None:
            return StepResult(done=True, reward=0.0, info={"error": "no <trace> block", "steps": len(gold)})
        info = {"steps": len(gold), "predicted_steps": len(predicted)}
        return StepResult(done=True, reward=score(predicted, gold), info=info)

    async def gold_output(self, task: Task) -> str:
        """The true trace in the prompt's format (for `codeworld envs validate`)."""
        return "<trace>\n" + "\n".join(await self.ground_truth()) + "\n</trace>"
