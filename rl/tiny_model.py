"""`codeworld model init-tiny`: a randomly initialised Qwen2 model and a BPE tokenizer trained
locally, saved in Hugging Face format so that vLLM, transformers and the learner all load it.

Nothing is downloaded. The tokenizer splits digits one per token (as Qwen2's own tokenizer does),
which lets a model of ~1 M parameters learn column arithmetic from a few minutes of training.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TinyModelSpec(BaseModel):
    """Size and seed of a model built by `init-tiny`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    hidden_size: int = Field(128, ge=32)
    """Width of the residual stream."""
    num_layers: int = Field(4, ge=1)
    """Decoder layers."""
    num_heads: int = Field(4, ge=1)
    """Attention heads; hidden_size / num_heads is the head size (vLLM on CPU allows 32, 64, 80,
    96, 112, 128, 160, 192, 224, 256, 512)."""
    num_kv_heads: int = Field(2, ge=1)
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = Field(512, ge=8)
    """MLP width."""
    vocab_size: int = Field(512, ge=300)
    """BPE vocabulary size, special tokens included."""
    max_position_embeddings: int = Field(2048, ge=64)
    """Longest sequence the rotary embedding is set up for."""
    seed: int = 0
    """Seed of the weight initialisation and of the tokenizer's training corpus."""


def _corpus(seed: int, n: int = 20000) -> Iterator[str]:
    """Text the BPE merges are learned from: chat-formatted arithmetic and plain English."""
    rng = random.Random(seed)
    words = (
        "What is the value of compute answer final put your in a box result sum difference "
        "product number problem solution therefore so we get test input output def return "
        "print for if else while true false none import class self"
    ).split()
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        yield f"<|im_start|>user\n{a}{op}{b}=?<|im_end|>\n<|im_start|>assistant\n\\boxed{{{a}}}<|im_end|>\n"
        yield " ".join(rng.choice(words) for _ in range(12)) + "."


def train_tokenizer(vocab_size: int, seed: int):  # -> transformers.PreTrainedTokenizerFast
    """Train a byte-level BPE tokenizer with single-digit tokens and the ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        chat_template=CHATML_TEMPLATE,
    )


def init_tiny(out: Path, spec: TinyModelSpec) -> int:
    """Build the tokenizer and a randomly initialised Qwen2 model into `out`; returns #params."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if spec.hidden_size % spec.num_heads or spec.num_heads % spec.num_kv_heads:
        raise ValueError(
            f"hidden_size {spec.hidden_size} must divide into num_heads {spec.num_heads}, "
            f"and num_heads into num_kv_heads {spec.num_kv_heads}."
        )
    tokenizer = train_tokenizer(spec.vocab_size, spec.seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())
