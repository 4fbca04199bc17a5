"""Advantages and the policy loss.

* Advantages are group-normalised: a sample's reward minus its group's mean, divided by the group's
  (population) standard deviation when `normalize_std` (Dr. GRPO: mean only). Groups whose rewards
  are all equal carry no signal and are filtered (or replaced, with dynamic sampling) before the step.
* Aggregation (`aggregation`): each sequence gets one weight for all its tokens, computed on the
  driver over the whole minibatch (`aggregation_weights`), so ranks and micro-batches need no
  global counts: `token_mean` (Σ over the batch's model tokens / their count), `sequence_mean`
  (the mean over sequences of each one's token mean: GRPO's original) or `token_sum` (Σ over tokens /
  (sequences × max_tokens): Dr. GRPO's constant normaliser, no length bias).
* Off-policy correction against the *sampler's* logprobs (the behaviour policy, which may be up to
  `max_staleness` versions old and is computed by a different kernel). The behaviour weight is
  w = exp(prox − sampler), prox being the learner's logprobs at the start of the step. Per token
  (`is_level: token`) or per sequence (`is_level: sequence`: the geometric mean of its tokens'
  weights); weights above `is_cap` are truncated to it (`is_mode: truncate`), or tokens whose weight
  lies outside [1/is_cap, is_cap] are left out of the loss (`is_mode: mask`).
  - `decoupled_ppo` (AReaL's decoupled objective): the PPO ratio r = exp(logp − prox) is clipped to
    [1 − clip_low, 1 + clip_high] and multiplied by w. With one minibatch r = 1 and the clip never
    acts: the objective is importance-weighted REINFORCE.
  - `gspo`: the same with r taken per sequence, as the geometric mean of its tokens' ratios.
  - `truncated_is`: REINFORCE with the weight exp(logp − sampler), detached, treated as above.
  - `dual_clip` (c > 1): for negative advantages the objective is bounded below by c · A.
* Regularisers: `kl_coef` × KL to a frozen reference policy (`k1` = logp − ref, `k3` =
  exp(ref − logp) − (ref − logp) − 1, per token, the reference's logprobs computed on the learner
  ranks), and −`entropy_coef` × entropy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from rl.config import AlgorithmSection
from rl.trajectory import Trajectory


def group_advantages(rewards: Sequence[float], normalize_std: bool, eps: float = 1e-6) -> list[float]:
    """Advantages of one group's rewards."""
    r = torch.tensor(rewards, dtype=torch.float64)
    centred = r - r.mean()
    if normalize_std:
        centred = centred / (r.std(unbiased=False) + eps)
    return centred.tolist()


def overlong_penalty(t: Trajectory, algo: AlgorithmSection, max_tokens: int) -> float:
    """DAPO's soft overlong punishment of the last turn's length L: 0 up to max_tokens − buffer, then
    falling linearly to −overlong_penalty at max_tokens (a turn cut there is truncated)."""
    if algo.overlong != "penalty" or not algo.overlong_buffer:
        return 0.0
    mask = np.asarray(t.loss_mask)
    last = len(mask) - np.flatnonzero(mask == 0)[-1] - 1 if (mask == 0).any() else len(mask)
    free = max_tokens - algo.overlong_buffer
    return -algo.overlong_penalty * min(1.0, max(0.0, (last - free) / algo.overlong_buffer))


def batch_advantages(
    groups: Sequence[Sequence[Trajectory]],
    rewards: Sequence[Sequence[float]],
    algo: AlgorithmSection,
    loss_weights: Mapping[str, float],
    max_tokens: int,
) -> tuple[list[tuple[Trajectory, float]], int]:
    """Each trained sample with its advantage, and how many groups were filtered for carrying no
    signal. In order: the overlong penalty joins the reward; group baselines (and stds); per
    environment, optionally, the advantages divided by their std over the batch (environments with
    other reward scales pull equally); each environment's loss weight; truncated samples left out
    under `overlong: filter` (their group's baseline still counts them, as in DAPO)."""
    scored: list[tuple[Trajectory, float]] = []
    filtered = 0
    for group, group_rewards in zip(groups, rewards, strict=True):
        shaped = [r + overlong_penalty(t, algo, max_tokens) for t, r in zip(group, group_rewards)]
        if algo.filter_zero_variance and max(shaped) == min(shaped):
            filtered += 1
            continue
        scored += zip(group, group_advantages(shaped, algo.normalize_std))
    if algo.env_advantage_norm:
        by_env: dict[str, list[float]] = {}
        for t, adv in scored:
            by_env.setdefault(t.env, []).append(adv)
        std = {env: float(np.std(advs)) + 1e-6 for env, advs in by_env.items()}
        scored = [(t, adv / std[t.env]) for t, adv in scored]
    scored = [(t, adv * loss_weights.get(t.env, 1.0)) for t, adv in scored]
    if algo.overlong == "filter":
        scored = [(t, adv) for t, adv in scored if not t.truncated]
    return scored, filtered


def aggregation_weights(token_counts: Sequence[int], algo: AlgorithmSection, max_tokens: int) -> list[float]:
    """Each sequence's per-token loss weight under `algo.aggregation`, for one minibatch whose
    sequences have `token_counts` model tokens: the loss is Σ weight × per-token loss."""
    n = max(len(token_counts), 1)
    if algo.aggregation == "token_mean":
        return [1.0 / max(sum(token_counts), 1)] * len(token_counts)
    if algo.aggregation == "sequence_mean":
        return [1.0 / (n * max(c, 1)) for c in token_counts]
    return [1.0 / (n * max_tokens)] * len(token_counts)


IS_EDGES = (-2.3026, -0.6931, -0.2231, -0.0513, 0.0488, 0.1823, 0.6931, 2.3026)
"""Edges of the log behaviour-weight histogram: weights 0.1, 0.5, 0.8, 0.95, 1.05, 1.2, 2, 10."""


class ImportanceStats(BaseModel):
    """The behaviour weights w = exp(prox − sampler) of some tokens (one staleness, say), summed so
    that ranks and micro-batches add up: the evidence of how far the sampler's policy drifted."""

    tokens: float = 0.0
    """Model tokens counted."""
    log_w_sum: float = 0.0
    """Σ log w."""
    kl_sum: float = 0.0
    """Σ k3 estimate of KL(sampler ‖ learner): w − 1 − log w."""
    above: float = 0.0
    """Tokens with w > is_cap (truncated, or masked)."""
    below: float = 0.0
    """Tokens with w < 1 / is_cap (masked under `is_mode: mask`)."""
    histogram: list[float] = Field(default_factory=lambda: [0.0] * (len(IS_EDGES) + 1))
    """Token counts of log w between consecutive `IS_EDGES` (open-ended first and last bins)."""

    def add(self, other: ImportanceStats) -> None:
        self.tokens += other.tokens
        self.log_w_sum += other.log_w_sum
        self.kl_sum += other.kl_sum
        self.above += other.above
        self.below += other.below
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram)]

    def quantile(self, q: float) -> float:
        """The weight at quantile q, read off the histogram (a bin's upper edge; the last bin's
        lower edge)."""
        import math

        need, seen = q * self.tokens, 0.0
        for count, edge in zip(self.histogram, IS_EDGES):
            seen += count
            if seen >= need and count:
                return math.exp(edge)
        return math.exp(IS_EDGES[-1])


def merge_importance(parts: Sequence[dict[int, ImportanceStats]]) -> dict[int, ImportanceStats]:
    """Per-age statistics of several ranks (or micro-batches) added up."""
    out: dict[int, ImportanceStats] = {}
    for part in parts:
        for age, stats in part.items():
            out.setdefault(age, ImportanceStats()).add(stats)
    return out


@dataclass
class LossInputs:
    """Per-token tensors of one micro-batch (all [M], aligned)."""

    logp: torch.Tensor
    """Current logprobs, with gradient."""
    prox: torch.Tensor
    """Learner logprobs at the start of the step (no gradient)."""
    sampler: torch.Tensor
    """The sampler's logprobs."""
    advantages: torch.Tensor
    """Each token's sequence advantage."""
    mask: torch.Tensor
    """1 on a token that counts."""
    weights: torch.Tensor
    """Aggregation weight of each token's sequence (`aggregation_weights`)."""
    seq: torch.Tensor
    """int64: the index of each token's sequence within the micro-batch."""
    ages: torch.Tensor
    """int64: the staleness of each token's sequence (learner version − its oldest token's)."""
    entropy: torch.Tensor | None = None
    """Entropy at each position (with gradient when there is an entropy bonus)."""
    ref: torch.Tensor | None = None
    """The reference policy's logprobs (when there is a KL term)."""


class TokenLoss(BaseModel):
    """The loss of one micro-batch, and statistics summed over its tokens."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    loss_sum: torch.Tensor
    """Σ aggregation weight × per-token loss: what to backpropagate (after the ranks' scaling)."""
    policy_sum: float
    """Σ per-token loss, unweighted (for the logged mean)."""
    clipped: float
    """Tokens whose clipped (or dual-clipped) term was the active one."""
    tokens: float
    """Model tokens in this micro-batch."""
    kl_sum: float = 0.0
    """Σ of the KL estimate to the reference policy."""
    importance: dict[int, ImportanceStats] = Field(default_factory=dict)
    """Behaviour-weight statistics by staleness."""


def _seq_mean(x: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each token's value replaced by the mean over its sequence's counted tokens."""
    n = int(seq.max()) + 1 if seq.numel() else 0
    total = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, seq, x * mask)
    count = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, seq, mask)
    return (total / count.clamp(min=1))[seq]


def _behaviour_weight(log_w: torch.Tensor, t: LossInputs, algo: AlgorithmSection) -> torch.Tensor:
    """The (detached) importance weight each token's loss is multiplied by."""
    if algo.is_level == "sequence":
        log_w = _seq_mean(log_w, t.seq, t.mask)
    w = torch.exp(log_w)
    if algo.is_mode == "truncate":
        return w.clamp(max=algo.is_cap)
    inside = (w <= algo.is_cap) & (w >= 1.0 / algo.is_cap)
    return torch.where(inside, w, torch.zeros_like(w))


def _objective(t: LossInputs, algo: AlgorithmSection) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token policy loss and whether its clipped term was the active one."""
    mask = t.mask.to(t.logp.dtype)
    prox = t.prox.detach()
    if algo.loss == "truncated_is":
        w = _behaviour_weight(t.logp.detach() - t.sampler, t, algo)
        return -w * t.logp * t.advantages, (w < torch.exp(t.logp.detach() - t.sampler)).to(mask.dtype)
    w = _behaviour_weight(prox - t.sampler, t, algo)
    log_ratio = t.logp - prox
    if algo.loss == "gspo":
        log_ratio = _seq_mean(log_ratio, t.seq, mask)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * t.advantages
    clipped = ratio.clamp(1 - algo.clip_low, 1 + algo.clip_high) * t.advantages
    objective = torch.minimum(unclipped, clipped)
    active = clipped < unclipped
    if algo.dual_clip is not None:
        floor = algo.dual_clip * t.advantages
        dual = (t.advantages < 0) & (objective < floor)
        objective = torch.where(dual, floor, objective)
        active = active | dual
    return -w * objective, active.to(mask.dtype)


def policy_loss(t: LossInputs, algo: AlgorithmSection) -> TokenLoss:
    """The loss of one micro-batch (see the module docstring)."""
    mask = t.mask.to(t.logp.dtype)
    per_token, active = _objective(t, algo)
    policy_sum = float((per_token.detach() * mask).sum())
    kl_sum = 0.0
    if t.ref is not None and algo.kl_coef:
        d = t.ref.detach() - t.logp
        kl = -d if algo.kl_estimator == "k1" else torch.exp(d) - d - 1
        per_token = per_token + algo.kl_coef * kl
        kl_sum = float((kl.detach() * mask).sum())
    if t.entropy is not None and algo.entropy_coef:
        per_token = per_token - algo.entropy_coef * t.entropy
    return TokenLoss(
        loss_sum=(per_token * mask * t.weights).sum(),
        policy_sum=policy_sum,
        clipped=float((active * mask).sum()),
        tokens=float(mask.sum()),
        kl_sum=kl_sum,
        importance=importance_by_age(t, algo.is_cap),
    )


def importance_by_age(t: LossInputs, is_cap: float) -> dict[int, ImportanceStats]:
    """Behaviour-weight statistics of the counted tokens, by their sequence's staleness."""
    with torch.no_grad():
        keep = t.mask > 0
        log_w = (t.prox - t.sampler)[keep].double().cpu()
        ages = t.ages[keep].cpu()
        bins = torch.bucketize(log_w, torch.tensor(IS_EDGES, dtype=torch.float64))
        out: dict[int, ImportanceStats] = {}
        for age in ages.unique().tolist():
            sel = ages == age
            lw, w = log_w[sel], torch.exp(log_w[sel])
            hist = torch.bincount(bins[sel], minlength=len(IS_EDGES) + 1).double()
            out[int(age)] = ImportanceStats(
                tokens=float(sel.sum()),
                log_w_sum=float(lw.sum()),
                kl_sum=float((w - 1 - lw).sum()),
                above=float((w > is_cap).sum()),
                below=float((w < 1 / is_cap).sum()),
                histogram=hist.tolist(),
            )
        return out


VOCAB_CHUNK = 8192
"""Vocabulary columns `token_logprobs` turns into fp32 at a time. A 152 k vocabulary at 16 k
tokens holds 10 GB of fp32 logits per copy; the unchunked softmax kept two such copies for the
backward pass and a third for the entropy."""


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logprob of each target token under logits / temperature, and the entropy per position.

    logits: [..., V] predicting targets: [...]. Computed in vocabulary chunks of `VOCAB_CHUNK`
    columns, keeping no fp32 copy of the logits for the backward pass. The entropy carries a
    gradient (for an entropy bonus) only where it is used."""
    flat = logits.reshape(-1, logits.shape[-1])
    logp, entropy = _ChunkedLogprob.apply(flat, targets.reshape(-1), temperature)
    return logp.view(targets.shape), entropy.view(targets.shape)


class _ChunkedLogprob(torch.autograd.Function):
    """logp[t] = z[t] − logsumexp(z) with z = logits / T, one fp32 vocabulary chunk at a time."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, ...]:
        n = logits.shape[0]
        top = torch.full((n,), -torch.inf, device=logits.device)
        total = torch.zeros(n, device=logits.device)  # Σ exp(z − top)
        weighted = torch.zeros(n, device=logits.device)  # Σ exp(z − top) · z
        for start in range(0, logits.shape[1], VOCAB_CHUNK):
            z = logits[:, start : start + VOCAB_CHUNK].float() / temperature
            new_top = torch.maximum(top, z.max(-1).values)
            rescale = torch.exp(top - new_top)
            e = torch.exp(z - new_top[:, None])
            total = total * rescale + e.sum(-1)
            weighted = weighted * rescale + (e * z).sum(-1)
            top = new_top
        lse = top + total.log()
        logp = logits.gather(-1, targets[:, None]).squeeze(-1).float() / temperature - lse
        entropy = lse - weighted / total  # logsumexp − E_p[z]
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)  # no entropy bonus: its gradient arrives as None, and costs nothing
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None) -> tuple[Any, None, None]:
        logits, targets, lse, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)
        t = ctx.temperature
        scale = grad_logp / t if grad_logp is not None else torch.zeros_like(lse)
        for start in range(0, logits.shape[1], VOCAB_CHUNK):
            z = logits[:, start : start + VOCAB_CHUNK].float() / t
            log_p = z - lse[:, None]
            g = -torch.exp(log_p) * scale[:, None]  # d logp[t] / d z = onehot(t) − softmax(z); z = logits / T
            inside = (targets >= start) & (targets < start + z.shape[1])  # no host sync, unlike nonzero()
            g.scatter_add_(1, (targets - start).clamp(0, z.shape[1] - 1)[:, None], (scale * inside)[:, None])
            if grad_entropy is not None:  # d H / d z_j = −p_j (log p_j + H)
                g -= torch.exp(log_p) * (log_p + entropy[:, None]) * (grad_entropy / t)[:, None]
            grad[:, start : start + VOCAB_CHUNK] = g.to(grad.dtype)
        return grad, None, None
