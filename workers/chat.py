"""`ChatRenderer`: chat messages to token ids with the model's own chat template, one turn at a time.

An episode is extended token by token, never re-encoded, so each piece the runner appends must be
the piece of the template's rendering of the whole conversation:

* The first prompt is the template's rendering of the first messages with the generation prompt.
* The end-of-turn token is read from the template itself: the first token of what closes an
  assistant message holding a probe (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3.1,
  `<end_of_turn>` for Gemma). It is a stop token of every model turn, and a model turn is closed
  iff its last token is it. The tokenizer's EOS need not be it (Qwen2.5 base: `<|endoftext|>`).
* An environment turn is the rendering from the end of the model's sampled text to the next
  generation prompt: the rest of the closing text the model did not sample (all of it when it
  stopped at the token limit), the new messages and the generation prompt. The new messages are
  rendered in context: after a fixed probe conversation, keeping only what follows the probe's
  assistant text, so a preamble the template puts before any conversation (a default system
  prompt, BOS, a date block) appears once, at the top of the prompt.
* That is sound only when adding messages leaves the rest of the rendering as it was: the prompt
  before the model's turn and the closing text after it. A template that changes them (Mistral
  v0.3 moves the system message into the last user turn) is refused with `ChatTemplateError`
  when the renderer is made, before any engine starts. How the template renders the model's own
  text is not checked: the runner keeps the sampled tokens (Qwen3 drops an earlier turn's
  reasoning when it re-renders it; the learner trains on what the sampler saw).
"""

from __future__ import annotations

from typing import Any

from envs.base import Message

_SYSTEM_PROBE = "codeworld system probe"
_USER_PROBE = "codeworld user probe"
_MODEL_PROBE = "codeworld assistant probe"


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be rendered one turn at a time."""


class ChatRenderer:
    """Renders chat messages to token ids with the tokenizer's chat template, turn by turn."""

    def __init__(self, tokenizer: Any) -> None:
        """Reads the end-of-turn token from the template and checks on probe conversations (with
        and without a system message) that it renders turn by turn; else `ChatTemplateError`."""
        self.tokenizer = tokenizer
        self._context = [Message(role="user", content=_USER_PROBE), Message(role="assistant", content=_MODEL_PROBE)]
        closed = self._render(self._context, add_generation_prompt=False)
        if closed.count(_MODEL_PROBE) != 1:
            raise ChatTemplateError(
                "The chat template does not render an assistant message's text as given, "
                f"so the end of a model turn cannot be found (it rendered {closed!r})."
            )
        self._close = closed.split(_MODEL_PROBE, 1)[1]
        close_ids = self.encode(self._close)
        if not close_ids or close_ids[0] not in set(tokenizer.get_added_vocab().values()):
            raise ChatTemplateError(
                f"The chat template closes an assistant turn with {self._close!r}, "
                "which does not begin with a special token, so a model has no token "
                "that ends its turn."
            )
        self.end_of_turn_ids: list[int] = close_ids[:1]
        """Tokens that end a model turn: stop tokens of every turn (the tokenizer's EOS may differ)."""
        probe = [Message(role="user", content=_USER_PROBE)]
        tail = self._tail(self._context, probe)
        system = [Message(role="system", content=_SYSTEM_PROBE), *self._context]
        if self._renders(system) and self._tail(system, probe) != tail:
            raise ChatTemplateError(
                "The chat template renders later turns differently after a system "
                "message, so a conversation cannot be extended turn by turn."
            )

    def _text(self, messages: list[Message], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        """`_text`, a template that cannot render the conversation being a `ChatTemplateError`."""
        try:
            return self._text(messages, add_generation_prompt)
        except Exception as exc:
            roles = ", ".join(m.role for m in messages)
            raise ChatTemplateError(
                f"The chat template cannot render a conversation of roles {roles} ({type(exc).__name__}: {exc})."
            ) from exc

    def _renders(self, messages: list[Message]) -> bool:
        """Whether the template accepts `messages` (some refuse a system message)."""
        try:
            self._text(messages, add_generation_prompt=True)
        except Exception:
            return False
        return True

    def _tail(self, context: list[Message], messages: list[Message]) -> str:
        """What the template renders after `context`'s last (assistant) text once `messages` and
        the generation prompt follow; `ChatTemplateError` if that changes the rest of `context`."""
        before = self._render(context[:-1], add_generation_prompt=True)
        full = self._render([*context, *messages], add_generation_prompt=True)
        head, _, tail = full.partition(_MODEL_PROBE)
        if not (head.startswith(before) and tail.startswith(self._close)):
            raise ChatTemplateError(
                "The chat template renders earlier turns differently once more messages "
                f"follow (the prompt {before!r} and the reply's close {self._close!r} "
                f"became {full!r}), so a conversation cannot be extended turn by turn."
            )
        return tail

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special-token text parsed as special tokens, nothing added."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` without special tokens."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def prompt(self, messages: list[Message]) -> list[int]:
        """Token ids of the first prompt, ending with the assistant's generation header."""
        return self.encode(self._text(messages, add_generation_prompt=True))

    def _closes(self, turn_ids: list[int]) -> bool:
        """Whether a model turn's sampled tokens end it (its last token is an end-of-turn token)."""
        return bool(turn_ids) and turn_ids[-1] in self.end_of_turn_ids

    def followup(self, messages: list[Message], turn_ids: list[int]) -> list[int]:
        """Token ids appended after a model turn that sampled `turn_ids`: the rest of the turn's
        closing text, then `messages` and the next generation header, as the template renders
        them in the whole conversation."""
        ids = self.encode(self._tail(self._context, messages))
        return ids[len(self.end_of_turn_ids) :] if self._closes(turn_ids) else ids
