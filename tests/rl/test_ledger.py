"""The ledger, the metrics file across resumes, and the plan by which a resumed launch takes over
its predecessor's stream: CPU only, no Ray, no Redis."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rl.bus import EntryInfo
from rl.ledger import Ledger, read_ledger, sample_id
from rl.metrics import MetricsWriter, read_rows
from rl.resume import CheckpointMeta, Launch, plan_adoption, rng_state


def totals_hold(ledger: Ledger) -> None:
    t = ledger.summary()
    assert t.generated == t.trained + t.dropped + t.open, t
    assert t.dropped == sum(t.by_reason.values())


def test_every_sample_gets_one_fate_and_the_totals_add_up(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    a = ledger.open("run-x-g0", 4)
    b = ledger.open("run-x-g1", 4)
    totals_hold(ledger)
    ledger.dropped([a[0]], 1, "no_reward:env_error:ValueError")
    ledger.trained(a[1:], 1, {a[1]: "1-0"})
    ledger.dropped(b, 1, "stale")
    totals_hold(ledger)
    ledger.trained(a[1:2], 2)  # a second fate is refused, never written
    ledger.dropped(["run-x-g9.0"], 2, "stale")  # an id never generated: refused too
    t = ledger.summary()
    assert (t.generated, t.trained, t.dropped, t.open, t.refused) == (8, 3, 5, 0, 2)
    assert t.by_reason == {"no_reward:env_error:ValueError": 1, "stale": 4}
    ledger.close()
    lines = read_ledger(tmp_path / "ledger.jsonl")
    assert [line.id for line in lines] == [a[0], *a[1:], *b] and len({line.id for line in lines}) == 8
    assert lines[1].entry == "1-0" and lines[0].reason.startswith("no_reward") and lines[1].reason is None


def test_a_fresh_ledger_empties_an_old_file(tmp_path: Path) -> None:
    old = Ledger(tmp_path)
    old.trained(old.open("old-g0", 2), 1)
    old.close()
    new = Ledger(tmp_path)
    new.close()
    assert (tmp_path / "ledger.jsonl").read_text() == ""


def test_resume_keeps_the_lineage_of_the_checkpoint(tmp_path: Path) -> None:
    """Decisions after the checkpoint were lost with the crash: the resumed ledger does not count
    them, and the samples they decided are open again (from the checkpoint's snapshot)."""
    ledger = Ledger(tmp_path)
    g0, g1 = ledger.open("r-a-g0", 2), ledger.open("r-a-g1", 2)
    ledger.trained(g0, 1)
    ledger.dropped(g1[:1], 2, "no_reward:env_reward_none")  # step 2 assembles after step 1 ended
    snapshot = ledger.snapshot(1)  # the checkpoint of step 1, written while step 2 assembles
    assert snapshot == {"r-a-g1": [0, 1]}
    ledger.trained(g1[1:], 2)
    ledger.open("r-a-g2", 2)
    ledger.close()
    resumed = Ledger(tmp_path, resume_step=1, open_groups=snapshot)
    t = resumed.summary()
    assert (t.generated, t.trained, t.dropped, t.open) == (4, 2, 0, 2)
    assert [line.id for line in read_ledger(resumed.path)] == g0
    resumed.dropped(g1, 2, "stale")
    totals_hold(resumed)
    resumed.close()


def test_a_line_torn_by_the_crash_ends_what_is_kept(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ids = ledger.open("r-a-g0", 3)
    ledger.trained(ids[:2], 1)
    ledger.close()
    with (tmp_path / "ledger.jsonl").open("a") as f:
        f.write('{"id": "r-a-g0.2", "fate": "tra')
    resumed = Ledger(tmp_path, resume_step=5, open_groups={"r-a-g0": [2]})
    assert resumed.summary().trained == 2 and resumed.summary().open == 1
    resumed.close()


def test_random_schedules_keep_generated_equal_to_trained_plus_dropped(tmp_path: Path) -> None:
    rng = random.Random(7)
    ledger = Ledger(tmp_path)
    open_ids: list[str] = []
    for step in range(1, 200):
        for _ in range(rng.randint(0, 3)):
            open_ids += ledger.open(f"r-a-g{step}-{rng.random()}", rng.randint(1, 4))
        rng.shuffle(open_ids)
        cut = rng.randint(0, len(open_ids))
        decided, open_ids = open_ids[:cut], open_ids[cut:]
        half = len(decided) // 2
        ledger.trained(decided[:half], step)
        ledger.dropped(decided[half:], step, rng.choice(["stale", "future", "lost:crash"]))
        totals_hold(ledger)
        assert ledger.summary().open == len(open_ids)
    ledger.close()
    lines = read_ledger(tmp_path / "ledger.jsonl")
    assert len({line.id for line in lines}) == len(lines)


def test_metrics_of_a_fresh_run_start_empty_and_a_resume_goes_on_from_its_step(tmp_path: Path) -> None:
    """Issue #11, defect 3: metrics.jsonl was opened in append mode, so a re-run into the same
    directory mixed its curve with the old run's."""
    first = MetricsWriter(tmp_path, [])
    for step in range(1, 6):
        first.log(step, {"train/reward_mean": step})
    first.close()
    rerun = MetricsWriter(tmp_path, [])
    rerun.log(1, {"train/reward_mean": 10.0})
    rerun.close()
    assert [r["step"] for r in read_rows(tmp_path / "metrics.jsonl")] == [1]
    resumed = MetricsWriter(tmp_path, [], resume_step=1)
    resumed.log(2, {"train/reward_mean": 20.0})
    resumed.close()
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/reward_mean"]) for r in rows] == [(1, 10.0), (2, 20.0)]


def test_tensorboard_drops_the_points_after_the_resumed_step(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rl.metrics import TensorBoardTracker

    first = MetricsWriter(tmp_path, [TensorBoardTracker(tmp_path)])
    for step in range(1, 6):
        first.log(step, {"train/reward_mean": float(step)})
    first.close()
    resumed = MetricsWriter(tmp_path, [TensorBoardTracker(tmp_path)], resume_step=2)
    for step in range(3, 5):
        resumed.log(step, {"train/reward_mean": 10.0 * step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars("train/reward_mean")]
    assert points == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def entry(i: int, group: str, index: int) -> EntryInfo:
    return EntryInfo(entry_id=f"{i}-0", trajectory_id=sample_id(group, index), group_id=group, group_size=2)


def test_adoption_trains_nothing_twice_and_loses_nothing_silently() -> None:
    stream = [
        entry(1, "r-a-g0", 0),
        entry(2, "r-a-g0", 1),  # decided before the checkpoint, not acked
        entry(3, "r-a-g1", 0),
        entry(4, "r-a-g1", 1),  # open at the checkpoint
        entry(5, "r-a-g2", 0),
        entry(6, "r-a-g2", 1),  # published after it
        EntryInfo(entry_id="7-0", trajectory_id=None, group_id=None, group_size=None),
    ]  # not ours
    open_groups = {"r-a-g1": [0, 1], "r-a-g3": [0, 1]}  # g3's episodes died with the crash
    plan = plan_adoption(stream, open_groups, decided={"r-a-g0.0", "r-a-g0.1"})
    assert plan.acknowledge == ["1-0", "2-0", "7-0"]
    assert plan.adopted == ["r-a-g2.0", "r-a-g2.1"]
    assert plan.lost == ["r-a-g3.0", "r-a-g3.1"]
    assert plan.groups == 2


def test_a_fresh_launch_and_a_resumed_one_share_only_what_they_should() -> None:
    """Issue #11, defect 2: group ids restarted at g0 on every launch and the stream was keyed by
    the run name alone, so a re-run under the same name trained the old run's entries."""
    one, two = Launch.fresh("run"), Launch.fresh("run")
    assert one.bus_id != two.bus_id and one.group_id(0) != two.group_id(0)
    meta = CheckpointMeta(
        step=3,
        lineage=one.lineage,
        launch=one.launch,
        world_size=1,
        rng_state=rng_state(random.Random(0)),
        env_weights=[1.0],
        tokens_generated=0,
        dropped={},
        open_groups={},
    )
    resumed = Launch.resumed("run", meta)
    assert resumed.bus_id == one.bus_id and resumed.consumer != one.consumer
    assert resumed.group_id(0) != one.group_id(0) and resumed.resumed_from == 3


def test_checkpoint_rng_state_round_trips_through_json() -> None:
    rng = random.Random(5)
    rng.random()
    meta = CheckpointMeta(
        step=1,
        lineage="l",
        launch="l",
        world_size=1,
        rng_state=rng_state(rng),
        env_weights=[1.0],
        tokens_generated=0,
        dropped={},
        open_groups={},
    )
    again = CheckpointMeta.model_validate(json.loads(meta.model_dump_json())).rng()
    assert [again.random() for _ in range(5)] == [rng.random() for _ in range(5)]


@pytest.mark.parametrize("missing", ["nothing", "meta"])
def test_only_complete_checkpoints_are_resumed_from(tmp_path: Path, missing: str) -> None:
    from rl.config import ConfigError
    from rl.resume import checkpoint_path, find_checkpoint, write_meta

    meta = CheckpointMeta(
        step=2,
        lineage="l",
        launch="l",
        world_size=1,
        rng_state=rng_state(random.Random(0)),
        env_weights=[1.0],
        tokens_generated=0,
        dropped={},
        open_groups={},
    )
    done = checkpoint_path(tmp_path, 2)
    done.mkdir(parents=True)
    write_meta(done, meta)
    checkpoint_path(tmp_path, 4).mkdir()  # interrupted: DCP files, no meta.json
    assert find_checkpoint(tmp_path, "latest")[0] == done
    with pytest.raises(ConfigError, match="is not a complete checkpoint directory"):
        find_checkpoint(tmp_path, str(checkpoint_path(tmp_path, 4)))
    if missing == "meta":
        (done / "meta.json").unlink()
        with pytest.raises(ConfigError, match="holds no complete checkpoint"):
            find_checkpoint(tmp_path, "latest")
