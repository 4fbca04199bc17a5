"""The run's sample store: a bounded, rotating record of decoded episodes for the sample browser.

One SQLite file per run (`<run dir>/samples.db`, WAL mode): the training process is its only
writer; the dashboard opens it read-only, also while the run trains. Every row holds the whole
`SampleRecord` as JSON plus the columns the browser filters and pages on. After each write the
oldest rows beyond `max_samples` are deleted; SQLite reuses their pages, so the file stops growing
once full. Text is cut at `max_chars` per prompt and per turn, so one runaway episode cannot bloat
it either.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from rl.config import SamplesSection
from rl.trajectory import Trajectory

FILE_NAME = "samples.db"
"""The store's file inside a run directory."""
MAX_INT = 2**53
"""Largest step or offset a query may name (SQLite integers are 64-bit; a larger one is a 422)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, step INTEGER NOT NULL,
    kind TEXT NOT NULL, eval_set TEXT, env TEXT NOT NULL, task_id TEXT NOT NULL, reward REAL NOT NULL,
    staleness INTEGER, preview TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS samples_step ON samples (step);
CREATE INDEX IF NOT EXISTS samples_env ON samples (env, step);
CREATE INDEX IF NOT EXISTS samples_task ON samples (task_id, step);
"""


class Turn(BaseModel):
    """One stretch of the completion: a model turn, or what the environment appended."""

    role: Literal["model", "env"]
    """model: tokens the policy sampled; env: tokens the environment added (feedback, tool output)."""
    text: str
    """The decoded tokens (cut at the store's `max_chars`)."""
    tokens: int
    """How many tokens the stretch has."""


class SampleRecord(BaseModel):
    """One recorded episode, decoded for people."""

    id: str
    """The trajectory's id."""
    step: int
    """Train samples: the learner step that trained on it; evaluation samples: the step evaluated."""
    kind: Literal["train", "eval"]
    """Whether it came from a training batch or from an evaluation set."""
    eval_set: str | None = None
    """The evaluation set's label (evaluation samples only)."""
    env: str
    """The environment's registry name."""
    task_id: str
    """The task's id within its dataset (the same task across steps shares it)."""
    group_id: str
    """Samples of one group share a task and were normalised together."""
    reward: float
    """The episode's reward."""
    reward_info: dict[str, Any] = Field(default_factory=dict)
    """What the verifier reported."""
    prompt: str
    """The first prompt, decoded."""
    turns: list[Turn]
    """The completion, turn by turn."""
    completion_tokens: int
    """Tokens the model sampled, all turns together."""
    truncated: bool
    """Whether the last turn stopped at the token limit."""
    policy_min: int
    """Oldest policy version that sampled a token of it (-1: none)."""
    policy_max: int
    """Newest policy version that sampled a token of it (-1: none)."""
    staleness: int | None = None
    """Versions between the oldest sampling policy and the policy that trained on it (train only)."""
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds per phase of the episode."""


class SampleSummary(BaseModel):
    """One row of the sample browser's list."""

    id: str
    """The trajectory's id."""
    step: int
    """See `SampleRecord.step`."""
    kind: Literal["train", "eval"]
    """Whether it came from a training batch or from an evaluation set."""
    eval_set: str | None
    """The evaluation set's label (evaluation samples only)."""
    env: str
    """The environment's registry name."""
    task_id: str
    """The task's id within its dataset."""
    reward: float
    """The episode's reward."""
    staleness: int | None
    """See `SampleRecord.staleness`."""
    preview: str
    """The start of the completion."""


class SampleQuery(BaseModel):
    """Filters and paging of the sample list; unset filters match everything."""

    env: str | None = None
    """Only this environment."""
    kind: Literal["train", "eval"] | None = None
    """Only train or only evaluation samples."""
    eval_set: str | None = None
    """Only this evaluation set."""
    task_id: str | None = None
    """Only this task (the same task across steps)."""
    min_reward: float | None = Field(None, allow_inf_nan=False)
    """Reward at least this."""
    max_reward: float | None = Field(None, allow_inf_nan=False)
    """Reward at most this."""
    min_step: int | None = Field(None, ge=0, le=MAX_INT)
    """Step at least this."""
    max_step: int | None = Field(None, ge=0, le=MAX_INT)
    """Step at most this."""
    offset: int = Field(0, ge=0, le=MAX_INT)
    """Rows to skip (newest first)."""
    limit: int = Field(50, ge=1, le=500)
    """Rows to return."""


class SamplePage(BaseModel):
    """A page of the sample list."""

    total: int
    """Rows matching the filters."""
    items: list[SampleSummary]
    """This page's rows, newest step first."""


class SampleFacets(BaseModel):
    """What the store holds, for the browser's filter controls."""

    envs: list[str]
    """Environments present."""
    eval_sets: list[str]
    """Evaluation sets present."""
    min_step: int | None
    """Smallest step present."""
    max_step: int | None
    """Largest step present."""
    count: int
    """Samples stored."""
    last_seq: int
    """Sequence number of the newest sample (grows with every write)."""


def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f" … [{len(text) - max_chars} characters cut]"


def to_record(
    traj: Trajectory,
    step: int,
    decode: Callable[[list[int]], str],
    max_chars: int,
    *,
    kind: Literal["train", "eval"],
    trained_version: int | None = None,
    eval_set: str | None = None,
) -> SampleRecord:
    """Decode a trajectory into a record: the completion split into model and environment turns
    where `loss_mask` changes."""
    mask = traj.loss_mask.astype(bool)
    edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    turns = []
    for part in np.split(np.arange(len(mask)), edges):
        if len(part):
            ids = traj.completion_ids[part].tolist()
            turns.append(
                Turn(role="model" if mask[part[0]] else "env", text=_cut(decode(ids), max_chars), tokens=len(ids))
            )
    sampled = traj.policy_versions[mask]
    newest = int(sampled.max()) if len(sampled) else -1
    return SampleRecord(
        id=traj.id,
        step=step,
        kind=kind,
        eval_set=eval_set,
        env=traj.env,
        task_id=traj.task_id,
        group_id=traj.group_id,
        reward=traj.reward,
        reward_info=traj.reward_info,
        prompt=_cut(decode(traj.prompt_ids.tolist()), max_chars),
        turns=turns,
        completion_tokens=traj.num_model_tokens,
        truncated=traj.truncated,
        policy_min=traj.min_version,
        policy_max=newest,
        timings=traj.timings,
        staleness=(None if trained_version is None or traj.min_version < 0 else trained_version - traj.min_version),
    )


class SampleStore:
    """The writer: decodes trajectories into records, appends them and deletes the oldest beyond
    `max_samples`."""

    def __init__(
        self, run_dir: Path, settings: SamplesSection, decode: Callable[[list[int]], str], seed: int = 0
    ) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / FILE_NAME
        self.settings, self.decode, self.seed = settings, decode, seed
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")  # the dashboard reads while the run writes
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def record_train(
        self, step: int, groups: Sequence[Sequence[Trajectory]], trained_version: int
    ) -> list[SampleRecord]:
        """Record `train_share` of a step's groups (whole groups); returns what was recorded."""
        chosen = pick_groups(groups, self.settings.train_share, self.seed + step)
        records = [
            to_record(t, step, self.decode, self.settings.max_chars, kind="train", trained_version=trained_version)
            for t in chosen
        ]
        self.add(records)
        return records

    def record_eval(self, step: int, eval_set: str, trajs: Sequence[Trajectory]) -> list[SampleRecord]:
        """Record every sample of an evaluation set; returns the records."""
        records = [
            to_record(t, step, self.decode, self.settings.max_chars, kind="eval", eval_set=eval_set) for t in trajs
        ]
        self.add(records)
        return records

    def add(self, records: Sequence[SampleRecord]) -> None:
        """Append records (a record whose id is stored already replaces it)."""
        if not records:
            return
        rows = [
            (
                r.id,
                r.step,
                r.kind,
                r.eval_set,
                r.env,
                r.task_id,
                r.reward,
                r.staleness,
                _preview(r),
                r.model_dump_json(),
            )
            for r in records
        ]
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO samples (id, step, kind, eval_set, env, task_id, reward, staleness, "
                "preview, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._db.execute(
                "DELETE FROM samples WHERE seq <= (SELECT MAX(seq) FROM samples) - ?", (self.settings.max_samples,)
            )

    def forget_after(self, step: int) -> None:
        """Delete the train samples of steps after `step` (the run went back to that checkpoint)."""
        with self._db:
            self._db.execute("DELETE FROM samples WHERE kind = 'train' AND step > ?", (step,))

    def close(self) -> None:
        # Back to a rollback journal: a finished run is one self-contained file, which a read-only
        # reader opens without creating WAL side files next to it.
        try:
            self._db.execute("PRAGMA journal_mode=DELETE")
        except sqlite3.OperationalError:
            pass  # a dashboard is reading right now: the file stays in WAL mode, which is as good
        self._db.close()


def _preview(record: SampleRecord) -> str:
    text = " ⏎ ".join(t.text for t in record.turns if t.role == "model")
    return text[:160]


class SampleReader:
    """Read-only queries for the dashboard. Opens the file per call: a run may rotate or finish in
    between, and a connection is cheap next to the query."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # mode=ro: the dashboard can never write to a run, even through a bug of its own.
        db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    def facets(self) -> SampleFacets:
        with self._connect() as db:
            envs = [r[0] for r in db.execute("SELECT DISTINCT env FROM samples ORDER BY env")]
            sets = [
                r[0]
                for r in db.execute(
                    "SELECT DISTINCT eval_set FROM samples WHERE eval_set IS NOT NULL ORDER BY eval_set"
                )
            ]
            lo, hi, count, last = db.execute(
                "SELECT MIN(step), MAX(step), COUNT(*), COALESCE(MAX(seq), 0) FROM samples"
            ).fetchone()
        return SampleFacets(envs=envs, eval_sets=sets, min_step=lo, max_step=hi, count=count, last_seq=last)

    def last_seq(self) -> int:
        """Sequence number of the newest sample (0: none); it grows with every write."""
        with self._connect() as db:
            return db.execute("SELECT COALESCE(MAX(seq), 0) FROM samples").fetchone()[0]

    def query(self, q: SampleQuery) -> SamplePage:
        where, args = _where(q)
        with self._connect() as db:
            total = db.execute(f"SELECT COUNT(*) FROM samples{where}", args).fetchone()[0]
            rows = db.execute(
                "SELECT id, step, kind, eval_set, env, task_id, reward, staleness, preview "
                f"FROM samples{where} ORDER BY step DESC, seq DESC LIMIT ? OFFSET ?",
                [*args, q.limit, q.offset],
            ).fetchall()
        return SamplePage(total=total, items=[SampleSummary(**dict(r)) for r in rows])

    def task(self, task_id: str, limit: int) -> list[SampleRecord]:
        """The newest `limit` samples of one task, oldest step first (the same task across steps)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT body FROM samples WHERE task_id = ? ORDER BY step DESC, seq DESC LIMIT ?", (task_id, limit)
            ).fetchall()
        return [SampleRecord.model_validate(json.loads(r[0])) for r in reversed(rows)]

    def get(self, sample_id: str) -> SampleRecord | None:
        with self._connect() as db:
            row = db.execute("SELECT body FROM samples WHERE id = ?", (sample_id,)).fetchone()
        return None if row is None else SampleRecord.model_validate(json.loads(row[0]))


def _where(q: SampleQuery) -> tuple[str, list[Any]]:
    """SQL filter clause for a query; values always travel as parameters, never in the text."""
    conds, args = [], []
    for column, op, value in (
        ("env", "=", q.env),
        ("kind", "=", q.kind),
        ("eval_set", "=", q.eval_set),
        ("task_id", "=", q.task_id),
        ("reward", ">=", q.min_reward),
        ("reward", "<=", q.max_reward),
        ("step", ">=", q.min_step),
        ("step", "<=", q.max_step),
    ):
        if value is not None:
            conds.append(f"{column} {op} ?")
            args.append(value)
    return (" WHERE " + " AND ".join(conds)) if conds else "", args


def pick_groups(groups: Sequence[Sequence[Trajectory]], share: float, seed: int) -> list[Trajectory]:
    """The trajectories of round(share × groups) groups (at least one when share > 0), chosen by
    `seed`: whole groups, so the browser shows every sample a task got in a step."""
    if share <= 0 or not groups:
        return []
    count = max(1, round(share * len(groups)))
    chosen = np.random.default_rng(seed).choice(len(groups), size=min(count, len(groups)), replace=False)
    return [t for i in sorted(chosen) for t in groups[i]]
