"""`ChatRenderer` with published chat templates (issue #9, defect 3): the tokens `EpisodeRunner`
appends for every environment turn are the template's rendering of that turn in the whole
conversation, and every model turn stops at the template's end-of-turn token.

Each tokenizer is built here: a byte-level BPE trained on a little text, with the special tokens
its template needs, wrapped in `PreTrainedTokenizerFast`, and a chat template transcribed from
the model's published `tokenizer_config.json` (tests/data/chat_templates/SOURCE.md). The model
turns are token ids that look sampled: the reply's tokens followed by the end-of-turn token (the
model closed its turn) or not (it stopped at the token limit); a replaying worker hands them to
the real runner, which sees no difference from an engine.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from envs.base import Action, Environment, Message, Observation, StepResult, Task
from workers.chat import ChatRenderer, ChatTemplateError
from workers.episode import EpisodeRunner
from workers.rollout import Generation, Sampling

TEMPLATES = Path(__file__).parents[1] / "data" / "chat_templates"
CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA3 = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
)
GEMMA = ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")
MISTRAL = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)


@dataclass(frozen=True)
class Spec:
    """A published chat template and the tokenizer it ships with."""

    template: str
    specials: tuple[str, ...]
    eos: str
    end_of_turn: str
    bos: str | None = None
    env_roles: tuple[str, str] = ("user", "tool")
    """Roles of the two environment turns (Gemma has no tool role and wants user/model turns)."""


SPECS = {
    "qwen2.5-instruct": Spec("qwen2.5-instruct", CHATML, eos="<|im_end|>", end_of_turn="<|im_end|>"),
    "qwen2.5-base": Spec("qwen2.5-base", CHATML, eos="<|endoftext|>", end_of_turn="<|im_end|>"),
    "llama3.1-instruct": Spec(
        "llama3.1-instruct", LLAMA3, eos="<|eot_id|>", end_of_turn="<|eot_id|>", bos="<|begin_of_text|>"
    ),
    "llama3.1-eos-end_of_text": Spec(
        "llama3.1-instruct", LLAMA3, eos="<|end_of_text|>", end_of_turn="<|eot_id|>", bos="<|begin_of_text|>"
    ),
    "gemma3-it": Spec(
        "gemma3-it", GEMMA, eos="<eos>", end_of_turn="<end_of_turn>", bos="<bos>", env_roles=("user", "user")
    ),
    # Qwen3 renders a last reply with an empty reasoning block and earlier ones without: it re-renders
    # only the model's own text, which the runner keeps as sampled, so it must be accepted.
    "qwen3": Spec("qwen3", CHATML, eos="<|im_end|>", end_of_turn="<|im_end|>"),
}

CORPUS = """The model writes a program, runs the tests and reads what they printed.
What is 12 + 30? Show your work. The answer is 42, so we put it in a box.
Your answer was not boxed: put the final result in \\boxed{} and reply again.
def solve(numbers): return sum(x * x for x in numbers if x % 2 == 0)
{"tests": "1 of 2 passed", "error": "AssertionError: expected 42, got 41"}
You are a careful assistant. Answer briefly and check every step before replying.""".splitlines()


def published(template: str) -> str:
    """A chat template as published (tests/data/chat_templates/SOURCE.md)."""
    return (TEMPLATES / f"{template}.jinja").read_text().removesuffix("\n")


@functools.cache
def tokenizer(chat_template: str, specials: tuple[str, ...], eos: str, bos: str | None) -> Any:
    """A byte-level BPE trained here, with `specials` as special tokens, and `chat_template`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(specials),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        bos_token=bos,
        pad_token=specials[0],
        unk_token=None,
        chat_template=chat_template,
    )


def spec_tokenizer(name: str) -> Any:
    spec = SPECS[name]
    return tokenizer(published(spec.template), spec.specials, spec.eos, spec.bos)


SYSTEM = Message(role="system", content="You are a careful assistant. Answer briefly.")
FIRST = Message(role="user", content="What is 12 + 30? Show your work.")
REPLIES = [
    ("12 + 30 = 42, so the answer is 42.", True),  # (text, the model closed its turn)
    ("Let me check the sum again: 12 plus", False),  # stopped at the token limit
    ("The final answer is \\boxed{42}.", True),
]
FEEDBACK = [
    "Your answer was not boxed: put the final result in \\boxed{} and reply again.",
    '{"tests": "1 of 2 passed"}',
]


class ScriptedEnv(Environment):
    """Three model turns; after the first two it shows the next scripted message."""

    name = "scripted"
    max_turns = 3

    def __init__(self, first: list[Message], feedback: list[Message]) -> None:
        super().__init__(None)
        self.first, self.feedback = first, list(feedback)
        self.actions: list[Action] = []

    @classmethod
    def load_tasks(cls, params: Any, data: Path | None, split: str) -> Sequence[Task]:
        return []

    async def reset(self, task: Task) -> Observation:
        return Observation(messages=self.first)

    async def step(self, action: Action) -> StepResult:
        self.actions.append(action)
        if self.feedback:
            return StepResult(done=False, observation=Observation(messages=[self.feedback.pop(0)]))
        return StepResult(done=True, reward=1.0)


class ReplayWorker:
    """Hands the runner the given token ids as its model turns, one per `generate` call, and
    records what it was asked (prompt ids and sampling)."""

    def __init__(self, turns: list[list[int]], closed: list[bool]) -> None:
        self.turns, self.closed = turns, closed
        self.requests: list[tuple[list[int], Sampling]] = []

    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> list[Generation]:
        i = len(self.requests)
        self.requests.append((list(prompt_ids), sampling))
        ids = self.turns[i]
        return [
            Generation(
                token_ids=ids,
                logprobs=[-0.5] * len(ids),
                versions=[0] * len(ids),
                finish_reason="stop" if self.closed[i] else "length",
            )
        ]


@dataclass
class Episode:
    """A scripted episode through the real runner, and the template's rendering of it."""

    tok: Any
    worker: ReplayWorker
    env: ScriptedEnv
    prompt_ids: list[int]
    completion_ids: list[int]
    mask: list[int]
    messages: list[Message]
    """The whole conversation, model replies included."""


def run_episode(name: str, with_system: bool = True) -> Episode:
    """Run the scripted conversation of template `name` through `EpisodeRunner`."""
    spec, tok = SPECS[name], spec_tokenizer(name)
    eot = tok.convert_tokens_to_ids(spec.end_of_turn)
    turns = [tok.encode(text, add_special_tokens=False) + ([eot] if closed else []) for text, closed in REPLIES]
    first = [SYSTEM, FIRST] if with_system else [FIRST]
    feedback = [Message(role=role, content=text) for role, text in zip(spec.env_roles, FEEDBACK, strict=True)]
    worker, env = ReplayWorker(turns, [closed for _, closed in REPLIES]), ScriptedEnv(first, feedback)
    runner = EpisodeRunner(ChatRenderer(tok), "chat-test", 4096)
    outcome = asyncio.run(runner.run(env, Task(id="t", prompt=first), worker, Sampling(max_tokens=64), "g"))
    t = outcome.trajectory
    assert t is not None, outcome.error
    messages = [*first]
    for (text, _), said in zip(REPLIES, [*feedback, None], strict=True):
        messages += [Message(role="assistant", content=text)] + ([said] if said else [])
    return Episode(tok, worker, env, t.prompt_ids.tolist(), t.completion_ids.tolist(), t.loss_mask.tolist(), messages)


def render(tok: Any, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    """The template's rendering of `messages`, tokenized."""
    text = tok.apply_chat_template(
        [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tok.encode(text, add_special_tokens=False)


def env_turns(ep: Episode) -> list[list[int]]:
    """The runner's environment turns: the completion's runs of mask 0."""
    runs: list[list[int]] = []
    for i, (tok_id, m) in enumerate(zip(ep.completion_ids, ep.mask, strict=True)):
        if m == 0:
            if i == 0 or ep.mask[i - 1] == 1:
                runs.append([])
            runs[-1].append(tok_id)
    return runs


@pytest.mark.parametrize("with_system", [True, False])
@pytest.mark.parametrize("name", list(SPECS))
def test_each_environment_turn_is_its_slice_of_the_full_rendering(name: str, with_system: bool) -> None:
    ep = run_episode(name, with_system)
    full = render(ep.tok, ep.messages, add_generation_prompt=False)
    # Where each model turn starts: the rendering of the conversation before it, generation prompt included.
    starts = [
        render(ep.tok, ep.messages[:i], add_generation_prompt=True)
        for i, m in enumerate(ep.messages)
        if m.role == "assistant"
    ]
    assert ep.prompt_ids == starts[0] == full[: len(starts[0])]
    assert [prompt for prompt, _ in ep.worker.requests] == starts  # what the engine was asked each turn
    turns, runs = ep.worker.turns, env_turns(ep)
    assert len(runs) == 2
    for k, run in enumerate(runs):
        sampled_end = len(starts[k]) + len(turns[k])
        assert full[len(starts[k]) : sampled_end] == turns[k], "the replies must be what the template renders"
        assert run == full[sampled_end : len(starts[k + 1])], f"environment turn {k + 1}"
    assert ep.prompt_ids + ep.completion_ids == starts[2] + turns[2]


@pytest.mark.parametrize("name", list(SPECS))
def test_every_model_turn_stops_at_the_templates_end_of_turn_token(name: str) -> None:
    ep = run_episode(name)
    eot = ep.tok.convert_tokens_to_ids(SPECS[name].end_of_turn)
    assert ChatRenderer(ep.tok).end_of_turn_ids == [eot]
    assert all(eot in sampling.stop_token_ids for _, sampling in ep.worker.requests)
    assert [a.truncated for a in ep.env.actions] == [not closed for _, closed in REPLIES]


@pytest.mark.parametrize(
    ("name", "after_closed", "after_truncated"),
    [
        (
            "qwen2.5-base",
            "\n<|im_start|>user\n{0}<|im_end|>\n<|im_start|>assistant\n",
            "<|im_end|>\n<|im_start|>user\n<tool_response>\n{1}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            "gemma3-it",
            "\n<start_of_turn>user\n{0}<end_of_turn>\n<start_of_turn>model\n",
            "<end_of_turn>\n<start_of_turn>user\n{1}<end_of_turn>\n<start_of_turn>model\n",
        ),
        (
            "llama3.1-eos-end_of_text",
            "<|start_header_id|>user<|end_header_id|>\n\n{0}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"
            '"{{\\"tests\\": \\"1 of 2 passed\\"}}"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
        ),
    ],
)
def test_when_eos_is_not_the_end_of_turn_an_environment_turn_closes_the_turn_it_follows(
    name: str, after_closed: str, after_truncated: str
) -> None:
    """Issue #9: with an EOS that is not the template's end-of-turn token, every environment
    turn used to carry the probe text of the renderer's start-up rendering, and a turn the model
    closed was closed again with EOS."""
    ep = run_episode(name)
    texts = [ep.tok.decode(run) for run in env_turns(ep)]
    assert texts == [after_closed.format(*FEEDBACK), after_truncated.format(*FEEDBACK)]


@pytest.mark.parametrize(
    ("name", "preamble"),
    [
        (
            "qwen2.5-instruct",
            ["<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."],
        ),
        ("qwen2.5-base", ["<|im_start|>system\nYou are a helpful assistant."]),
        ("llama3.1-instruct", ["<|begin_of_text|>", "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024"]),
        ("gemma3-it", ["<bos>"]),
    ],
)
def test_the_templates_preamble_is_rendered_once(name: str, preamble: list[str]) -> None:
    """Issue #9: rendering only the new messages put the default system prompt (Qwen2.5), the BOS
    and the date block (Llama 3.1) in front of every environment turn again."""
    ep = run_episode(name, with_system=False)
    text = ep.tok.decode(ep.prompt_ids + ep.completion_ids)
    assert [text.count(p) for p in preamble] == [1] * len(preamble)
    assert text.startswith(preamble[0])


def test_a_template_that_rewrites_earlier_turns_is_refused_at_start_up() -> None:
    """Mistral v0.3 moves the system message into the last user turn: the prompt the model saw
    would not be the start of the conversation a turn later."""
    tok = tokenizer(published("mistral-7b-instruct-v0.3"), MISTRAL, "</s>", "<s>")
    with pytest.raises(ChatTemplateError, match="renders earlier turns differently once more messages"):
        ChatRenderer(tok)


def test_a_template_whose_turns_end_without_a_special_token_is_refused_at_start_up() -> None:
    plain = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tok = tokenizer(plain, CHATML, "<|endoftext|>", None)
    with pytest.raises(ChatTemplateError, match="does not begin with a special token"):
        ChatRenderer(tok)
