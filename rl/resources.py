"""`codeworld train --dry-run`: the resource plan of a config, computed without starting anything."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from rl.config import Config


class ActorPlan(BaseModel):
    """One kind of actor in the plan."""

    role: str
    count: int
    cpus: float
    gpus: float
    memory_gib: float
    """Estimated memory per actor (host memory on CPU, device memory on GPU)."""


def count_params(model_dir: Path) -> int:
    """Parameters of a Hugging Face decoder, from its config.json alone."""
    c = json.loads((model_dir / "config.json").read_text())
    h, layers, vocab, inter = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    head = c.get("head_dim") or h // c["num_attention_heads"]
    kv = c.get("num_key_value_heads", c["num_attention_heads"]) * head
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter + 2 * h
    embed = vocab * h * (1 if c.get("tie_word_embeddings", False) else 2)
    return layers * per_layer + embed + h


def plan(cfg: Config, gpu: bool) -> list[ActorPlan]:
    """Actors, their resources and memory estimates."""
    n = count_params(Path(cfg.model.path))
    gib = 1024**3
    engine_bytes = n * (2 if cfg.model.dtype == "bfloat16" else 4)
    # fp32 master weights + grads + two AdamW moments, sharded over the ranks by FSDP2.
    learner_bytes = n * 16 / cfg.learner.world_size + engine_bytes
    kv = cfg.rollout.kv_cache_gib * gib if not gpu else 0.0
    return [
        ActorPlan(role="rollout worker (vLLM)", count=cfg.rollout.num_workers, cpus=0, gpus=1 if gpu else 0,
                  memory_gib=(engine_bytes + kv) / gib + 0.5),
        ActorPlan(role="learner rank (FSDP2)", count=cfg.learner.world_size,
                  cpus=0 if gpu else min(cfg.learner.threads_per_rank, 1), gpus=1 if gpu else 0,
                  memory_gib=learner_bytes / gib + 0.5),
        ActorPlan(role="orchestrator + episode runners (driver)", count=1, cpus=0, gpus=0, memory_gib=1.0),
    ]


def describe(cfg: Config, gpu: bool) -> str:
    """The plan as text for a person."""
    n = count_params(Path(cfg.model.path))
    rows = plan(cfg, gpu)
    lines = [f"run {cfg.run.name!r}: model {cfg.model.path} ({n / 1e6:.2f} M params, {cfg.model.dtype}), "
             f"{cfg.run.steps} steps x {cfg.algorithm.batch_size} groups x {cfg.algorithm.group_size} samples, "
             f"max_staleness {cfg.algorithm.max_staleness}, loss {cfg.algorithm.loss}",
             "envs: " + ", ".join(f"{e.name} (weight {e.weight})" for e in cfg.envs),
             f"bus: {cfg.bus.redis_url or 'private redis-server started for the run'}",
             f"{'role':<42}{'count':>6}{'CPUs':>7}{'GPUs':>7}{'GiB each':>10}"]
    lines += [f"{r.role:<42}{r.count:>6}{r.cpus:>7g}{r.gpus:>7g}{r.memory_gib:>10.2f}" for r in rows]
    total = sum(r.count * r.memory_gib for r in rows)
    lines.append(f"total: {sum(r.count * r.gpus for r in rows):g} GPUs, ~{total:.1f} GiB memory")
    return "\n".join(lines)
