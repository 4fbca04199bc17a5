"""The learner's micro-batches: samples packed into one row each, without padding tokens.

Invariants:
* A micro-batch is one row of N = Σ len(sample) tokens. Each sample keeps its own position ids
  (0 … len − 1) and attention never crosses a sample boundary: `PackedLayout.cu_seqlens` bounds
  every sample, and the attention kernels in `rl.parallelize` honour it.
* Logits are computed only at `positions`, the row positions that predict a model token
  (loss_mask 1): prompt and environment tokens cost no output-head or logprob work. Every
  per-token tensor of a micro-batch (targets, sampler logprobs, advantages, proximal logprobs) is
  aligned with `positions`.
* Packing is deterministic (longest sample first, in order), so the proximal pass and the training
  pass of a step see the same micro-batches, and a reference loop can reproduce them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class TrainSample(BaseModel):
    """One trajectory as the learner needs it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    input_ids: np.ndarray
    """prompt_ids + completion_ids (int32)."""
    prompt_len: int = Field(ge=1)
    """Length of the prompt inside `input_ids` (at least one token: it predicts the first
    completion token)."""
    loss_mask: np.ndarray
    """Per completion token: 1 model token, 0 environment token."""
    sampler_logprobs: np.ndarray
    """Per completion token (float32)."""
    advantage: float
    """The sequence's advantage."""
    weight: float = 1.0
    """Its tokens' weight in the minibatch's loss (`rl.loss.aggregation_weights`, set by the
    learner group)."""
    age: int = Field(0, ge=0)
    """Its staleness: the learner's version at this step minus the version of its oldest token."""


@dataclass(frozen=True)
class PackedLayout:
    """Where each sample of a packed row starts and ends; what the attention kernels read. Passed
    to the model as the keyword argument `packed`, which transformers hands on to attention."""

    cu_seqlens: Any
    """int32 [S + 1]: sample s occupies row positions cu_seqlens[s] … cu_seqlens[s + 1] − 1."""
    max_seqlen: int
    """Length of the longest sample."""
    pad_index: Any
    """int64 [N]: the position of each row token in an [S, max_seqlen] right-padded layout (the
    block-diagonal path attends per sample in that layout)."""


class MicroBatch(BaseModel):
    """One forward/backward's worth of packed samples (see the module's invariants)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    input_ids: Any
    """int64 [1, N]: the samples' tokens, one after another."""
    position_ids: Any
    """int64 [1, N]: each token's position inside its own sample."""
    layout: PackedLayout
    """Sample boundaries for attention."""
    positions: Any
    """int64 [M]: row positions whose logits are needed (each predicts one model token)."""
    targets: Any
    """int64 [M]: the model token predicted at each of `positions`."""
    mask: Any
    """float32 [M]: 1 for a token that counts; all 0 only in the collective-pairing dummy."""
    sampler: Any
    """float32 [M]: the sampler's logprob of each target token."""
    advantages: Any
    """float32 [M]: the advantage of each target token's sequence."""
    weights: Any
    """float32 [M]: the aggregation weight of each target token's sequence."""
    seq: Any
    """int64 [M]: the index of each target token's sequence in this micro-batch."""
    ages: Any
    """int64 [M]: the staleness of each target token's sequence."""
    proximal: Any = None
    """float32 [M]: learner logprobs at the start of the step (set when a step has minibatches)."""

    def to(self, device: Any) -> MicroBatch:
        """The same micro-batch with every tensor on `device`."""
        layout = PackedLayout(
            self.layout.cu_seqlens.to(device), self.layout.max_seqlen, self.layout.pad_index.to(device)
        )
        moved = {k: v.to(device) for k, v in self.__dict__.items() if hasattr(v, "to") and k != "layout"}
        return self.model_copy(update={**moved, "layout": layout})

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments of the Hugging Face model's forward for this micro-batch. No KV cache:
        the config's `use_cache` would otherwise keep every layer's keys and values of the row,
        and a recomputed (activation-checkpointed) block would append to them a second time."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "packed": self.layout,
            "logits_to_keep": self.positions,
            "use_cache": False,
        }


def split_micro_batches(samples: Sequence[TrainSample], budget: int) -> list[list[TrainSample]]:
    """Group samples, longest first and in that order, into micro-batches of at most `budget`
    tokens (a longer sample gets a micro-batch of its own)."""
    groups: list[list[TrainSample]] = []
    size = 0
    for s in sorted(samples, key=lambda s: -len(s.input_ids)):
        if groups and size + len(s.input_ids) <= budget:
            groups[-1].append(s)
            size += len(s.input_ids)
        else:
            groups.append([s])
            size = len(s.input_ids)
    return groups


def pack(samples: Sequence[TrainSample]) -> MicroBatch:
    """One packed micro-batch of `samples`, on the CPU."""
    import torch

    lengths = [len(s.input_ids) for s in samples]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    longest = max(lengths)
    positions, targets, sampler = [], [], []
    per_seq: dict[str, list[np.ndarray]] = {"adv": [], "weight": [], "seq": [], "age": []}
    for i, (s, start) in enumerate(zip(samples, starts)):
        model = np.flatnonzero(np.asarray(s.loss_mask) == 1)  # completion indices of model tokens
        # Completion token j sits at row position start + prompt_len + j; the one before predicts it.
        positions.append(start + s.prompt_len - 1 + model)
        targets.append(np.asarray(s.input_ids)[s.prompt_len + model])
        sampler.append(np.asarray(s.sampler_logprobs, np.float32)[model])
        for key, value in (("adv", s.advantage), ("weight", s.weight), ("seq", i), ("age", s.age)):
            per_seq[key].append(np.full(len(model), value))
    within = np.concatenate([np.arange(n) for n in lengths])
    pad_index = np.concatenate([i * longest + np.arange(n) for i, n in enumerate(lengths)])
    layout = PackedLayout(
        cu_seqlens=torch.from_numpy(starts.astype(np.int32)),
        max_seqlen=longest,
        pad_index=torch.from_numpy(pad_index.astype(np.int64)),
    )
    position_idx = torch.from_numpy(np.concatenate(positions).astype(np.int64))
    return MicroBatch(
        input_ids=torch.from_numpy(np.concatenate([s.input_ids for s in samples]).astype(np.int64))[None],
        position_ids=torch.from_numpy(within.astype(np.int64))[None],
        layout=layout,
        positions=position_idx,
        targets=torch.from_numpy(np.concatenate(targets).astype(np.int64)),
        mask=torch.ones(len(position_idx)),
        sampler=torch.from_numpy(np.concatenate(sampler)),
        advantages=torch.from_numpy(np.concatenate(per_seq["adv"]).astype(np.float32)),
        weights=torch.from_numpy(np.concatenate(per_seq["weight"]).astype(np.float32)),
        seq=torch.from_numpy(np.concatenate(per_seq["seq"]).astype(np.int64)),
        ages=torch.from_numpy(np.concatenate(per_seq["age"]).astype(np.int64)),
    )


def micro_batches(samples: Sequence[TrainSample], budget: int) -> list[MicroBatch]:
    """`samples` packed into micro-batches of at most `budget` tokens each (see the invariants)."""
    return [pack(group) for group in split_micro_batches(samples, budget)]


def dummy_micro_batch() -> MicroBatch:
    """A two-token micro-batch whose one target counts for nothing (mask 0): a rank with fewer
    micro-batches than the busiest one runs it so that FSDP's collectives pair up, while it adds
    nothing to the loss, the gradient or the statistics."""
    mb = pack(
        [
            TrainSample(
                input_ids=np.zeros(2, np.int32),
                prompt_len=1,
                loss_mask=np.ones(1, np.int32),
                sampler_logprobs=np.zeros(1, np.float32),
                advantage=0.0,
            )
        ]
    )
    return mb.model_copy(update={"mask": mb.mask * 0})
