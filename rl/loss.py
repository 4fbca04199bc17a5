"""Advantages and the policy loss.

* Advantages are group-normalised: a sample's reward minus its group's mean, divided by the group's
  (population) standard deviation when `normalize_std`. Groups whose rewards are all equal carry no
  signal and are filtered before the step.
* The loss is token-level: summed over every model-sampled token of the batch and divided by the
  batch's total count of such tokens, so long and short completions weigh the same per token.
* Off-policy correction against the *sampler's* logprobs (the behaviour policy, which may be up to
  `max_staleness` versions old and is computed by a different kernel):
  - `decoupled_ppo` (AReaL's decoupled objective): the PPO ratio is taken against the proximal
    policy (the learner's weights at the start of the step) and clipped; the behaviour-to-proximal
    importance weight exp(prox − sampler) multiplies it, truncated at `is_cap`.
  - `truncated_is`: REINFORCE with the importance weight exp(logp − sampler), detached and
    truncated at `is_cap`; no clipping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from rl.config import AlgorithmSection


def group_advantages(rewards: Sequence[float], normalize_std: bool, eps: float = 1e-6) -> list[float]:
    """Advantages of one group's rewards."""
    r = torch.tensor(rewards, dtype=torch.float64)
    centred = r - r.mean()
    if normalize_std:
        centred = centred / (r.std(unbiased=False) + eps)
    return centred.tolist()


class TokenLoss(BaseModel):
    """The loss summed over one micro-batch's tokens, and statistics summed the same way."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    loss_sum: torch.Tensor
    """Sum of per-token losses (divide by the batch's token count)."""
    clipped: float
    """Tokens whose clipped term was the active one."""
    tokens: float
    """Model tokens in this micro-batch."""


def policy_loss(
    logp: torch.Tensor,
    prox_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    algo: AlgorithmSection,
) -> TokenLoss:
    """Per-token policy loss, summed. All tensors have the same shape; `mask` is 1 on model tokens.

    logp: current logprobs (with grad); prox_logp: learner logprobs at the start of the step;
    sampler_logp: the sampler's logprobs; advantages: each token's sequence advantage.
    """
    mask = mask.to(logp.dtype)
    if algo.loss == "decoupled_ppo":
        behaviour_w = torch.exp(prox_logp - sampler_logp).clamp(max=algo.is_cap).detach()
        ratio = torch.exp(logp - prox_logp.detach())
        unclipped = ratio * advantages
        clipped = ratio.clamp(1 - algo.clip_low, 1 + algo.clip_high) * advantages
        per_token = -behaviour_w * torch.minimum(unclipped, clipped)
        clip_active = (clipped < unclipped).to(logp.dtype)
    else:
        weight = torch.exp(logp - sampler_logp).clamp(max=algo.is_cap).detach()
        per_token = -weight * logp * advantages
        clip_active = (torch.exp(logp - sampler_logp) > algo.is_cap).to(logp.dtype)
    return TokenLoss(
        loss_sum=(per_token * mask).sum(),
        clipped=float((clip_active * mask).sum()),
        tokens=float(mask.sum()),
    )


VOCAB_CHUNK = 8192
"""Vocabulary columns `token_logprobs` turns into fp32 at a time. A 152 k vocabulary at 16 k
tokens holds 10 GB of fp32 logits per copy; the unchunked softmax kept two such copies for the
backward pass and a third for the entropy."""


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logprob of each target token under logits / temperature, and the entropy per position.

    logits: [..., V] predicting targets: [...]. Computed in vocabulary chunks of `VOCAB_CHUNK`
    columns, keeping no fp32 copy of the logits for the backward pass. The entropy is a metric: it
    carries no gradient."""
    flat = logits.reshape(-1, logits.shape[-1])
    logp, entropy = _ChunkedLogprob.apply(flat, targets.reshape(-1), temperature)
    return logp.view(targets.shape), entropy.view(targets.shape)


class _ChunkedLogprob(torch.autograd.Function):
    """logp[t] = z[t] − logsumexp(z) with z = logits / T, one fp32 vocabulary chunk at a time."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor,
                temperature: float) -> tuple[torch.Tensor, ...]:
        n = logits.shape[0]
        top = torch.full((n,), -torch.inf, device=logits.device)
        total = torch.zeros(n, device=logits.device)  # Σ exp(z − top)
        weighted = torch.zeros(n, device=logits.device)  # Σ exp(z − top) · z
        for start in range(0, logits.shape[1], VOCAB_CHUNK):
            z = logits[:, start:start + VOCAB_CHUNK].float() / temperature
            new_top = torch.maximum(top, z.max(-1).values)
            rescale = torch.exp(top - new_top)
            e = torch.exp(z - new_top[:, None])
            total = total * rescale + e.sum(-1)
            weighted = weighted * rescale + (e * z).sum(-1)
            top = new_top
        lse = top + total.log()
        logp = logits.gather(-1, targets[:, None]).squeeze(-1).float() / temperature - lse
        entropy = lse - weighted / total  # logsumexp − E_p[z]
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor, _grad_entropy: torch.Tensor) -> tuple[Any, None, None]:
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = grad_logp / ctx.temperature  # d logp[t] / d z = onehot(t) − softmax(z); z = logits / T
        for start in range(0, logits.shape[1], VOCAB_CHUNK):
            z = logits[:, start:start + VOCAB_CHUNK].float() / ctx.temperature
            g = -torch.exp(z - lse[:, None]) * scale[:, None]
            inside = (targets >= start) & (targets < start + z.shape[1])  # no host sync, unlike nonzero()
            g.scatter_add_(1, (targets - start).clamp(0, z.shape[1] - 1)[:, None], (scale * inside)[:, None])
            grad[:, start:start + VOCAB_CHUNK] = g.to(grad.dtype)
        return grad, None, None
