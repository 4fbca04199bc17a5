"""The learner: one Ray actor per rank, `torch.distributed` + FSDP2 `fully_shard` from the start
(gloo on CPU, NCCL on GPU), AdamW, fp32 logprobs.

`LearnerGroup` (driver side) starts the ranks, splits each batch across them and publishes weights.
Each rank packs its samples into micro-batches; all ranks run the same number of micro-batches
(FSDP's collectives must pair up), padding with zero-loss dummies where one rank has fewer.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from rl.config import AlgorithmSection, LearnerSection
from rl.weights import WeightPush


class TrainSample(BaseModel):
    """One trajectory as the learner needs it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    input_ids: np.ndarray
    """prompt_ids + completion_ids (int32)."""
    prompt_len: int
    """Length of the prompt inside `input_ids`."""
    loss_mask: np.ndarray
    """Per completion token: 1 model token, 0 environment token."""
    sampler_logprobs: np.ndarray
    """Per completion token (float32)."""
    advantage: float
    """The sequence's advantage."""
    proximal_logprobs: np.ndarray | None = None
    """Learner logprobs at the start of the step (set on the rank when a step has minibatches)."""


class RankStats(BaseModel):
    """Sums over one rank's tokens; the group adds ranks up and divides by `tokens`."""

    loss_sum: float = 0.0
    tokens: float = 0.0
    clipped: float = 0.0
    entropy_sum: float = 0.0
    mismatch_k3_sum: float = 0.0
    mismatch_abs_sum: float = 0.0
    grad_norm: float = 0.0


def lr_multiplier(step: int, cfg: LearnerSection) -> float:
    """The share of `lr` used by optimizer step `step` (0-based): a linear warm-up to 1, a stable
    phase, a linear decay to `min_lr_ratio` over `decay_steps`, then constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decayed = step - cfg.warmup_steps - cfg.stable_steps
    if cfg.decay_steps == 0 or decayed <= 0:
        return 1.0
    return 1.0 - (1.0 - cfg.min_lr_ratio) * min(1.0, decayed / cfg.decay_steps)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _micro_batches(samples: Sequence[TrainSample], budget: int) -> list[list[TrainSample]]:
    """Group samples (longest first) so that padded size B*T stays within `budget` tokens."""
    order = sorted(samples, key=lambda s: -len(s.input_ids))
    batches: list[list[TrainSample]] = []
    for s in order:
        if batches and (len(batches[-1]) + 1) * len(batches[-1][0].input_ids) <= budget:
            batches[-1].append(s)
        else:
            batches.append([s])
    return batches


class LearnerRank:
    """One rank of the learner. Start through `LearnerGroup`."""

    def __init__(self, rank: int, world_size: int, master_port: int, model_path: str,
                 learner: LearnerSection, algo: AlgorithmSection, temperature: float, seed: int) -> None:
        import torch
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
        torch.set_num_threads(learner.threads_per_rank)
        torch.manual_seed(seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
        self.rank, self.world_size = rank, world_size
        self.cfg, self.algo, self.temperature = learner, algo, temperature
        self.model = _build_model(model_path, learner, self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=learner.lr, betas=learner.betas,
                                           weight_decay=learner.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_multiplier(step, learner))

    def ready(self) -> int:
        return self.rank

    def train_step(self, minibatches: list[list[TrainSample]], totals: list[int]) -> RankStats:
        """One optimizer step per minibatch over this rank's share of it. `totals[i]` is the
        model-token count of minibatch i across all ranks (the loss's denominator)."""
        import torch

        self.model.train()
        if len(minibatches) > 1:  # later minibatches need the step-start (proximal) logprobs
            for mb in minibatches:
                self._run_micro(mb, lambda batch: self._set_proximal(batch))
        stats = RankStats()
        for mb, total in zip(minibatches, totals):
            self.optimizer.zero_grad(set_to_none=True)
            self._run_micro(mb, lambda batch: self._accumulate(batch, total, stats))
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            stats.grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            self.optimizer.step()
            self.scheduler.step()
        return stats

    def _run_micro(self, samples: list[TrainSample], fn: Any) -> None:
        """Call `fn` on each micro-batch; every rank runs as many as the busiest one (FSDP's
        collectives must pair up), the others padding with zero-loss dummies."""
        import torch
        import torch.distributed as dist

        micro = _micro_batches(samples, self.cfg.micro_batch_tokens)
        count = torch.tensor([len(micro)], device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        for i in range(int(count.item())):
            if i < len(micro):
                fn(micro[i])
            else:
                self._dummy_backward()

    def _set_proximal(self, batch: list[TrainSample]) -> None:
        import torch

        from rl.loss import token_logprobs

        t = _to_tensors(batch, self.device)
        with torch.no_grad():
            logits = self.model(input_ids=t["input_ids"]).logits[:, :-1]
            logp, _ = token_logprobs(logits, t["targets"], self.temperature)
        for i, s in enumerate(batch):
            p, n = s.prompt_len, len(s.input_ids)
            s.proximal_logprobs = logp[i, p - 1:n - 1].float().cpu().numpy()

    def _accumulate(self, batch: list[TrainSample], total_tokens: int, stats: RankStats) -> None:
        import torch

        from rl.loss import policy_loss, token_logprobs

        t = _to_tensors(batch, self.device)
        logits = self.model(input_ids=t["input_ids"]).logits[:, :-1]
        logp, entropy = token_logprobs(logits, t["targets"], self.temperature)
        prox = t["proximal"] if t["proximal"] is not None else logp.detach()
        out = policy_loss(logp, prox, t["sampler"], t["adv"], t["mask"], self.algo)
        # FSDP averages gradients over ranks; scale so the result is the batch's token mean.
        (out.loss_sum / max(total_tokens, 1) * self.world_size).backward()
        with torch.no_grad():
            m = t["mask"]
            diff = (prox - t["sampler"]) * m  # learner (step start) vs sampler, same tokens
            stats.loss_sum += float(out.loss_sum)
            stats.tokens += out.tokens
            stats.clipped += out.clipped
            stats.entropy_sum += float((entropy * m).sum())
            stats.mismatch_k3_sum += float(((torch.exp(diff) - 1 - diff) * m).sum())
            stats.mismatch_abs_sum += float(diff.abs().sum())

    def _dummy_backward(self) -> None:
        import torch

        ids = torch.zeros((1, 2), dtype=torch.long, device=self.device)
        (self.model(input_ids=ids).logits.sum() * 0.0).backward()

    def full_state_dict(self) -> dict[str, Any] | None:
        """The full (unsharded) fp32 state dict on rank 0; None elsewhere. Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.rank == 0 else None

    def publish(self, root: str, version: int) -> WeightPush | None:
        """Write this version's weights for the engines (rank 0 writes; all ranks must call)."""
        from rl.weights import publish

        sd = self.full_state_dict()
        return publish(sd, Path(root), version) if sd is not None else None

    def save_checkpoint(self, path: str) -> None:
        """Model and optimizer state with torch.distributed.checkpoint (resharding on load)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict()}, checkpoint_id=path)

    def load_checkpoint(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict()}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _build_model(model_path: str, cfg: LearnerSection, device: Any) -> Any:
    """Load the HF model in fp32 and shard each decoder layer, then the root, with FSDP2."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    attn = "sdpa"
    if cfg.attention == "fa3":
        from torch.nn.attention import activate_flash_attention_impl

        activate_flash_attention_impl("FA3")  # routes SDPA's flash backend to FlashAttention-3
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation=attn)
    model.to(device)
    if cfg.float8 != "off":
        _convert_float8(model, cfg)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32,
                              reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def _convert_float8(model: Any, cfg: LearnerSection) -> None:
    """torchao float8 training for the decoder's linear layers (not the output head)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(cfg.float8)
    if cfg.float8_emulate:
        config = Float8LinearConfig(emulate=True)
    convert_to_float8_training(model.model, config=config,
                               module_filter_fn=lambda mod, fqn: mod.in_features % 16 == 0 and mod.out_features % 16 == 0)


def _to_tensors(batch: list[TrainSample], device: Any) -> dict[str, Any]:
    """Right-padded tensors for a micro-batch; completion positions carry mask/sampler/advantage."""
    import torch

    T = max(len(s.input_ids) for s in batch)
    ids = torch.zeros((len(batch), T), dtype=torch.long)
    mask = torch.zeros((len(batch), T - 1))
    sampler = torch.zeros((len(batch), T - 1))
    adv = torch.zeros((len(batch), T - 1))
    has_prox = all(s.proximal_logprobs is not None for s in batch)
    prox = torch.zeros((len(batch), T - 1))
    for i, s in enumerate(batch):
        n, p = len(s.input_ids), s.prompt_len
        ids[i, :n] = torch.from_numpy(s.input_ids.astype(np.int64))
        # The token at position j is predicted by position j-1.
        mask[i, p - 1:n - 1] = torch.from_numpy(s.loss_mask.astype(np.float32))
        sampler[i, p - 1:n - 1] = torch.from_numpy(s.sampler_logprobs.astype(np.float32))
        adv[i, p - 1:n - 1] = s.advantage
        if has_prox:
            prox[i, p - 1:n - 1] = torch.from_numpy(s.proximal_logprobs)
    return {"input_ids": ids.to(device), "targets": ids[:, 1:].to(device), "mask": mask.to(device),
            "sampler": sampler.to(device), "adv": adv.to(device), "proximal": prox.to(device) if has_prox else None}


def _balance(samples: Sequence[TrainSample], n: int) -> list[list[TrainSample]]:
    """Split samples into n parts of similar token counts (longest first, to the lightest part)."""
    parts: list[list[TrainSample]] = [[] for _ in range(n)]
    loads = [0] * n
    for s in sorted(samples, key=lambda s: -len(s.input_ids)):
        r = loads.index(min(loads))
        parts[r].append(s)
        loads[r] += len(s.input_ids)
    return parts


class StepStats(BaseModel):
    """What one learner step reports."""

    loss: float
    entropy: float
    clip_frac: float
    mismatch_kl: float
    mismatch_abs: float
    grad_norm: float
    tokens: int
    train_s: float


class LearnerGroup:
    """Driver-side handle on the learner ranks."""

    def __init__(self, model_path: str, learner: LearnerSection, algo: AlgorithmSection,
                 temperature: float, seed: int) -> None:
        import ray

        port = _free_port()
        remote = ray.remote(LearnerRank).options(num_cpus=min(learner.threads_per_rank, 1))
        self.ranks = [remote.remote(r, learner.world_size, port, model_path, learner, algo, temperature, seed)
                      for r in range(learner.world_size)]
        ray.get([r.ready.remote() for r in self.ranks])
        self.world_size = learner.world_size

    def train_step(self, minibatches: Sequence[Sequence[TrainSample]]) -> StepStats:
        """One optimizer step per minibatch; each is split across ranks with balanced tokens."""
        import ray

        start = time.perf_counter()
        shards: list[list[list[TrainSample]]] = [[] for _ in self.ranks]
        for mb in minibatches:
            for rank_shard, part in zip(shards, _balance(mb, len(self.ranks))):
                rank_shard.append(part)
        totals = [int(sum(s.loss_mask.sum() for s in mb)) for mb in minibatches]
        stats = ray.get([rank.train_step.remote(shard, totals) for rank, shard in zip(self.ranks, shards)])
        tok = max(sum(s.tokens for s in stats), 1.0)
        return StepStats(
            loss=sum(s.loss_sum for s in stats) / tok, entropy=sum(s.entropy_sum for s in stats) / tok,
            clip_frac=sum(s.clipped for s in stats) / tok, mismatch_kl=sum(s.mismatch_k3_sum for s in stats) / tok,
            mismatch_abs=sum(s.mismatch_abs_sum for s in stats) / tok, grad_norm=stats[0].grad_norm,
            tokens=int(tok), train_s=time.perf_counter() - start)

    def publish(self, root: Path, version: int) -> WeightPush:
        import ray

        pushes = ray.get([r.publish.remote(str(root), version) for r in self.ranks])
        return next(p for p in pushes if p is not None)

    def full_state_dict(self) -> dict[str, Any]:
        import ray

        return next(sd for sd in ray.get([r.full_state_dict.remote() for r in self.ranks]) if sd is not None)

    def save_checkpoint(self, path: Path) -> None:
        import ray

        ray.get([r.save_checkpoint.remote(str(path)) for r in self.ranks])

    def load_checkpoint(self, path: Path) -> None:
        import ray

        ray.get([r.load_checkpoint.remote(str(path)) for r in self.ranks])

    def shutdown(self) -> None:
        import ray

        ray.get([r.shutdown.remote() for r in self.ranks])
        for r in self.ranks:
            ray.kill(r)
