"""`Ledger`: the fate of every sample a run generates, one JSON line each in `<run dir>/ledger.jsonl`.

Invariants (tests/rl/test_ledger.py):
* A sample has an id, `<group id>.<i>`, from the moment its group is admitted (`open`), whether or
  not it ever becomes a trajectory, and exactly one line once its fate is decided: `trained` at
  step k, or `dropped` with a reason (`stale`, `future`, `zero_variance`, `no_reward:<kind>`,
  `lost:<why>`, `overlong`, `run_ended`, ...). A second decision about a decided or unknown id
  is refused and counted in `refused`, never written.
* generated = trained + dropped + open, always; at the end of a run nothing is open.
* A line's `step` is the learner step during which its fate was decided: the step trained, or the
  step being assembled when the sample was dropped. Decisions happen in step order, so the lines
  of steps ≤ k are exactly what the run had decided when it checkpointed step k.
* On resume from the checkpoint of step k the file keeps only the lines of steps ≤ k (the
  lineage of the resumed weights): what was decided after the checkpoint and lost with the crash
  is decided again. The groups open at the checkpoint come back from the checkpoint's metadata.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

FILE_NAME = "ledger.jsonl"
"""The ledger file inside a run directory."""


def sample_id(group_id: str, index: int) -> str:
    """The id of sample `index` of a group (also its trajectory's id on the bus)."""
    return f"{group_id}.{index}"


def split_id(sample: str) -> tuple[str, int]:
    """(group id, index) of a sample id."""
    group, _, index = sample.rpartition(".")
    return group, int(index)


class LedgerLine(BaseModel):
    """One line of ledger.jsonl."""

    id: str
    """The sample's id, `<group id>.<i>`."""
    fate: Literal["trained", "dropped"]
    """Trained once, or dropped."""
    step: int
    """The learner step that trained it, or during which it was dropped."""
    reason: str | None = None
    """Why it was dropped (None when trained)."""
    entry: str | None = None
    """Its bus entry id, when it was published (samples without a reward never are)."""
    env: str | None = None
    """Its environment (None for samples adopted from a crashed launch and never read)."""


class LedgerTotals(BaseModel):
    """What `summary.json` reports of the ledger."""

    generated: int = 0
    """Samples of every admitted group (and of groups adopted from a crashed launch's bus)."""
    trained: int = 0
    dropped: int = 0
    open: int = 0
    """Samples whose fate is not decided yet (0 at the end of a run)."""
    refused: int = 0
    """Decisions refused because the id was decided already or never generated (0 unless a bug)."""
    by_reason: dict[str, int] = Field(default_factory=dict)
    """Dropped samples by reason."""


class Ledger:
    """Appends decisions to ledger.jsonl and keeps the totals and the open groups."""

    def __init__(
        self, run_dir: Path, resume_step: int | None = None, open_groups: Mapping[str, Iterable[int]] | None = None
    ) -> None:
        """A fresh ledger (`resume_step` None: an existing file is emptied), or the ledger of a
        run resumed from the checkpoint of `resume_step`, with the groups open at that checkpoint."""
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / FILE_NAME
        self.totals = LedgerTotals()
        self._reasons: collections.Counter[str] = collections.Counter()
        self._open: dict[str, set[int]] = {}
        self._env: dict[str, str] = {}  # group id -> environment, while open
        self._recent: list[tuple[int, str]] = []  # (step, id) decided since the last snapshot
        if resume_step is None:
            self.path.write_text("")
        else:
            self._keep_until(resume_step)
        for group, indices in (open_groups or {}).items():
            self._open[group] = set(indices)
            self.totals.generated += len(self._open[group])
        self._file = self.path.open("a")

    def _keep_until(self, step: int) -> None:
        """Rewrite the file with the lines of steps ≤ `step` (atomically) and count them."""
        kept: list[str] = []
        if self.path.exists():
            for raw in self.path.read_text().splitlines():
                if not raw.strip():
                    continue
                try:
                    line = LedgerLine.model_validate_json(raw)
                except ValueError:
                    break  # a line torn by the crash: nothing after it was written whole
                if line.step <= step:
                    kept.append(raw)
                    self.totals.generated += 1
                    self._count(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{raw}\n" for raw in kept))
        os.replace(tmp, self.path)

    def _count(self, line: LedgerLine) -> None:
        if line.fate == "trained":
            self.totals.trained += 1
        else:
            self.totals.dropped += 1
            self._reasons[line.reason or ""] += 1

    # ------------------------------------------------------------------ generation
    def open(self, group_id: str, size: int, env: str | None = None) -> list[str]:
        """An admitted group of `size` samples of `env`; returns their ids."""
        self._open[group_id] = set(range(size))
        if env is not None:
            self._env[group_id] = env
        self.totals.generated += size
        return [sample_id(group_id, i) for i in range(size)]

    def adopt(self, ids: Iterable[str]) -> None:
        """Samples of groups this launch did not admit (a crashed launch's bus entries, taken over
        on resume): they count as generated and await their fate like any other."""
        for sid in ids:
            group, index = split_id(sid)
            members = self._open.setdefault(group, set())
            if index not in members:
                members.add(index)
                self.totals.generated += 1

    def note_env(self, group_id: str, env: str) -> None:
        """The environment of an open group (learnt when its first trajectory is read)."""
        if group_id in self._open:
            self._env.setdefault(group_id, env)

    def is_open(self, sid: str) -> bool:
        group, index = split_id(sid)
        return index in self._open.get(group, ())

    # ------------------------------------------------------------------ decisions
    def trained(self, ids: Iterable[str], step: int, entries: Mapping[str, str] | None = None) -> None:
        """Samples trained by learner step `step` (`entries`: their bus entry ids)."""
        self._decide(ids, "trained", step, None, entries)

    def dropped(self, ids: Iterable[str], step: int, reason: str, entries: Mapping[str, str] | None = None) -> None:
        """Samples dropped during step `step`, for `reason`."""
        self._decide(ids, "dropped", step, reason, entries)

    def _decide(
        self,
        ids: Iterable[str],
        fate: Literal["trained", "dropped"],
        step: int,
        reason: str | None,
        entries: Mapping[str, str] | None,
    ) -> None:
        for sid in ids:
            group, index = split_id(sid)
            members = self._open.get(group)
            if members is None or index not in members:
                self.totals.refused += 1
                continue
            members.discard(index)
            env = self._env.get(group)
            if not members:
                del self._open[group]
                self._env.pop(group, None)
            line = LedgerLine(id=sid, fate=fate, step=step, reason=reason, entry=(entries or {}).get(sid), env=env)
            self._file.write(line.model_dump_json() + "\n")
            self._count(line)
            self._recent.append((step, sid))

    # ------------------------------------------------------------------ state
    def snapshot(self, step: int) -> dict[str, list[int]]:
        """Samples undecided as of the lines of steps ≤ `step`, by group: the open ones and those
        decided since with a later step (drops while the next batch assembles), for the metadata
        of the checkpoint of `step`. Makes the file durable first."""
        self.sync()
        groups = {group: set(members) for group, members in self._open.items()}
        later = [(s, sid) for s, sid in self._recent if s > step]
        for _, sid in later:
            group, index = split_id(sid)
            groups.setdefault(group, set()).add(index)
        self._recent = later
        return {group: sorted(members) for group, members in groups.items()}

    @property
    def open_group_count(self) -> int:
        """Groups with a sample not yet decided: admitted and not yet trained or dropped."""
        return len(self._open)

    def open_ids(self) -> list[str]:
        return [sample_id(g, i) for g, members in self._open.items() for i in sorted(members)]

    def summary(self) -> LedgerTotals:
        """The totals as of now."""
        open_count = sum(len(m) for m in self._open.values())
        return self.totals.model_copy(update={"open": open_count, "by_reason": dict(sorted(self._reasons.items()))})

    def sync(self) -> None:
        """Make every line written so far durable (before a checkpoint's metadata names them)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()


def read_ledger(path: Path) -> list[LedgerLine]:
    """Every line of a ledger file (for tests and tools)."""
    return [LedgerLine.model_validate(json.loads(raw)) for raw in path.read_text().splitlines() if raw.strip()]


def decided_in(path: Path, ids: set[str]) -> set[str]:
    """Which of `ids` have a line in the ledger file (one pass, memory bounded by `ids`)."""
    found: set[str] = set()
    if not ids or not path.exists():
        return found
    with path.open() as f:
        for raw in f:
            if raw.strip():
                sid = json.loads(raw).get("id")
                if sid in ids:
                    found.add(sid)
    return found
