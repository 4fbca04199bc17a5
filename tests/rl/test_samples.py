"""The sample store's choices: which groups of a step are recorded, how long text is bounded, and
how a multi-turn completion splits into model and environment turns."""

import numpy as np

from rl.samples import pick_groups, to_record
from rl.trajectory import Trajectory


def traj(gid: str, mask: list[int]) -> Trajectory:
    n = len(mask)
    return Trajectory(
        id=f"{gid}-{n}",
        run_id="r",
        env="e",
        task_id="t",
        group_id=gid,
        group_size=2,
        prompt_ids=np.arange(3),
        completion_ids=np.arange(100, 100 + n),
        loss_mask=np.array(mask),
        sampler_logprobs=np.zeros(n),
        policy_versions=np.where(np.array(mask) == 1, 4, -1),
        reward=1.0,
    )


def test_whole_groups_are_picked_by_share_and_seed() -> None:
    groups = [[traj(f"g{i}", [1]), traj(f"g{i}", [1, 1])] for i in range(64)]
    picked = pick_groups(groups, 0.125, seed=3)
    assert len(picked) == 16 and len({t.group_id for t in picked}) == 8
    assert picked == pick_groups(groups, 0.125, seed=3) and picked != pick_groups(groups, 0.125, seed=4)
    assert len(pick_groups(groups[:3], 0.01, seed=0)) == 2  # at least one group when the share is above 0
    assert pick_groups(groups, 0.0, seed=0) == [] and len(pick_groups(groups, 1.0, seed=0)) == 128


def test_turns_split_where_the_mask_changes_and_text_is_cut() -> None:
    t = traj("g", [1, 1, 0, 0, 0, 1, 0, 1, 1])
    record = to_record(t, 9, lambda ids: "x" * (10 * len(ids)), max_chars=25, kind="train", trained_version=6)
    assert [(turn.role, turn.tokens) for turn in record.turns] == [
        ("model", 2),
        ("env", 3),
        ("model", 1),
        ("env", 1),
        ("model", 2),
    ]
    assert record.turns[1].text == "x" * 25 + " … [5 characters cut]" and record.turns[0].text == "x" * 20
    assert (record.policy_min, record.policy_max, record.staleness, record.completion_tokens) == (4, 4, 2, 5)
