"""EngineSupervisor's group placement: new groups go to the engine with the fewest in flight."""

from pathlib import Path

import pytest

from rl.config import FaultsSection
from rl.faults import EngineSupervisor
from rl.watchdog import Watchdog
from workers.rollout import EngineConfig


def _supervisor(tmp_path: Path, engines: int) -> EngineSupervisor:
    configs = [EngineConfig(model_path="unused", seed=i) for i in range(engines)]
    return EngineSupervisor(configs, FaultsSection(), Watchdog(tmp_path, dict))


def test_new_groups_go_to_the_engine_with_the_fewest_groups_in_flight(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, 3)
    with sup.assign() as a, sup.assign() as b, sup.assign() as c:
        assert [a.index, b.index, c.index] == [0, 1, 2]  # equal queues: in order
        with sup.assign() as d:
            assert d.index == 0  # a tie goes to the lowest index
    with sup.assign() as a, sup.assign() as b:
        assert (a.index, b.index) == (0, 1)
        with sup.assign() as c:
            assert c.index == 2, "not round-robin: engine 2 had nothing in flight"
    assert sup.groups == [0, 0, 0]


def test_a_failed_group_frees_its_engine_and_a_retry_goes_elsewhere(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, 2)
    with pytest.raises(RuntimeError), sup.assign():
        raise RuntimeError("an episode failed")
    assert sup.groups == [0, 0], "a failed group must not keep its engine looking busy"
    with sup.assign(avoid=0) as engine:
        assert engine.index == 1
    one = _supervisor(tmp_path, 1)
    with one.assign(avoid=0) as engine:
        assert engine.index == 0, "with one engine a retry runs on it again"
