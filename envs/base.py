"""The environment contract: what every environment, built-in or user-supplied, implements.

One `Environment` instance drives one episode. The runner calls `reset(task)` once, then
`step(action)` with each model turn until a `StepResult` says `done`. Single-turn environments
are the one-step case. Both methods are coroutines because environments that grade code await a
sandbox (`workers.sandbox`); CPU-bound verification goes to a process pool with a deadline.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    """Who speaks: the chat template renders each role differently."""
    content: str
    """The message text."""


class Task(BaseModel):
    """One dataset row: what the model is asked, and what grades the answer."""

    model_config = ConfigDict(extra="forbid")

    id: str
    """Stable identifier, unique within the dataset (used in logs, groups and the bus)."""
    prompt: list[Message]
    """The conversation shown to the model at the start of the episode."""
    hidden: dict[str, Any] = Field(default_factory=dict)
    """Verification data (gold answer, hidden tests). Stays on the host: never enters a sandbox
    and is never shown to the model."""
    meta: dict[str, Any] = Field(default_factory=dict)
    """Free-form facts about the task (source file, difficulty) for logs and the dashboard."""


class Observation(BaseModel):
    """What the environment shows the model next: messages appended to the conversation."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message]
    """New messages, rendered with the chat template and appended as tokens."""


class Action(BaseModel):
    """One model turn: the sampled tokens and their decoded text."""

    model_config = ConfigDict(extra="forbid")

    text: str
    """The decoded completion of this turn (special tokens removed)."""
    token_ids: list[int]
    """The sampled token ids of this turn."""
    truncated: bool = False
    """True when generation stopped at the token limit rather than at an end-of-turn token."""


class StepResult(BaseModel):
    """The environment's answer to one action."""

    model_config = ConfigDict(extra="forbid")

    observation: Observation | None = None
    """The next observation; None when the episode is done."""
    reward: float | None = None
    """The episode's reward once done. None while not done, and None when done if the reward
    could not be computed (infrastructure failure): the sample is then dropped, never scored 0."""
    done: bool
    """Whether the episode has ended."""
    info: dict[str, Any] = Field(default_factory=dict)
    """Details of the grading (e.g. which tests passed, or why no reward could be given)."""


class EnvConfigError(RuntimeError):
    """An environment's configuration cannot give a trustworthy reward to any sample (e.g. its
    sandbox isolates by rlimits only and the config did not accept that). It ends the run, where
    any other exception out of `reset` or `step` only drops that sample: dropping every sample
    one by one would hide the mistake."""


class EnvParams(BaseModel):
    """Base class for an environment's typed `params` block in the run config."""

    model_config = ConfigDict(extra="forbid")

    length_penalty: float = Field(0.0, ge=0)
    """Reward shaping every environment accepts: subtracted from an episode's reward once per token
    the model generated (a pull toward short answers); 0: none. See `Environment.shape_reward`."""


class Environment(ABC):
    """Base class of every environment. Subclass it, set `name` and `Params`, register it with
    `envs.registry.register_env`."""

    name: ClassVar[str]
    """Registry name, e.g. "arithmetic"; set by `register_env`."""
    Params: ClassVar[type[EnvParams]] = EnvParams
    """The pydantic model that validates this environment's `params` block."""
    max_turns: ClassVar[int] = 1
    """Upper bound on model turns per episode (1 for single-turn environments)."""

    def __init__(self, params: EnvParams) -> None:
        self.params = params

    @classmethod
    @abstractmethod
    def load_tasks(cls, params: EnvParams, data: Path | None, split: str) -> Sequence[Task]:
        """Return the tasks of `split` ("train" or "test"), from `data` when given."""

    @abstractmethod
    async def reset(self, task: Task) -> Observation:
        """Start an episode on `task` and return its first observation."""

    @abstractmethod
    async def step(self, action: Action) -> StepResult:
        """Take one model turn and return what follows."""

    async def close(self) -> None:
        """Release what the episode holds (sandboxes, containers). Called once, always."""

    def shape_reward(self, reward: float, model_tokens: int) -> float:
        """The reward the learner trains on, given the verified `reward` of an episode in which the
        model generated `model_tokens` tokens. A hook: override it to shape rewards; by default it
        subtracts `params.length_penalty` per token. The verified reward stays in `reward_info`."""
        return reward - getattr(self.params, "length_penalty", 0.0) * model_tokens
