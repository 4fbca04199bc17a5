"""Advantages and policy loss against values computed by hand."""

import math

import pytest
import torch

from rl.config import AlgorithmSection
from rl.loss import group_advantages, policy_loss, token_logprobs


def test_group_advantages_normalised_by_population_std() -> None:
    # mean 0.5, population std 0.5 -> (r - 0.5) / 0.5
    assert group_advantages([1.0, 0.0, 0.0, 1.0], normalize_std=True) == pytest.approx([1, -1, -1, 1], abs=1e-5)
    # mean 1.5, population std sqrt(1.25)
    adv = group_advantages([0.0, 1.0, 2.0, 3.0], normalize_std=True)
    assert adv == pytest.approx([-1.5 / math.sqrt(1.25), -0.5 / math.sqrt(1.25), 0.5 / math.sqrt(1.25), 1.5 / math.sqrt(1.25)], abs=1e-5)


def test_group_advantages_mean_only_and_constant_group() -> None:
    assert group_advantages([1.0, 0.0, 0.0, 0.0], normalize_std=False) == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert group_advantages([1.0, 1.0, 1.0], normalize_std=True) == pytest.approx([0.0, 0.0, 0.0])


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_decoupled_ppo_loss_and_gradient_by_hand() -> None:
    algo = AlgorithmSection(loss="decoupled_ppo", clip_low=0.2, clip_high=0.2, is_cap=2.0)
    logp = _t(math.log(0.5), math.log(0.3), math.log(0.2)).requires_grad_()
    prox = _t(math.log(0.4), math.log(0.3), math.log(0.1))
    sampler = _t(math.log(0.4), math.log(0.1), math.log(0.1))
    adv, mask = _t(1.0, 1.0, -1.0), _t(1.0, 1.0, 0.0)
    out = policy_loss(logp, prox, sampler, adv, mask, algo)
    # token 0: w = 1, ratio 1.25 > 1.2 with A>0 -> clipped term 1.2 is the min: loss -1.2 (no grad)
    # token 1: w = exp(log .3 - log .1) = 3 -> capped 2; ratio 1 -> loss -2 * 1 = -2
    # token 2: masked out
    assert float(out.loss_sum.detach()) == pytest.approx(-3.2)
    assert out.tokens == 2 and out.clipped == 1
    out.loss_sum.backward()
    # d/dlogp of -w*ratio*A = -w*ratio*A for the unclipped token, 0 for the clipped and masked ones
    assert logp.grad.tolist() == pytest.approx([0.0, -2.0, 0.0])


def test_truncated_is_loss_and_gradient_by_hand() -> None:
    algo = AlgorithmSection(loss="truncated_is", is_cap=2.0)
    logp = _t(math.log(0.5), math.log(0.9)).requires_grad_()
    sampler = _t(math.log(0.5), math.log(0.3))
    out = policy_loss(logp, logp.detach(), sampler, _t(2.0, -1.0), _t(1.0, 1.0), algo)
    # weights: 1 and min(3, 2) = 2 -> loss = -(1*log.5*2) - (2*log.9*-1)
    assert float(out.loss_sum.detach()) == pytest.approx(-2 * math.log(0.5) + 2 * math.log(0.9))
    out.loss_sum.backward()
    assert logp.grad.tolist() == pytest.approx([-2.0, 2.0])
    assert out.clipped == 1  # the second token's weight was truncated


def test_token_logprobs_fp32_with_temperature() -> None:
    logits = torch.tensor([[[2.0, 0.0, -1.0]]], dtype=torch.bfloat16)
    logp, entropy = token_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    z = torch.tensor([1.0, 0.0, -0.5])
    expected = z[0] - torch.logsumexp(z, 0)
    assert logp.dtype == torch.float32
    assert float(logp) == pytest.approx(float(expected), abs=1e-6)
    p = torch.softmax(z, 0)
    assert float(entropy) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)
