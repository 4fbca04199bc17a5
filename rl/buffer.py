"""`GroupBuffer`: the staleness rule's one home — admission, the assembly of groups, their age.

Invariants (unit-tested alone, in tests/rl/test_buffer.py):
* Admission, the hard bound: a group may be admitted while `admitted − retired < (version +
  max_staleness + 1) × batch_size`, where `retired` counts groups that will never be trained (lost,
  too old, or replaced under dynamic sampling). Each learner step trains `batch_size` groups and
  advances the version by one, so every admitted group is accounted for once, by a version or by a
  retirement: groups in flight or waiting never exceed `(max_staleness + 1) × batch_size`, the budget
  never leaks, and with `max_staleness = 0` every token of batch v is sampled by weights v.
* Admission, the look-ahead: within that bound, generation runs at most `lookahead` batches ahead
  of the batch being trained, plus one group for each straggler (a group still generating after the
  version it was admitted at has passed). When generation keeps up, a deeper pipeline buys no speed
  and only ages the samples (measured: the learner, taking the oldest groups first, then trained on
  samples as old as the bound, and learned less per step); the bound is for the slow groups of
  long episodes, which must not stall the others. Under dynamic sampling the look-ahead counts the
  groups expected to be trained: a running group counts by the share of recent groups that were
  kept, so when half are replaced twice as many run at once (within the hard bound). Counting every
  running group starved generation: at `batch_size` 35 with 45 % replaced, half as many groups ran
  as without dynamic sampling at the same draws per step, and a step took 1.73 s instead of 1.34.
* Assembly: a group is complete when `group_size` of its trajectories (the number its episodes
  published) have arrived; groups are handed to the learner in the order they completed, so one
  slow episode never stalls the others.
* Age: a group whose oldest token was sampled more than `max_age` versions ago (`max_staleness + 1`
  by default), or at a version the learner has not reached (another run's entry), is retired.
* Dynamic sampling: a group whose rewards are all equal carries no gradient; it is retired and its
  slot admits a replacement, so each step trains on `batch_size` informative groups. At most
  `(dynamic_sampling_max_batches − 1) × batch_size` groups are replaced per version; after that they
  are passed on (the learner filters them), so a policy that solves every task or none still steps.
Every retirement is counted by reason.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

from rl.config import AlgorithmSection
from rl.trajectory import Trajectory

log = logging.getLogger(__name__)

KEPT_SHARE_BATCHES = 4
"""Batches of groups the kept share is averaged over: over one, its noise let samples age to 2
versions where they age to 1 without dynamic sampling (tests/rl/test_buffer.py)."""


@dataclass
class ReadyGroup:
    """A complete group: its trajectories and their bus entry ids."""

    trajectories: list[Trajectory]
    entry_ids: list[str]


@dataclass
class GroupBuffer:
    """See the module docstring. Not thread-safe: the orchestrator holds its lock around calls."""

    algo: AlgorithmSection
    max_concurrent_episodes: int = 1 << 30
    version: int = 0
    """The version the engines serve (the number of learner steps taken)."""
    admitted: int = 0
    retired: int = 0
    in_flight: int = 0
    retired_by: collections.Counter[str] = field(default_factory=collections.Counter)
    """Retired groups by reason: lost, stale, future, zero_variance."""
    retirements: list[tuple[str, list[tuple[str, Trajectory]]]] = field(default_factory=list)
    """Complete groups retired since the caller last emptied this list: (reason, [(entry id,
    trajectory)]), for the ledger."""
    _admitted_at: dict[int, int] = field(default_factory=dict)
    """In-flight group index -> the version at its admission."""
    _partial: dict[str, list[tuple[str, Trajectory]]] = field(default_factory=dict)
    _missing: collections.Counter[str] = field(default_factory=collections.Counter)
    _ready: collections.deque[ReadyGroup] = field(default_factory=collections.deque)
    _done_ids: list[str] = field(default_factory=list)
    _replaced: int = 0
    """Groups replaced under dynamic sampling since the version last advanced."""
    _kept_share: float = 1.0
    """Moving average (over `KEPT_SHARE_BATCHES` batches) of the share of complete groups not replaced."""

    # ------------------------------------------------------------------ admission
    def can_admit(self) -> bool:
        a = self.algo
        untrained = self.admitted - self.retired - self.version * a.batch_size
        depth = min(a.max_staleness, a.lookahead) + 1
        stragglers = sum(1 for v in self._admitted_at.values() if v < self.version)
        # Under dynamic sampling a running group, straggler or not, counts by its chance to be kept.
        expected = untrained - self.in_flight * (1.0 - self._kept_share)
        return (
            untrained < (a.max_staleness + 1) * a.batch_size
            and expected < depth * a.batch_size + stragglers * self._kept_share
            and self.in_flight * a.group_size < self.max_concurrent_episodes
        )

    def admit(self) -> int:
        """Admit one group (call only when `can_admit`); returns its index."""
        index = self.admitted
        self.admitted += 1
        self.in_flight += 1
        self._admitted_at[index] = self.version
        return index

    def generated(self, published: int, index: int | None = None) -> None:
        """Group `index`'s episodes ended; `published` of them reached the bus (0: the group is lost)."""
        self.in_flight -= 1
        self._admitted_at.pop(index, None)
        if not published:
            self._retire("lost")

    def advance(self, version: int) -> None:
        """The engines now serve `version`."""
        if version != self.version:
            self._replaced = 0
        self.version = version

    # ------------------------------------------------------------------ assembly
    def add(self, entry_id: str, traj: Trajectory) -> None:
        """One trajectory read from the bus; a group is judged once it is complete."""
        items = self._partial.setdefault(traj.group_id, [])
        items.append((entry_id, traj))
        self._complete(traj.group_id, traj.group_size)

    def lose_member(self, group_id: str, group_size: int) -> None:
        """One published member of a group will never arrive (its bus entry did not decode): the
        group is complete with one member fewer, and retired as lost when none is left."""
        self._missing[group_id] += 1
        self._partial.setdefault(group_id, [])
        self._complete(group_id, group_size)

    def _complete(self, group_id: str, group_size: int) -> None:
        items = self._partial[group_id]
        if len(items) + self._missing[group_id] < group_size:
            return
        del self._partial[group_id]
        self._missing.pop(group_id, None)
        if items:
            self._judge(items)
        else:
            self._retire("lost")

    def _judge(self, items: list[tuple[str, Trajectory]]) -> None:
        ids, trajs = [e for e, _ in items], [t for _, t in items]
        reason = self.reject_reason(trajs)
        if self.algo.dynamic_sampling:
            replaced = reason == "zero_variance"
            self._kept_share += ((not replaced) - self._kept_share) / (KEPT_SHARE_BATCHES * self.algo.batch_size)
        if reason is None:
            self._ready.append(ReadyGroup(trajs, ids))
            return
        if reason == "zero_variance":
            self._replaced += 1
            if self._replaced == self._replace_budget:
                log.warning(
                    "dynamic sampling: %d groups without reward signal were replaced at version %d; "
                    "until the next version such groups are filtered instead of replaced "
                    "(algorithm.dynamic_sampling_max_batches = %d). The tasks may be too easy or "
                    "too hard for the policy.",
                    self._replaced,
                    self.version,
                    self.algo.dynamic_sampling_max_batches,
                )
        self._retire(reason, len(trajs))
        self.retirements.append((reason, items))
        self._done_ids += ids

    def reject_reason(self, trajs: list[Trajectory]) -> str | None:
        """Why a complete group will not be trained, or None."""
        age = self.version - min(t.min_version for t in trajs)
        if age < 0:
            return "future"
        if age > self.algo.effective_max_age:
            return "stale"
        if self.algo.dynamic_sampling and len({t.reward for t in trajs}) == 1 and self._replaced < self._replace_budget:
            return "zero_variance"
        return None

    @property
    def _replace_budget(self) -> int:
        return (self.algo.dynamic_sampling_max_batches - 1) * self.algo.batch_size

    def _retire(self, reason: str, samples: int = 0) -> None:
        self.retired += 1
        self.retired_by[reason] += 1
        if samples:
            self.retired_by[f"{reason}_samples"] += samples

    # ------------------------------------------------------------------ the learner's side
    @property
    def ready(self) -> int:
        """Complete groups waiting for the learner."""
        return len(self._ready)

    def take(self, n: int) -> tuple[list[list[Trajectory]], list[str]]:
        """Up to `n` ready groups, oldest completion first (they are retired as trained), and the
        bus ids to acknowledge once they are: theirs and those of every group retired since."""
        groups, ids = [], self._done_ids
        self._done_ids = []
        while self._ready and len(groups) < n:
            group = self._ready.popleft()
            age = self.reject_reason(group.trajectories)  # the version may have moved since it completed
            if age in ("stale", "future"):
                self._retire(age, len(group.trajectories))
                self.retirements.append((age, list(zip(group.entry_ids, group.trajectories))))
            else:
                groups.append(group.trajectories)  # its slot comes back with the next version
            ids += group.entry_ids
        return groups, ids

    def state(self) -> dict[str, object]:
        """Counters and the groups waiting, for a watchdog's state dump."""
        return {
            "version": self.version,
            "admitted": self.admitted,
            "retired": self.retired,
            "in_flight": self.in_flight,
            "ready": len(self._ready),
            "retired_by": dict(self.retired_by),
            "kept_share": round(self._kept_share, 3),
            "partial": [
                {
                    "group": g,
                    "have": len(items),
                    "missing": self._missing[g],
                    "size": items[0][1].group_size if items else None,
                }
                for g, items in self._partial.items()
            ],
        }
