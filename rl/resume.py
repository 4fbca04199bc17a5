"""Resume: what a checkpoint holds besides the learner's state, and how a launch takes over the
run its predecessor left.

A checkpoint is `<run dir>/checkpoints/step_<k>/`: the learner's DCP files (model, optimizer,
scheduler; any world size loads them), then `meta.json` (`CheckpointMeta`), written last and
atomically. A directory without it is a save the crash interrupted and is never resumed from.

Lineage and launches. A fresh `codeworld train` starts a lineage (a new id); every process start
is a launch (a new id). The bus stream belongs to the lineage (`<run name>.<lineage>`), so a new
run under an old name never sees the old run's entries, while a resumed launch, which keeps its
lineage, finds them. Group ids carry the launch, so groups of two launches never merge.

Taking over (`plan_adoption`). Whatever the predecessor left on the stream is sorted once, at
resume, against the ledger the checkpoint kept:
* entries whose sample the kept ledger has decided (a crash after the checkpoint's metadata and
  before its acknowledgement) are acknowledged and otherwise ignored: never trained twice;
* entries of groups open at the checkpoint are awaited as before;
* entries of groups the checkpoint does not know (published after it) are adopted: generated
  now, trained or dropped like any other;
* samples open at the checkpoint and absent from the stream (their episodes died with the
  crash) are dropped as `lost:crash`.
So every sample the lineage generated is trained once or dropped once, and the same procedure
serves a learner rebuilt in-process from its last checkpoint (`lost:rewind`).
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, Field

from rl.bus import EntryInfo
from rl.config import ConfigError
from rl.ledger import sample_id

META = "meta.json"
"""The file that makes a checkpoint directory complete."""


class Launch(BaseModel):
    """Who is running: the lineage (kept across resumes) and this process's launch."""

    run: str
    """The run name."""
    lineage: str
    """Made by a fresh start, kept by every resume."""
    launch: str
    """Made by every process start."""
    resumed_from: int | None = None
    """The checkpoint step this launch resumed from (None: a fresh start)."""

    @classmethod
    def fresh(cls, run: str) -> Launch:
        lineage = uuid.uuid4().hex[:8]
        return cls(run=run, lineage=lineage, launch=lineage)

    @classmethod
    def resumed(cls, run: str, meta: CheckpointMeta) -> Launch:
        return cls(run=run, lineage=meta.lineage, launch=uuid.uuid4().hex[:8], resumed_from=meta.step)

    @property
    def bus_id(self) -> str:
        """The run id the bus stream is keyed by."""
        return f"{self.run}.{self.lineage}"

    @property
    def consumer(self) -> str:
        """This launch's consumer name in the stream's consumer group."""
        return f"learner-{self.launch}"

    def group_id(self, index: int) -> str:
        return f"{self.run}-{self.launch}-g{index}"


class CheckpointMeta(BaseModel):
    """Everything of the orchestrator a resume needs, beside the learner's DCP files."""

    step: int
    """Learner steps taken: the policy version of the saved weights."""
    lineage: str
    launch: str
    """The launch that wrote it."""
    world_size: int
    """Learner ranks that saved it (any number can load it)."""
    rng_state: list[Any]
    """The orchestrator's `random.Random` state: which environment and task come next (the
    dataset positions), minibatch shuffles and shuffled-reward controls."""
    env_weights: list[float]
    """Sampling weight of each configured environment."""
    tokens_generated: int
    dropped: dict[str, int]
    """The drop counters of the metrics."""
    open_groups: dict[str, list[int]]
    """Samples undecided at the checkpoint, by group (the ledger's `snapshot`)."""
    train_s: float = 0.0
    """Seconds of training before the checkpoint (`run.max_wall_s` counts across launches)."""
    heldout_before: dict[str, float] = Field(default_factory=dict)
    """The evaluation before training (its metrics), reported again in the summary."""

    def rng(self) -> random.Random:
        rng = random.Random()
        version, internal, gauss = self.rng_state
        rng.setstate((version, tuple(internal), gauss))
        return rng


def rng_state(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step:06d}"


def write_meta(path: Path, meta: CheckpointMeta) -> None:
    """Write `meta.json` last and atomically: its presence marks the checkpoint complete."""
    tmp = path / (META + ".tmp")
    with tmp.open("w") as f:
        f.write(meta.model_dump_json(indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / META)
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash of the machine
    finally:
        os.close(dir_fd)


def read_meta(path: Path) -> CheckpointMeta:
    return CheckpointMeta.model_validate_json((path / META).read_text())


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if re.fullmatch(r"step_\d{6,}", p.name) and (p / META).is_file())


def set_aside_later(run_dir: Path, step: int, launch: str) -> list[Path]:
    """Rename the checkpoints after `step` (a resume from an earlier one leaves their timeline) to
    `<name>.abandoned-<launch>`: never resumed from, never overwritten, kept for a person."""
    moved = []
    for path in complete_checkpoints(run_dir):
        if int(path.name.removeprefix("step_")) > step:
            target = path.with_name(f"{path.name}.abandoned-{launch}")
            path.rename(target)
            moved.append(target)
    return moved


def find_checkpoint(run_dir: Path, resume: str) -> tuple[Path, CheckpointMeta]:
    """The checkpoint `--resume` names: "latest" (the newest complete one of the run directory) or
    a checkpoint directory. Errors are one sentence naming what is missing."""
    if resume == "latest":
        found = complete_checkpoints(run_dir)
        if not found:
            raise ConfigError(
                f"--resume: run.dir {str(run_dir)!r} holds no complete checkpoint "
                f"(checkpoints/step_*/{META}); set checkpoint.every to write them."
            )
        path = found[-1]
    else:
        path = Path(resume)
        if not (path / META).is_file():
            raise ConfigError(f"--resume {resume!r} is not a complete checkpoint directory (no {META}).")
    return path, read_meta(path)


def lock_run_dir(run_dir: Path) -> IO[str]:
    """Hold `<run dir>/.lock` for as long as the returned file stays open: two launches on one
    run directory would train the same entries twice."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / ".lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(
            f"run.dir {str(run_dir)!r} is in use by another codeworld process; stop it first or choose another run.dir."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def require_fresh(run_dir: Path) -> None:
    """A fresh run must not start over checkpoints of another lineage (a later `--resume` would
    pick theirs)."""
    if complete_checkpoints(run_dir):
        raise ConfigError(
            f"run.dir {str(run_dir)!r} holds checkpoints of an earlier run: continue it with "
            "--resume, or choose another run.dir, or delete its checkpoints/ folder."
        )


@dataclass
class Adoption:
    """How a launch takes over the stream (see the module docstring)."""

    acknowledge: list[str] = field(default_factory=list)
    """Entry ids to acknowledge and forget: decided already, or not ours (no sample id)."""
    adopted: list[str] = field(default_factory=list)
    """Sample ids of groups the checkpoint does not know, now generated."""
    lost: list[str] = field(default_factory=list)
    """Sample ids open at the checkpoint that no entry carries."""
    groups: int = 0
    """Distinct groups left on the stream: admitted already, they hold admission slots."""


def plan_adoption(entries: list[EntryInfo], open_groups: dict[str, list[int]], decided: set[str]) -> Adoption:
    """Sort the stream's entries against the checkpoint (`decided`: the entries' sample ids that
    the kept ledger has decided)."""
    plan = Adoption()
    present: set[str] = set()
    groups: set[str] = set()
    for e in entries:
        if e.trajectory_id is None or e.group_id is None or e.trajectory_id in decided:
            plan.acknowledge.append(e.entry_id)
            continue
        present.add(e.trajectory_id)
        groups.add(e.group_id)
        if e.group_id not in open_groups:
            plan.adopted.append(e.trajectory_id)
    plan.groups = len(groups)
    for group, indices in open_groups.items():
        plan.lost += [sid for sid in (sample_id(group, i) for i in indices) if sid not in present]
    return plan
