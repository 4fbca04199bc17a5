"""Math answer verification: the final answer of a completion against the gold answer.

The prediction is read strictly (only its last `\\boxed{...}`, or a GSM8K-style `#### answer`
when asked), the gold answer leniently, and the two are compared by `math-verify`. Parsing runs in
worker processes of a `pebble` pool with a hard deadline: a hostile string (megabytes of braces,
`10^{10^{10}}`) gets its worker killed and replaced, and the caller gets *no reward* — `None`,
never 0 — so a verifier failure is counted and the sample dropped instead of punishing the model.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import threading
from concurrent.futures import TimeoutError as FutureTimeout

from pydantic import BaseModel, ConfigDict

MAX_ANSWER_CHARS = 2000  # longer "answers" are rejected on the host before any parsing
# Plain integers on both sides are compared on the host: math-verify would reach the same verdict
# (tested), and arithmetic-style tasks then spend no process round trip per sample. ASCII digits
# only: `int` reads other scripts' digits ("١٢٣" is 123 to it), math-verify does not.
_INTEGER = re.compile(r"-?[0-9]{1,100}")


class MathVerdict(BaseModel):
    """The outcome of verifying one prediction."""

    model_config = ConfigDict(extra="forbid")

    reward: float | None
    """1.0 correct, 0.0 wrong or no final answer, None when verification itself failed."""
    extracted: str | None
    """The final answer read from the prediction (None: there was none)."""
    error: str | None = None
    """Why no reward could be given (deadline, verifier crash)."""


def extract_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_hashes(text: str) -> str | None:
    """The answer after the last `####` (GSM8K's format), commas removed."""
    if "####" not in text:
        return None
    answer = text.rsplit("####", 1)[1].strip().splitlines()
    return answer[0].replace(",", "").strip() if answer else None


def extract_answer(text: str, allow_hashes: bool = False) -> str | None:
    """The final answer of a completion: its last `\\boxed{}`, else (if allowed) its `####` line."""
    answer = extract_boxed(text)
    if answer is None and allow_hashes:
        answer = extract_hashes(text)
    return answer


def _warm_worker() -> None:
    """Import and exercise math-verify when a pool process starts, so that a replacement for a
    killed worker does not spend the next answer's deadline on imports."""
    from math_verify import parse

    parse("$1$")


def _verify_in_worker(answer: str, gold: str) -> bool:
    """Runs in a pool process: lenient gold, strict prediction, then math-verify's comparison."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # Gold answers are bare LaTeX ("\\frac{\\pi}{2}", "\\$36"): box them so the LaTeX extractor
    # reads the whole answer; only an answer already in math mode is parsed as it is.
    gold_parsed = parse(gold if gold.strip().startswith("$") else f"$\\boxed{{{gold}}}$")
    pred_parsed = parse(
        f"$\\boxed{{{answer}}}$",
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        fallback_mode="no_fallback",
    )
    if not gold_parsed:
        raise ValueError(f"gold answer {gold!r} could not be parsed")
    return bool(pred_parsed) and verify(gold_parsed, pred_parsed)


class MathVerifier:
    """A pool of verifier processes with a per-answer deadline. Thread- and asyncio-safe."""

    def __init__(self, workers: int = 2, deadline_s: float = 5.0) -> None:
        from pebble import ProcessPool

        self.deadline_s = deadline_s
        # spawn, not fork: the caller may hold Ray, torch or vLLM threads that must not be forked.
        self._pool = ProcessPool(
            max_workers=workers, context=multiprocessing.get_context("spawn"), initializer=_warm_worker
        )

    def _schedule(self, prediction: str, gold: str, allow_hashes: bool):
        """The extracted answer and the pool future verifying it, or a verdict decided on the host."""
        answer = extract_answer(prediction, allow_hashes)
        if answer is None:
            return answer, MathVerdict(reward=0.0, extracted=None)
        if len(answer) > MAX_ANSWER_CHARS:
            return answer, MathVerdict(reward=0.0, extracted=answer[:80] + "...")
        if _INTEGER.fullmatch(answer.strip()) and _INTEGER.fullmatch(gold.strip()):
            return answer, MathVerdict(reward=float(int(answer) == int(gold)), extracted=answer)
        return answer, self._pool.schedule(_verify_in_worker, args=(answer, gold), timeout=self.deadline_s)

    def _verdict(self, answer: str, future) -> MathVerdict:
        try:
            ok = future.result()
        except FutureTimeout:
            return MathVerdict(reward=None, extracted=answer, error=f"verifier deadline {self.deadline_s}s")
        except Exception as exc:  # the verifier crashed: no reward, never a silent 0
            return MathVerdict(reward=None, extracted=answer, error=f"verifier error: {exc!r}"[:300])
        return MathVerdict(reward=1.0 if ok else 0.0, extracted=answer)

    def verify_sync(self, prediction: str, gold: str, allow_hashes: bool = False) -> MathVerdict:
        """Verify one prediction, blocking."""
        answer, pending = self._schedule(prediction, gold, allow_hashes)
        return pending if isinstance(pending, MathVerdict) else self._verdict(answer, pending)

    async def verify(self, prediction: str, gold: str, allow_hashes: bool = False) -> MathVerdict:
        """Verify one prediction without blocking the event loop (no thread per waiting call)."""
        answer, pending = self._schedule(prediction, gold, allow_hashes)
        if isinstance(pending, MathVerdict):
            return pending
        try:
            await asyncio.wrap_future(pending)
        except Exception:
            pass  # `_verdict` reads the outcome, failure included, from the future itself
        return self._verdict(answer, pending)

    def close(self) -> None:
        self._pool.stop()
        self._pool.join(timeout=5)


_shared: MathVerifier | None = None
_shared_lock = threading.Lock()


def shared_verifier() -> MathVerifier:
    """The process-wide verifier pool, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = MathVerifier()
        return _shared
