"""One learner rank in this process (gloo, world size 1): the lr warm-up and its checkpoint."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from rl.config import AlgorithmSection, LearnerSection
from rl.learner import LearnerRank, TrainSample, _free_port, lr_multiplier


def _samples() -> list[TrainSample]:
    rng = np.random.default_rng(0)
    return [TrainSample(input_ids=rng.integers(3, 100, 12).astype(np.int32), prompt_len=6,
                        loss_mask=np.ones(6, np.int32), sampler_logprobs=np.full(6, -3.0, np.float32),
                        advantage=1.0 if i % 2 else -1.0) for i in range(4)]


@pytest.fixture()
def rank(tiny_model: str) -> Iterator[LearnerRank]:
    learner = LearnerSection(lr=1e-3, warmup_steps=4)
    r = LearnerRank(0, 1, _free_port(), tiny_model, learner, AlgorithmSection(), 1.0, 0)
    yield r
    dist.destroy_process_group()


def _lr(rank: LearnerRank) -> float:
    return rank.optimizer.param_groups[0]["lr"]


def test_lr_ramps_linearly_over_the_warmup_then_holds(rank: LearnerRank) -> None:
    samples, seen = _samples(), []
    for _ in range(6):
        seen.append(_lr(rank))
        rank.train_step([samples], [24])
    assert seen == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_lr_warms_up_holds_then_decays_linearly_to_its_floor() -> None:
    cfg = LearnerSection(lr=1e-3, warmup_steps=2, stable_steps=2, decay_steps=4, min_lr_ratio=0.2)
    got = [lr_multiplier(step, cfg) for step in range(10)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2])
    assert [lr_multiplier(s, LearnerSection(decay_steps=2)) for s in range(3)] == pytest.approx([1.0, 0.5, 0.0])


def test_checkpoint_restores_weights_optimizer_and_warmup_position(rank: LearnerRank, tiny_model: str,
                                                                     tmp_path: Path) -> None:
    samples = _samples()
    rank.train_step([samples], [24])
    rank.save_checkpoint(str(tmp_path / "ckpt"))
    saved = {k: v.detach().clone() for k, v in rank.model.state_dict().items()}
    rank.train_step([samples], [24])  # moves the weights and the schedule past the checkpoint
    rank.load_checkpoint(str(tmp_path / "ckpt"))
    assert _lr(rank) == pytest.approx(5e-4)
    for k, v in rank.model.state_dict().items():
        assert torch.equal(v, saved[k]), k
