"""`codeworld sft`: a short supervised warm start before RL.

Trains on tasks whose gold answer is known (`task.hidden["answer"]`), with the completion
`\\boxed{answer}` closed by the chat template's end-of-turn token (the demo's EOS) and the loss on
completion tokens only. Stops when greedy accuracy on a stopping set (train tasks held back from
training) reaches `target_acc`, or at `max_steps` / `max_wall_s`. Greedy accuracy is measured
exactly by teacher forcing: a greedy decode reproduces the gold completion iff every gold token is
the argmax at its position.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from rl.config import EnvSection


class SftConfig(BaseModel):
    """The supervised warm-start run."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    env: EnvSection
    """The environment whose train tasks are the data."""
    batch_size: int = Field(64, ge=1)
    """Examples per optimizer step."""
    lr: float = Field(1e-3, gt=0)
    """AdamW learning rate."""
    max_steps: int = Field(5000, ge=1)
    """Upper bound on steps."""
    max_wall_s: float = Field(300.0, gt=0)
    """Upper bound on training seconds."""
    target_acc: float = Field(0.25, gt=0, le=1)
    """Stop once greedy accuracy on the stopping set reaches this."""
    stop_set: int = Field(500, ge=1)
    """Train tasks held back to decide when to stop."""
    eval_every: int = Field(50, ge=1)
    """Steps between stopping-set evaluations."""
    threads: int = Field(2, ge=1)
    """torch threads."""
    seed: int = 0
    """Data order and init seed."""


def _examples(tasks, renderer) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion) token ids per task: the completion is the gold answer closed with the
    chat template's end-of-turn token, as a model turn that ends is sampled."""
    eot = renderer.end_of_turn_ids
    return [(renderer.prompt(t.prompt), renderer.encode(f"\\boxed{{{t.hidden['answer']}}}") + eot) for t in tasks]


def _batch(examples, device):
    import torch

    T = max(len(p) + len(c) for p, c in examples)
    ids = torch.zeros((len(examples), T), dtype=torch.long)
    mask = torch.zeros((len(examples), T - 1))
    for i, (p, c) in enumerate(examples):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, len(p) - 1 : len(seq) - 1] = 1
    return ids.to(device), mask.to(device)


def greedy_exact(model, examples, device) -> float:
    """Share of examples whose whole completion is the greedy continuation of their prompt."""
    import torch

    hits = 0
    with torch.no_grad():
        for i in range(0, len(examples), 256):
            ids, mask = _batch(examples[i : i + 256], device)
            pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
            wrong = ((pred != ids[:, 1:]).float() * mask).sum(-1)
            hits += int((wrong == 0).sum())
    return hits / max(len(examples), 1)


def run_sft(cfg: SftConfig, model_dir: Path, out: Path, log=print) -> dict[str, float]:
    """Train, save the model and tokenizer to `out`, and return the final figures."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from envs.registry import get_env
    from workers.chat import ChatRenderer

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    env_cls = get_env(cfg.env.name)
    tasks = list(env_cls.load_tasks(env_cls.Params.model_validate(cfg.env.params), cfg.env.data, "train"))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    renderer = ChatRenderer(tokenizer)
    # The stopping set must not share problems with the training data (synthetic train splits
    # repeat problems), or memorisation inflates the accuracy that decides when to stop.
    held = tasks[: cfg.stop_set]
    seen = {t.prompt[-1].content for t in held}
    stop_examples = _examples(held, renderer)
    train = _examples([t for t in tasks[cfg.stop_set :] if t.prompt[-1].content not in seen], renderer)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    rng, start, acc, step = random.Random(cfg.seed), time.perf_counter(), 0.0, 0
    for step in range(1, cfg.max_steps + 1):
        ids, mask = _batch(rng.sample(train, cfg.batch_size), "cpu")
        logits = model(input_ids=ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )
        loss = (nll * mask.reshape(-1)).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0:
            acc = greedy_exact(model, stop_examples, "cpu")
            log(
                f"sft step {step}: loss {loss.item():.3f}, greedy acc on stopping set {acc:.3f}, "
                f"{time.perf_counter() - start:.0f}s"
            )
            if acc >= cfg.target_acc or time.perf_counter() - start > cfg.max_wall_s:
                break
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"steps": step, "stop_acc": acc, "wall_s": time.perf_counter() - start}
