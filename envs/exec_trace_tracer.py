"""Runs inside the sandbox: execute one call under `sys.settrace` and print its trace as JSON.

Shipped as a file by `envs.exec_trace` (standard library only). Only the called function's own
frame is traced: the lines it executes, its local variables before each line, exceptions it
raises or catches, and its return value. Calls it makes (recursive ones included) run untraced.
Values are Python reprs with memory addresses removed, cut to `MAX_REPR` characters.
"""

from __future__ import annotations

import json
import re
import sys

MAX_REPR = 100
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class _Enough(BaseException):
    """Stops the traced call once the step budget is spent."""


def short_repr(value) -> str:
    """repr without memory addresses, at most MAX_REPR characters (longer: cut, then "...")."""
    try:
        text = _ADDRESS.sub("", repr(value))
    except Exception as exc:  # a broken __repr__ is part of the program's behaviour
        text = f"<repr failed: {type(exc).__name__}>"
    return text if len(text) <= MAX_REPR else text[: MAX_REPR - 3] + "..."


def trace_call(namespace: dict, entry: str, call: str, max_steps: int) -> dict:
    """Evaluate `call` in `namespace`, tracing the frame of `entry`'s code object."""
    target = namespace[entry].__code__
    steps: list = []
    root = None

    def on_event(frame, event, arg):
        if event == "line":
            local_vars = sorted((k, short_repr(v)) for k, v in frame.f_locals.items())
            steps.append(["line", frame.f_lineno, local_vars])
        elif event == "exception":
            steps.append(["exception", arg[0].__name__])
        elif event == "return" and (not steps or steps[-1][0] != "exception"):
            steps.append(["return", short_repr(arg)])
        if len(steps) > max_steps:
            raise _Enough()
        return on_event

    def on_call(frame, event, arg):
        nonlocal root
        if root is None and frame.f_code is target:
            root = frame
            return on_event
        return None

    sys.settrace(on_call)
    try:
        eval(compile(call, "call", "eval"), namespace)
    except _Enough:
        pass
    except Exception:
        pass  # an exception leaving the function is already a step
    finally:
        sys.settrace(None)
    return {"steps": steps[:max_steps], "truncated": len(steps) > max_steps}


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    namespace = {"__name__": "traced"}
    with open(spec["program"]) as f:
        exec(compile(f.read(), spec["program"], "exec"), namespace)
    result = trace_call(namespace, spec["entry"], spec["call"], int(spec["max_steps"]))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
