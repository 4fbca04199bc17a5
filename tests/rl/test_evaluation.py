"""Evaluation sets: what a set evaluates (the split, params and data it inherits from the trained
environment of its name) and the errors a user can hit, before any engine starts."""

import pytest

from rl.config import ConfigError, load_config
from rl.evaluation import Evaluator
from rl.health import HealthMonitor


def evaluator(*overrides: str) -> Evaluator:
    return Evaluator(
        load_config(None, ["envs=[{name: arithmetic, params: {max_digits: 3, ops: '+'}}]", *overrides]), HealthMonitor()
    )


def test_a_set_takes_the_trained_environments_params_and_is_held_out_from_it() -> None:
    ev = evaluator(
        "eval.sets=[{env: arithmetic, n: 50}, {env: arithmetic, name: small, n: 7, params: {}}, "
        "{env: math, n: 4, pass_k: 4}]"
    )
    held_out, small, math = ev.sets
    assert held_out.params.max_digits == 3 and held_out.params.ops == "+"
    assert len(held_out.tasks) == 50 and all(t.id.startswith("arith-test-") for t in held_out.tasks)
    train = {t.meta["expr"] for t in held_out.cls.load_tasks(held_out.params, None, "train")}
    assert not train & {t.meta["expr"] for t in held_out.tasks}
    assert small.label == "small" and small.params.max_digits == 2 and len(small.tasks) == 7  # its own params
    assert math.label == "math" and len(math.tasks) == 4  # an environment the run does not train on


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ("[{env: nosuch}]", "eval.sets.0.env: Unknown environment 'nosuch'"),
        ("[{env: arithmetic}, {env: arithmetic, name: b, params: {max_digits: 0}}]", "eval.sets.1.params: "),
        ("[{env: math, data: /nonexistent.jsonl}]", "Dataset file '/nonexistent.jsonl' does not exist"),
    ],
)
def test_a_set_that_cannot_load_names_itself(sets: str, message: str) -> None:
    with pytest.raises((ConfigError, FileNotFoundError), match=message):
        evaluator(f"eval.sets={sets}")


def test_an_unscored_episode_is_reported_beside_the_accuracy() -> None:
    """Issue #9: the held-out accuracy was the mean over scored episodes only, with nothing saying
    how many had no reward; now their count is reported with it."""
    import numpy as np

    from rl.evaluation import _figures
    from rl.trajectory import Trajectory
    from workers.episode import EpisodeOutcome

    def scored(reward: float) -> EpisodeOutcome:
        t = Trajectory(
            id="t",
            run_id="r",
            env="e",
            task_id="x",
            group_id="g",
            group_size=1,
            prompt_ids=np.array([1]),
            completion_ids=np.array([2]),
            loss_mask=np.array([1]),
            sampler_logprobs=np.array([0.0]),
            policy_versions=np.array([0]),
            reward=reward,
        )
        return EpisodeOutcome(trajectory=t)

    unscored = EpisodeOutcome(trajectory=None, error="sandbox error", kind="env_reward_none")
    figures = _figures("set", [[scored(1.0)], [scored(0.0)], [unscored], [scored(1.0)]], [], 0)
    assert figures["eval/set/greedy"] == 2 / 3 and figures["eval/set/no_reward"] == 1.0
