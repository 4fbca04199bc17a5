"""GroupBuffer on its own (CPU only, no Ray, no Redis): the staleness rule's admission, assembly
and age, checked step by step and over long random schedules."""

from __future__ import annotations

import random

import numpy as np
import pytest

from rl.buffer import GroupBuffer
from rl.config import AlgorithmSection
from rl.trajectory import Trajectory


def traj(group: str, version: int, reward: float, size: int) -> Trajectory:
    return Trajectory(
        id=f"{group}-{random.random()}",
        run_id="r",
        env="e",
        task_id="t",
        group_id=group,
        group_size=size,
        prompt_ids=np.array([1, 2]),
        completion_ids=np.array([3, 4]),
        loss_mask=np.array([1, 1]),
        sampler_logprobs=np.array([-1.0, -1.0]),
        policy_versions=np.array([version, version]),
        reward=reward,
    )


def publish(buf: GroupBuffer, index: int, version: int, rewards: list[float]) -> None:
    buf.generated(len(rewards), index)
    for i, r in enumerate(rewards):
        buf.add(f"{index}-{i}", traj(f"g{index}", version, r, len(rewards)))


def admit_all(buf: GroupBuffer) -> list[int]:
    admitted = []
    while buf.can_admit():
        admitted.append(buf.admit())
    return admitted


def test_admission_allows_staleness_plus_one_batches_ahead() -> None:
    buf = GroupBuffer(AlgorithmSection(batch_size=3, group_size=2, max_staleness=1))
    assert len(admit_all(buf)) == 6
    for i in range(6):
        publish(buf, i, 0, [0.0, 1.0])
    groups, ids = buf.take(3)
    assert len(groups) == 3 and len(ids) == 6
    assert not buf.can_admit()  # trained groups free their slots only with the next version
    buf.advance(1)
    assert len(admit_all(buf)) == 3


def test_every_retirement_frees_its_slot() -> None:
    """Issue #11: a group dropped as too old was never counted, so each such drop shrank the budget
    for good (a long multi-turn run slowly became synchronous, then hung)."""
    algo = AlgorithmSection(batch_size=1, group_size=2, max_staleness=1, max_age=1)
    buf = GroupBuffer(algo)
    assert admit_all(buf) == [0, 1]
    slow = 1  # group 1 (sampled at version 0) takes a long time
    publish(buf, 0, 0, [0.0, 1.0])
    for version in (1, 2, 3):  # three steps train groups admitted after it
        assert len(buf.take(1)[0]) == 1
        buf.advance(version)
        (index,) = admit_all(buf)
        publish(buf, index, version, [0.0, 1.0])
    publish(buf, slow, 0, [0.0, 1.0])  # finally done: three versions old, over max_age
    assert buf.retired_by["stale"] == 1
    assert len(buf.take(2)[0]) == 1  # the fresh one; the stale one is gone
    buf.advance(4)
    assert len(admit_all(buf)) == (algo.max_staleness + 1) * algo.batch_size  # nothing leaked
    buf.generated(0)  # a lost group frees its slot at once
    assert buf.retired_by["lost"] == 1 and len(admit_all(buf)) == 1


def test_entries_from_a_version_not_reached_are_retired() -> None:
    buf = GroupBuffer(AlgorithmSection(batch_size=1, group_size=1, max_staleness=1))
    buf.admit()
    publish(buf, 0, 5, [1.0])  # another run's entry: sampled at version 5, we are at 0
    assert buf.take(1) == ([], ["0-0"]) and buf.retired_by["future"] == 1


def test_dynamic_sampling_replaces_groups_without_signal() -> None:
    algo = AlgorithmSection(batch_size=2, group_size=2, max_staleness=0, dynamic_sampling=True)
    buf = GroupBuffer(algo)
    a, b = admit_all(buf)
    publish(buf, a, 0, [1.0, 1.0])  # no signal: retired, a replacement may start
    publish(buf, b, 0, [0.0, 1.0])
    assert buf.can_admit() and not GroupBuffer(algo.model_copy(update={"dynamic_sampling": False})).retired
    c = buf.admit()
    publish(buf, c, 0, [1.0, 0.0])
    groups, _ = buf.take(2)
    assert len(groups) == 2 and all(len({t.reward for t in g}) == 2 for g in groups)
    assert buf.retired_by["zero_variance"] == 1


def test_dynamic_sampling_stops_replacing_after_its_draws_and_starts_again_at_the_next_version() -> None:
    """A policy that solves every task: each group has one reward. Replacing them forever starved
    the learner (it waited while generation ran on); past `dynamic_sampling_max_batches` batches'
    worth of draws for one version they are passed on, for the learner to filter."""
    algo = AlgorithmSection(
        batch_size=2, group_size=2, max_staleness=0, dynamic_sampling=True, dynamic_sampling_max_batches=3
    )
    buf = GroupBuffer(algo)
    for index in range(6):  # the batch (2) and (3 − 1) × 2 replacements: the last two pass
        assert buf.can_admit()
        assert buf.admit() == index
        publish(buf, index, 0, [1.0, 1.0])
    assert buf.retired_by["zero_variance"] == 4 and buf.ready == 2 and not buf.can_admit()
    assert len(buf.take(2)[0]) == 2
    buf.advance(1)
    for index in admit_all(buf):
        publish(buf, index, 1, [0.0, 0.0])
    assert buf.retired_by["zero_variance"] == 6 and buf.ready == 0  # replaced again at the new version


@pytest.mark.parametrize("staleness", [0, 1, 4])
def test_fifty_steps_with_slow_and_lost_groups_keep_the_budget(staleness: int) -> None:
    """Random completion order, slow groups that turn stale, lost groups and (half the time) groups
    without signal under dynamic sampling: the budget stays at (staleness + 1) × batch size, every
    step trains a full batch, no trained group is older than allowed, and with staleness 0 every
    group is on-policy."""
    rng = random.Random(staleness)
    batch, algo = 4, AlgorithmSection(batch_size=4, group_size=2, max_staleness=staleness, dynamic_sampling=True)
    buf = GroupBuffer(algo)
    running: dict[int, int] = {}  # index -> version it was sampled at
    for step in range(50):
        trained: list[list[Trajectory]] = []
        while len(trained) < batch:
            for index in admit_all(buf):
                running[index] = buf.version
            assert len(running) + buf.ready <= (staleness + 1) * batch
            index = rng.choice(sorted(running))  # any running group may finish next
            version = running.pop(index)
            fate = rng.random()
            if fate < 0.1:
                buf.generated(0, index)
            else:
                publish(buf, index, version, [1.0, 1.0] if fate < 0.5 else [0.0, 1.0])
            trained += buf.take(batch - len(trained))[0]
        for group in trained:
            age = step - min(t.min_version for t in group)
            assert 0 <= age <= algo.effective_max_age and (staleness or age == 0)
        buf.advance(step + 1)
    assert buf.version == 50


def test_generation_runs_one_batch_ahead_when_it_keeps_up_and_further_for_stragglers() -> None:
    """Issue #15: filling the whole staleness budget bought no speed when generation kept up, and
    the learner, taking the oldest groups first, then trained on samples as old as the bound."""
    algo = AlgorithmSection(batch_size=2, group_size=2, max_staleness=4, lookahead=1)
    buf = GroupBuffer(algo)
    assert admit_all(buf) == [0, 1, 2, 3]  # the batch to train and the next one, not five batches
    for i in range(4):
        publish(buf, i, 0, [0.0, 1.0])
    assert len(buf.take(2)[0]) == 2 and not buf.can_admit()  # one batch training, one ready
    buf.advance(1)
    assert admit_all(buf) == [4, 5]
    publish(buf, 4, 1, [0.0, 1.0])  # group 5 straggles past the next version
    assert len(buf.take(2)[0]) == 2
    buf.advance(2)
    # two batches untrained (4, 5 and three new), plus one because group 5 is a straggler
    assert admit_all(buf) == [6, 7, 8]
    deep = GroupBuffer(algo.model_copy(update={"lookahead": 4}))
    assert len(admit_all(deep)) == 10  # lookahead up to the bound: the old behaviour


def test_fast_generation_trains_samples_one_version_old_whatever_the_bound() -> None:
    for staleness in (1, 4, 8):
        buf = GroupBuffer(AlgorithmSection(batch_size=2, group_size=2, max_staleness=staleness))
        ages = []
        for step in range(20):
            for index in admit_all(buf):  # generation keeps up: every admitted group completes at once
                publish(buf, index, buf.version, [0.0, 1.0])
            groups, _ = buf.take(2)
            ages += [step - min(t.min_version for t in g) for g in groups]
            buf.advance(step + 1)
        assert max(ages) <= 1, (staleness, ages)


def test_dynamic_sampling_still_runs_a_batch_ahead_when_half_the_groups_are_replaced() -> None:
    """Counting every running group against the look-ahead, when half of them would be replaced,
    left no informative batch ahead: generation and learning took turns (samples trained at age
    0), and on the demo a step took 1.73 s instead of 1.34 at the same draws per step. A running
    group now counts by the share of recent groups kept, so the pipeline ages samples as without
    dynamic sampling (about one version) and stays within the hard bound."""
    ages: dict[bool, list[int]] = {}
    for dynamic in (False, True):
        algo = AlgorithmSection(batch_size=4, group_size=2, max_staleness=4, dynamic_sampling=dynamic)
        buf, drawn, ages[dynamic] = GroupBuffer(algo), 0, []
        for step in range(40):
            for index in admit_all(buf):  # generation keeps up: every admitted group completes at once
                drawn += 1
                publish(buf, index, buf.version, [1.0, 1.0] if drawn % 2 else [0.0, 1.0])
                assert buf.in_flight + buf.ready <= (algo.max_staleness + 1) * algo.batch_size
            groups, _ = buf.take(4)
            assert len(groups) == 4
            ages[dynamic] += [step - min(t.min_version for t in g) for g in groups]
            buf.advance(step + 1)
    assert max(ages[True]) <= 1 and sum(ages[True]) / len(ages[True]) >= 0.75, ages[True]
    assert sum(ages[False]) / len(ages[False]) >= 0.75  # the same overlap as without it
