"""Advantages and policy loss against values computed by hand."""

import math

import pytest
import torch

from rl.config import AlgorithmSection
from rl.loss import LossInputs, aggregation_weights, group_advantages, policy_loss, token_logprobs


def test_group_advantages_normalised_by_population_std() -> None:
    # mean 0.5, population std 0.5 -> (r - 0.5) / 0.5
    assert group_advantages([1.0, 0.0, 0.0, 1.0], normalize_std=True) == pytest.approx([1, -1, -1, 1], abs=1e-5)
    # mean 1.5, population std sqrt(1.25)
    adv = group_advantages([0.0, 1.0, 2.0, 3.0], normalize_std=True)
    assert adv == pytest.approx([d / math.sqrt(1.25) for d in (-1.5, -0.5, 0.5, 1.5)], abs=1e-5)


def test_group_advantages_mean_only_and_constant_group() -> None:
    assert group_advantages([1.0, 0.0, 0.0, 0.0], normalize_std=False) == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert group_advantages([1.0, 1.0, 1.0], normalize_std=True) == pytest.approx([0.0, 0.0, 0.0])


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _inputs(
    logp: torch.Tensor,
    prox: torch.Tensor,
    sampler: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    seq: list[int] | None = None,
    ages: list[int] | None = None,
    **extra: torch.Tensor,
) -> LossInputs:
    n = len(logp)
    return LossInputs(
        logp=logp,
        prox=prox,
        sampler=sampler,
        advantages=adv,
        mask=mask,
        weights=torch.ones(n, dtype=torch.float64),
        seq=torch.tensor(seq or [0] * n),
        ages=torch.tensor(ages or [0] * n),
        **extra,
    )


def test_decoupled_ppo_loss_and_gradient_by_hand() -> None:
    algo = AlgorithmSection(loss="decoupled_ppo", clip_low=0.2, clip_high=0.2, is_cap=2.0)
    logp = _t(math.log(0.5), math.log(0.3), math.log(0.2)).requires_grad_()
    prox = _t(math.log(0.4), math.log(0.3), math.log(0.1))
    sampler = _t(math.log(0.4), math.log(0.1), math.log(0.1))
    adv, mask = _t(1.0, 1.0, -1.0), _t(1.0, 1.0, 0.0)
    out = policy_loss(_inputs(logp, prox, sampler, adv, mask), algo)
    # token 0: w = 1, ratio 1.25 > 1.2 with A>0 -> clipped term 1.2 is the min: loss -1.2 (no grad)
    # token 1: w = exp(log .3 - log .1) = 3 -> capped 2; ratio 1 -> loss -2 * 1 = -2
    # token 2: masked out
    assert float(out.loss_sum.detach()) == pytest.approx(-3.2)
    assert out.policy_sum == pytest.approx(-3.2)
    assert out.tokens == 2 and out.clipped == 1
    out.loss_sum.backward()
    # d/dlogp of -w*ratio*A = -w*ratio*A for the unclipped token, 0 for the clipped and masked ones
    assert logp.grad.tolist() == pytest.approx([0.0, -2.0, 0.0])


def test_masked_importance_weights_leave_far_tokens_out() -> None:
    algo = AlgorithmSection(is_cap=2.0, is_mode="mask")
    logp = _t(math.log(0.3), math.log(0.3), math.log(0.3)).requires_grad_()
    sampler = _t(math.log(0.1), math.log(0.9), math.log(0.2))  # w = 3 (above), 1/3 (below), 1.5 (inside)
    out = policy_loss(_inputs(logp, logp.detach(), sampler, _t(1.0, 1.0, 1.0), _t(1.0, 1.0, 1.0)), algo)
    assert float(out.loss_sum.detach()) == pytest.approx(-1.5)
    out.loss_sum.backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0, -1.5])


def test_sequence_level_importance_weights_are_geometric_means() -> None:
    algo = AlgorithmSection(is_cap=10.0, is_level="sequence")
    logp = _t(0.0, 0.0, 0.0).requires_grad_()  # log-probabilities only enter through the weights here
    sampler = _t(-math.log(2.0), -math.log(8.0), 0.0)  # token weights 2, 8 | 1
    out = policy_loss(_inputs(logp, logp.detach(), sampler, _t(1.0, 1.0, 1.0), _t(1.0, 1.0, 1.0), seq=[0, 0, 1]), algo)
    # sequence 0: geometric mean of 2 and 8 = 4 on both tokens; sequence 1: weight 1
    out.loss_sum.backward()
    assert logp.grad.tolist() == pytest.approx([-4.0, -4.0, -1.0])


def test_gspo_clips_the_sequence_ratio() -> None:
    algo = AlgorithmSection(loss="gspo", clip_low=0.1, clip_high=0.1, is_cap=10.0)
    prox = _t(0.0, 0.0, 0.0, 0.0)
    # sequence 0: token log-ratios 0.2 and -0.1 -> mean 0.05, ratio e^0.05 = 1.051 (inside the clip);
    # sequence 1: log-ratios 0.5, 0.3 -> e^0.4 = 1.49 > 1.1 with A > 0: clipped, no gradient
    logp = _t(0.2, -0.1, 0.5, 0.3).requires_grad_()
    out = policy_loss(_inputs(logp, prox, prox, _t(1.0, 1.0, 2.0, 2.0), _t(1.0, 1.0, 1.0, 1.0), seq=[0, 0, 1, 1]), algo)
    r0 = math.exp(0.05)
    assert float(out.loss_sum.detach()) == pytest.approx(-2 * r0 - 2 * (1.1 * 2.0))
    out.loss_sum.backward()
    # each of sequence 0's 2 tokens carries -r0·A (weight 1 each), and d r0 / d logp_t = r0 / 2
    assert logp.grad.tolist() == pytest.approx([-r0, -r0, 0.0, 0.0])
    assert out.clipped == 2


def test_dual_clip_bounds_a_negative_advantage() -> None:
    algo = AlgorithmSection(clip_low=0.2, clip_high=0.2, dual_clip=3.0, is_cap=10.0)
    prox = _t(0.0, 0.0)
    logp = _t(math.log(5.0), math.log(2.0)).requires_grad_()  # ratios 5 and 2, A = -1
    out = policy_loss(_inputs(logp, prox, prox, _t(-1.0, -1.0), _t(1.0, 1.0)), algo)
    # PPO alone: min(5·-1, 1.2·-1) = -5 and min(-2, -1.2) = -2; dual clip floors at 3·-1 = -3
    assert float(out.loss_sum.detach()) == pytest.approx(3.0 + 2.0)
    out.loss_sum.backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 2.0])
    assert out.clipped == 1


def test_truncated_is_loss_and_gradient_by_hand() -> None:
    algo = AlgorithmSection(loss="truncated_is", is_cap=2.0)
    logp = _t(math.log(0.5), math.log(0.9)).requires_grad_()
    sampler = _t(math.log(0.5), math.log(0.3))
    out = policy_loss(_inputs(logp, logp.detach(), sampler, _t(2.0, -1.0), _t(1.0, 1.0)), algo)
    # weights: 1 and min(3, 2) = 2 -> loss = -(1*log.5*2) - (2*log.9*-1)
    assert float(out.loss_sum.detach()) == pytest.approx(-2 * math.log(0.5) + 2 * math.log(0.9))
    out.loss_sum.backward()
    assert logp.grad.tolist() == pytest.approx([-2.0, 2.0])
    assert out.clipped == 1  # the second token's weight was truncated


@pytest.mark.parametrize(
    ("estimator", "value", "grad"),
    [
        ("k1", math.log(0.5) - math.log(0.25), 1.0),  # logp − ref; d/dlogp = 1
        ("k3", 0.5 - math.log(0.5) - 1, 1 - 0.5),  # e^d − d − 1, d = ref − logp; d/dlogp = 1 − e^d
    ],
)
def test_kl_to_the_reference_by_hand(estimator: str, value: float, grad: float) -> None:
    algo = AlgorithmSection(kl_coef=0.5, kl_estimator=estimator)
    logp = _t(math.log(0.5)).requires_grad_()
    zero = _t(0.0)  # advantage 0: only the KL term is left
    out = policy_loss(_inputs(logp, logp.detach(), logp.detach(), zero, _t(1.0), ref=_t(math.log(0.25))), algo)
    assert float(out.loss_sum.detach()) == pytest.approx(0.5 * value)
    assert out.kl_sum == pytest.approx(value)
    out.loss_sum.backward()
    assert logp.grad.tolist() == pytest.approx([0.5 * grad])


def test_entropy_bonus_gradient_matches_autograd_of_the_plain_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, dtype=torch.float32, requires_grad=True)
    targets = torch.tensor([1, 4, 6])
    _, entropy = token_logprobs(logits, targets, temperature=0.7)
    (entropy * torch.tensor([1.0, 2.0, -0.5])).sum().backward()
    plain = logits.detach().clone().requires_grad_()
    logp_all = torch.log_softmax(plain / 0.7, -1)
    (-(logp_all.exp() * logp_all).sum(-1) * torch.tensor([1.0, 2.0, -0.5])).sum().backward()
    assert torch.allclose(logits.grad, plain.grad, atol=1e-5)


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        ("token_mean", [1 / 10, 1 / 10]),  # 4 + 6 tokens
        ("sequence_mean", [1 / (2 * 4), 1 / (2 * 6)]),  # each sequence's mean, averaged over 2
        ("token_sum", [1 / (2 * 16), 1 / (2 * 16)]),  # Dr. GRPO: a constant, 2 sequences × max_tokens 16
    ],
)
def test_aggregation_weights(aggregation: str, expected: list[float]) -> None:
    algo = AlgorithmSection(aggregation=aggregation)
    assert aggregation_weights([4, 6], algo, max_tokens=16) == pytest.approx(expected)


def test_importance_statistics_by_staleness() -> None:
    logp = _t(0.0, 0.0, 0.0, 0.0)
    sampler = _t(-math.log(3.0), 0.0, math.log(3.0), 0.0)  # w = 3, 1, 1/3 | 1 (masked out)
    out = policy_loss(
        _inputs(logp, logp, sampler, _t(1.0, 1.0, 1.0, 1.0), _t(1.0, 1.0, 1.0, 0.0), ages=[2, 0, 2, 1]),
        AlgorithmSection(is_cap=2.0),
    )
    assert sorted(out.importance) == [0, 2]
    old = out.importance[2]
    assert (old.tokens, old.above, old.below) == (2, 1, 1)
    assert old.kl_sum == pytest.approx((3 - 1 - math.log(3)) + (1 / 3 - 1 + math.log(3)))
    assert old.histogram[0] + old.histogram[-1] == 0 and sum(old.histogram) == 2
    assert out.importance[0].kl_sum == 0 and out.importance[0].quantile(0.5) == pytest.approx(1.05, abs=0.01)


def test_token_logprobs_fp32_with_temperature() -> None:
    logits = torch.tensor([[[2.0, 0.0, -1.0]]], dtype=torch.bfloat16)
    logp, entropy = token_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    z = torch.tensor([1.0, 0.0, -0.5])
    expected = z[0] - torch.logsumexp(z, 0)
    assert logp.dtype == torch.float32
    assert float(logp) == pytest.approx(float(expected), abs=1e-6)
    p = torch.softmax(z, 0)
    assert float(entropy) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)


def _traj(env: str, completion: int, truncated: bool = False, mask: list[int] | None = None):
    import numpy as np

    from rl.trajectory import Trajectory

    m = np.array(mask if mask is not None else [1] * completion)
    return Trajectory(
        id="t",
        run_id="r",
        env=env,
        task_id="x",
        group_id="g",
        group_size=2,
        prompt_ids=np.array([1, 2]),
        completion_ids=np.arange(len(m)),
        loss_mask=m,
        sampler_logprobs=np.zeros(len(m)),
        policy_versions=np.zeros(len(m)),
        reward=0.0,
        truncated=truncated,
    )


def test_overlong_penalty_falls_linearly_over_the_buffer() -> None:
    from rl.loss import overlong_penalty

    algo = AlgorithmSection(overlong="penalty", overlong_buffer=4, overlong_penalty=0.5)
    lengths = {10: 0.0, 12: 0.0, 13: -0.125, 14: -0.25, 16: -0.5}  # max_tokens 16, free up to 12
    assert {n: overlong_penalty(_traj("e", n), algo, 16) for n in lengths} == pytest.approx(lengths)
    # multi-turn: the last turn's length counts (3 model tokens after an environment turn)
    assert overlong_penalty(_traj("e", 0, mask=[1] * 20 + [0, 0] + [1] * 3), algo, 16) == 0.0
    assert overlong_penalty(_traj("e", 16), AlgorithmSection(), 16) == 0.0


def test_batch_advantages_filter_normalise_per_env_and_weight() -> None:
    from rl.loss import batch_advantages

    a1, a2, b1, b2, c1, c2 = (
        _traj("a", 3),
        _traj("a", 3, truncated=True),
        _traj("b", 3),
        _traj("b", 3),
        _traj("a", 3),
        _traj("a", 3),
    )
    groups, rewards = [[a1, a2], [b1, b2], [c1, c2]], [[1.0, 0.0], [10.0, 0.0], [1.0, 1.0]]
    algo = AlgorithmSection(normalize_std=False, env_advantage_norm=True, overlong="filter")
    scored, filtered = batch_advantages(groups, rewards, algo, {"b": 2.0}, max_tokens=16)
    assert filtered == 1  # the group without signal
    # group baselines: a ±0.5, b ±5; per env divided by the std over the batch (0.5 and 5): ±1;
    # b's loss weight 2: ±2; a2 hit the token limit and is left out (its baseline still counted it)
    assert [(t is a1, t is b1, t is b2) for t, _ in scored] == [
        (True, False, False),
        (False, True, False),
        (False, False, True),
    ]
    assert [adv for _, adv in scored] == pytest.approx([1.0, 2.0, -2.0], abs=1e-5)
