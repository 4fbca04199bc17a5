"""The program that runs inside the sandbox to exercise a candidate solution on test inputs.

`reward.code` ships this file's own source into the sandbox, so it uses the standard library only.
Expected outputs never reach it: it reports what the candidate produced and the host compares.
Reports go to a private copy of stdout, one line per record, each prefixed with a nonce that the
host sends on stdin; whatever the candidate prints is discarded or captured separately, so a
program cannot forge a report by printing. The host imports `encode`/`decode` from here so that
values produced in the sandbox and values read from a dataset share one canonical form.

Modes (field "mode" of the spec file):
* "call": import the candidate as a module, run the setup source, evaluate each probe expression
  (e.g. ``add(*[1, 2])``) and report its value in canonical JSON.
* "stdio": run the candidate in a separate (forked) process once per test input and report its
  stdout.
* "record": run a trusted program with a dataset's own test code (e.g. HumanEval's
  ``check(candidate)``) through a recorder that reports every call's arguments, as a probe
  expression, and the returned value; the dataset's asserts run as written.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import runpy
import selectors
import signal
import sys
import threading
import time

MAX_DEPTH = 64
WALL_FACTOR = 3.0  # a test's wall-clock allowance, in multiples of its CPU-time limit
MAX_INT_DIGITS = 4000
MAX_ERROR_CHARS = 400


def _int_fits(value: int) -> bool:
    return value.bit_length() <= MAX_INT_DIGITS * 3.33


class Unencodable(Exception):
    """The value has a type the canonical form does not admit (e.g. a custom class)."""


class _TestTimeout(BaseException):
    """Raised by the per-test timer; a BaseException so that `except Exception` cannot swallow it."""


def _encode_scalar(value):
    # Exact builtin types and their subclasses are read through the builtin's own methods, so an
    # overridden __eq__/__str__/__iter__ on a subclass has no say in what gets reported.
    if isinstance(value, bool):
        return value is True
    if isinstance(value, int):
        value = int.__index__(value)
        if not _int_fits(value):
            raise Unencodable("integer with more than 4000 digits")
        return value
    if isinstance(value, float):
        value = float.__float__(value)
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes__": bytes(value).hex()}
    if isinstance(value, complex):
        value = complex.__complex__(value)
        return {"__complex__": [_encode_scalar(value.real), _encode_scalar(value.imag)]}
    raise Unencodable(f"unsupported return type {type(value).__name__}")


def to_source(value, _depth: int = 0) -> str:
    """Python source that rebuilds `value` (builtin data types only), for probe expressions."""
    if _depth > MAX_DEPTH:
        raise Unencodable(f"value nested deeper than {MAX_DEPTH}")
    depth = _depth + 1
    if value is None or isinstance(value, bool):
        return repr(value is True if value is not None else None)
    if isinstance(value, int):
        return repr(int.__index__(value))
    if isinstance(value, str):
        return repr(str.__str__(value))
    if isinstance(value, (bytes, bytearray)):
        return repr(bytes(value))
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else f"float({repr(value)!r})"
    if isinstance(value, complex):
        return f"complex({to_source(value.real)}, {to_source(value.imag)})"
    if isinstance(value, list):
        return "[" + ", ".join(to_source(v, depth) for v in value) + "]"
    if isinstance(value, tuple):
        items = [to_source(v, depth) for v in value]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if isinstance(value, (set, frozenset)):
        inner = "[" + ", ".join(to_source(v, depth) for v in value) + "]"
        return f"{type(value).__name__}({inner})"
    if isinstance(value, dict):
        pairs = [f"{to_source(k, depth)}: {to_source(v, depth)}" for k, v in value.items()]
        return "{" + ", ".join(pairs) + "}"
    raise Unencodable(f"cannot write a {type(value).__name__} argument as source")


def _sort_key(encoded) -> str:
    return json.dumps(encoded, sort_keys=True)


def encode(value, _depth: int = 0):
    """Canonical JSON of a Python value: JSON scalars and lists as they are; tuples, sets, dicts,
    bytes, complex numbers and non-finite floats as one-key tagged objects."""
    if _depth > MAX_DEPTH:
        raise Unencodable(f"value nested deeper than {MAX_DEPTH}")
    if value is None:
        return None
    depth = _depth + 1
    if isinstance(value, list):
        return [encode(v, depth) for v in list.__iter__(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, depth) for v in tuple.__iter__(value)]}
    if isinstance(value, (set, frozenset)):
        members = set.__iter__(value) if isinstance(value, set) else frozenset.__iter__(value)
        items = [encode(v, depth) for v in members]
        return {"__set__": sorted(items, key=_sort_key)}
    if isinstance(value, dict):
        pairs = [[encode(k, depth), encode(v, depth)] for k, v in dict.items(value)]
        return {"__dict__": sorted(pairs, key=lambda kv: _sort_key(kv[0]))}
    return _encode_scalar(value)


def _freeze(value):
    """Make a decoded value hashable so that it can sit in a set or be a dict key."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, set):
        return frozenset(value)
    if isinstance(value, dict):
        return tuple(sorted(((_freeze(k), _freeze(v)) for k, v in value.items()), key=repr))
    return value


class Undecodable(ValueError):
    """A value is not in the canonical form: `encode` cannot have written it (a forged or
    corrupted report). The host fails the record that holds it."""


_NON_FINITE = ("nan", "inf", "-inf")
_HEX = re.compile(r"(?:[0-9a-f]{2})*\Z")


def _members(body, what: str) -> list:
    if type(body) is not list:
        raise Undecodable(f"{what} body is not a list")
    return body


def _real(encoded) -> float:
    """One part of an encoded complex number: a float, or a tagged non-finite float."""
    if type(encoded) is float:
        return encoded
    if type(encoded) is dict and len(encoded) == 1 and encoded.get("__float__") in _NON_FINITE:
        return float(encoded["__float__"])
    raise Undecodable("a complex part is not a float")


def _decode_tagged(tag: str, body, depth: int):
    if tag == "__tuple__":
        return tuple(decode(v, depth) for v in _members(body, tag))
    if tag == "__set__":
        return {_freeze(decode(v, depth)) for v in _members(body, tag)}
    if tag == "__dict__":
        pairs = _members(body, tag)
        if any(type(pair) is not list or len(pair) != 2 for pair in pairs):
            raise Undecodable("a __dict__ item is not a [key, value] pair")
        return {_freeze(decode(k, depth)): decode(v, depth) for k, v in pairs}
    if tag == "__float__":
        if body not in _NON_FINITE:
            raise Undecodable("a __float__ body is not nan, inf or -inf")
        return float(body)
    if tag == "__bytes__":
        if type(body) is not str or not _HEX.match(body):
            raise Undecodable("a __bytes__ body is not lowercase hex")
        return bytes.fromhex(body)
    if tag == "__complex__":
        parts = _members(body, tag)
        if len(parts) != 2:
            raise Undecodable("a __complex__ body is not [real, imag]")
        return complex(_real(parts[0]), _real(parts[1]))
    raise Undecodable(f"unknown canonical tag {tag[:40]!r}")


def decode(encoded, _depth: int = 0):
    """Inverse of `encode`: canonical JSON back to the Python value (pure data, no code runs).

    Total and bounded, because the host decodes what a sandbox reported: anything `encode`
    cannot have written (unknown or extra tags, wrong arity, bad hex, NaN literals, integers over
    MAX_INT_DIGITS digits, nesting deeper than MAX_DEPTH, non-JSON types) raises Undecodable and
    nothing else."""
    if _depth > MAX_DEPTH:
        raise Undecodable(f"value nested deeper than {MAX_DEPTH}")
    kind = type(encoded)
    if encoded is None or kind is bool or kind is str:
        return encoded
    if kind is int:
        if not _int_fits(encoded):
            raise Undecodable(f"integer with more than {MAX_INT_DIGITS} digits")
        return encoded
    if kind is float:
        if not math.isfinite(encoded):
            raise Undecodable("a non-finite float outside its __float__ tag")
        return encoded
    if kind is list:
        return [decode(v, _depth + 1) for v in encoded]
    if kind is not dict or len(encoded) != 1:
        raise Undecodable(f"{kind.__name__} is not a canonical value")
    ((tag, body),) = encoded.items()
    return _decode_tagged(tag, body, _depth + 1)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]


class _Reporter:
    """Writes nonce-framed records to a private duplicate of the original stdout."""

    def __init__(self, nonce: bytes) -> None:
        self._fd = os.dup(1)
        self._nonce = nonce

    def emit(self, record: dict) -> None:
        # The leading newline ends any partial line a candidate may have written to the same pipe.
        line = b"\n" + self._nonce + b" " + json.dumps(record).encode() + b"\n"
        os.write(self._fd, line)


def _silence_candidate_io() -> None:
    """Point the candidate's stdin/stdout at /dev/null, at both the Python and the fd level."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    sys.stdin = open(os.devnull)
    sys.stdout = open(os.devnull, "w")


def _on_alarm(signum, frame):
    raise _TestTimeout()


def _arm(cpu_s: float) -> None:
    """Start a test's limits: CPU time (load-independent) and a looser wall-clock bound (for
    programs that sleep or block). Zero disarms both."""
    signal.setitimer(signal.ITIMER_PROF, cpu_s)
    signal.setitimer(signal.ITIMER_REAL, cpu_s * WALL_FACTOR)


def _run_call(spec: dict, report: _Reporter) -> None:
    _silence_candidate_io()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGPROF, _on_alarm)
    per_test = float(spec["timeout_per_test"])
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        _arm(per_test)
        with open(spec["program"]) as f:
            source = f.read()
        exec(compile(source, "solution.py", "exec"), namespace)
        if spec.get("setup"):
            exec(compile(spec["setup"], "setup.py", "exec"), namespace)
        _arm(0)
    except BaseException as exc:  # SystemExit, SkipTest, timeouts: all mean the program failed
        _arm(0)
        report.emit({"load_error": _error_text(exc)})
        return
    for i, probe in enumerate(spec["probes"]):
        report.emit(_probe_record(i, probe, namespace, per_test, int(spec["max_output_bytes"])))
    report.emit({"done": len(spec["probes"])})


def _probe_record(i: int, probe: str, namespace: dict, timeout: float, cap: int) -> dict:
    start = time.perf_counter()
    try:
        _arm(timeout)
        value = eval(compile(probe, f"probe{i}", "eval"), namespace)
        _arm(0)
        encoded = encode(value)
    except _TestTimeout:
        return {"i": i, "error": f"time limit exceeded ({timeout} s CPU)"}
    except BaseException as exc:
        _arm(0)
        return {"i": i, "error": _error_text(exc)}
    if len(json.dumps(encoded)) > cap:
        return {"i": i, "error": f"returned value over {cap} bytes as JSON"}
    return {"i": i, "value": encoded, "s": round(time.perf_counter() - start, 6)}


def _run_record(spec: dict, report: _Reporter) -> None:
    _silence_candidate_io()
    namespace = {"__name__": "reference", "__builtins__": __builtins__}
    count = 0
    target = None

    def recorder(*args, **kwargs):
        nonlocal count
        # Arguments are written down before the call: the function may mutate them.
        probe = f"{spec['entry']}(*{to_source(list(args))}, **{to_source(kwargs)})"
        value = target(*args, **kwargs)
        report.emit({"i": count, "probe": probe, "value": encode(value)})
        count += 1
        return value

    try:
        with open(spec["program"]) as f:
            exec(compile(f.read(), "reference.py", "exec"), namespace)
        target = namespace[spec["entry"]]
        namespace["__record__"] = recorder
        eval(compile(spec["check"], "check", "eval"), namespace)
    except BaseException as exc:
        report.emit({"check_error": _error_text(exc)})
    report.emit({"recorded": count})


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the child leads its own session: its children die too
    except ProcessLookupError:
        pass


def _read_capped(fd: int, pid: int, cap: int, deadline: float) -> tuple[bytes, bool, bool]:
    """Read the child's stdout up to `cap` bytes until it closes or the deadline passes.
    Returns (output, truncated, timed_out); kills the child on truncation or timeout."""
    chunks, size = [], 0
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            _kill(pid)
            return b"".join(chunks), False, True
        if not sel.select(timeout=left):
            continue
        data = os.read(fd, 65536)
        if not data:
            return b"".join(chunks), False, False
        chunks.append(data)
        size += len(data)
        if size > cap:
            _kill(pid)
            return b"".join(chunks)[:cap], True, False


def _become_program(program: str, stdin_fd: int, stdout_fd: int, cpu_s: float) -> None:
    """In the forked child: run `program` as __main__ on the given pipes, then exit. Forking the
    already-started harness costs ~1 ms where a new interpreter costs ~30-100 ms per test."""
    code = 1
    try:
        os.setsid()
        soft = max(1, math.ceil(cpu_s))
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))
        os.dup2(stdin_fd, 0)
        os.dup2(stdout_fd, 1)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # the report fd too
        sys.stdin, sys.stdout = open(0, closefd=False), open(1, "w", closefd=False)
        sys.stderr, sys.argv = open(2, "w", closefd=False), [program]
        runpy.run_path(program, run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        code = 1
    finally:
        try:
            sys.stdout.flush()
        except BaseException:
            pass  # output the program left unflushed on a broken pipe is lost, as in a real run
        os._exit(code)


def _feed(fd: int, data: bytes) -> None:
    """Write the test's stdin to the child (in a thread: the child may read it slowly)."""
    try:
        with open(fd, "wb", closefd=False) as pipe:
            pipe.write(data)
    except BrokenPipeError:
        pass  # the program exited without reading all its input; its output still counts
    finally:
        os.close(fd)


def _run_one_stdio(i: int, program: str, stdin: str, timeout: float, cap: int) -> dict:
    start = time.monotonic()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _become_program(program, in_r, out_w, timeout)
    os.close(in_r)
    os.close(out_w)
    feeder = threading.Thread(target=_feed, args=(in_w, stdin.encode()), daemon=True)
    feeder.start()
    out, truncated, timed_out = _read_capped(out_r, pid, cap, start + timeout * WALL_FACTOR)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    os.close(out_r)
    feeder.join()  # no thread may be mid-write when the next test forks
    timed_out |= code == -signal.SIGXCPU
    record = {"i": i, "stdout": out.decode("utf-8", "replace"), "exit": code, "s": round(time.monotonic() - start, 6)}
    if timed_out:
        record["error"] = f"time limit exceeded ({timeout} s CPU)"
    elif truncated:
        record["error"] = f"output over {cap} bytes"
    elif code != 0:
        record["error"] = f"exit code {code}"
    return record


def _run_stdio(spec: dict, report: _Reporter) -> None:
    for i, stdin in enumerate(spec["inputs"]):
        report.emit(
            _run_one_stdio(i, spec["program"], stdin, float(spec["timeout_per_test"]), int(spec["max_output_bytes"]))
        )
    report.emit({"done": len(spec["inputs"])})


def main() -> None:
    nonce = sys.stdin.buffer.readline().strip()
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    report = _Reporter(nonce)
    run = {"call": _run_call, "stdio": _run_stdio, "record": _run_record}[spec["mode"]]
    run(spec, report)
    os._exit(0)  # skip interpreter teardown: candidate atexit hooks must not add output


if __name__ == "__main__":
    main()
