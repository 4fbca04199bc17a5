"""`Trajectory`: one finished episode, the unit that travels on the trajectory bus.

Token data are numpy arrays (int32 ids, float32 logprobs) and are encoded as raw little-endian
bytes inside a msgpack map, never as JSON lists of floats: a 1k-token trajectory is ~13 kB on the
wire and decodes without a Python loop over tokens.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_ARRAY_DTYPES: dict[str, np.dtype] = {
    "prompt_ids": np.dtype("<i4"),
    "completion_ids": np.dtype("<i4"),
    "loss_mask": np.dtype("u1"),
    "sampler_logprobs": np.dtype("<f4"),
    "policy_versions": np.dtype("<i4"),
}


class Trajectory(BaseModel):
    """One episode: prompt, every turn's tokens flattened, what sampled them, and its reward."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    id: str
    """Unique id of this trajectory."""
    run_id: str
    """The run that produced it."""
    env: str
    """Registry name of the environment."""
    task_id: str
    """The task's id within its dataset."""
    group_id: str
    """Trajectories of one group share a task and are normalised together."""
    group_size: int
    """How many trajectories of this group were published (samples without a reward are not)."""
    prompt_ids: np.ndarray
    """The first prompt's token ids (int32)."""
    completion_ids: np.ndarray
    """All tokens after the prompt, every turn flattened: model and environment tokens (int32)."""
    loss_mask: np.ndarray
    """1 where `completion_ids` holds a model-sampled token, 0 for environment tokens (uint8)."""
    sampler_logprobs: np.ndarray
    """The sampler's logprob of each completion token; 0 where `loss_mask` is 0 (float32)."""
    policy_versions: np.ndarray
    """The policy version that sampled each completion token; -1 where `loss_mask` is 0 (int32)."""
    reward: float
    """The episode's reward (episodes without a reward never become trajectories)."""
    reward_info: dict[str, Any] = Field(default_factory=dict)
    """What the verifier reported (e.g. extracted answer, tests passed)."""
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds spent per phase, e.g. {"generate": 0.4, "reward": 0.01}."""
    truncated: bool = False
    """True when the last turn stopped at the token limit."""

    @field_validator(*_ARRAY_DTYPES)
    @classmethod
    def _as_dtype(cls, value: Any, info: Any) -> np.ndarray:
        return np.ascontiguousarray(value, dtype=_ARRAY_DTYPES[info.field_name]).reshape(-1)

    @model_validator(mode="after")
    def _aligned(self) -> Trajectory:
        n = len(self.completion_ids)
        for name in ("loss_mask", "sampler_logprobs", "policy_versions"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Trajectory.{name} has {len(getattr(self, name))} entries; completion_ids has {n}.")
        return self

    @property
    def min_version(self) -> int:
        """The oldest policy version that sampled any of its tokens."""
        sampled = self.policy_versions[self.loss_mask.astype(bool)]
        return int(sampled.min()) if len(sampled) else -1

    @property
    def num_model_tokens(self) -> int:
        """How many completion tokens the model sampled."""
        return int(self.loss_mask.sum())

    def encode(self) -> bytes:
        """Compact binary form for the bus."""
        fields = self.model_dump(exclude=set(_ARRAY_DTYPES))
        for name in _ARRAY_DTYPES:
            fields[name] = getattr(self, name).tobytes()
        return msgpack.packb(fields, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> Trajectory:
        """Inverse of `encode`."""
        fields = msgpack.unpackb(data, raw=False)
        for name, dtype in _ARRAY_DTYPES.items():
            fields[name] = np.frombuffer(fields[name], dtype=dtype)
        return cls.model_validate(fields)
