"""The learner: one Ray actor per rank, `torch.distributed` + FSDP2 `fully_shard` from the start
(gloo on CPU, NCCL on GPU), AdamW, fp32 logprobs. Model building is in `rl.parallelize`, packing
into micro-batches in `rl.batching`.

`LearnerGroup` (driver side) starts the ranks, splits each batch across them and publishes weights.
Each rank packs its share of every minibatch into micro-batches. FSDP's collectives pair up only
if every rank runs the same passes in the same order, so for each minibatch all ranks run as many
micro-batches as the busiest one; a rank with fewer runs a dummy (`dummy_micro_batch`, which
counts for nothing) through the *same* pass — a no-grad forward in the proximal pass, a forward
and backward in the training pass.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from rl.batching import MicroBatch, TrainSample, dummy_micro_batch, micro_batches
from rl.config import AlgorithmSection, LearnerSection, WeightsSection
from rl.loss import ImportanceStats, aggregation_weights, merge_importance
from workers.weight_transfer import WeightPush

if TYPE_CHECKING:
    from rl.placement import Reservation

log = logging.getLogger(__name__)


class RankStats(BaseModel):
    """Sums over one rank's tokens; the group adds ranks up and divides by `tokens`."""

    loss_sum: float = 0.0
    tokens: float = 0.0
    clipped: float = 0.0
    entropy_sum: float = 0.0
    mismatch_k3_sum: float = 0.0
    mismatch_abs_sum: float = 0.0
    kl_sum: float = 0.0
    """Σ of the KL estimate to the reference policy (0 without one)."""
    importance: dict[int, ImportanceStats] = {}
    """Behaviour-weight statistics by staleness."""
    grad_norms: list[float] = []
    """Pre-clip gradient norm of each optimizer step (the same on every rank)."""
    float8_drift_sum: float = 0.0
    """Σ |logprob with float8 − logprob without| over the tokens of the drift probe."""
    float8_drift_tokens: float = 0.0


def lr_multiplier(step: int, cfg: LearnerSection) -> float:
    """The share of `lr` used by optimizer step `step` (0-based): a linear warm-up to 1, a stable
    phase, a linear decay to `min_lr_ratio` over `decay_steps`, then constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decayed = step - cfg.warmup_steps - cfg.stable_steps
    if cfg.decay_steps == 0 or decayed <= 0:
        return 1.0
    return 1.0 - (1.0 - cfg.min_lr_ratio) * min(1.0, decayed / cfg.decay_steps)


def free_port() -> int:
    """A TCP port free on every interface of this node (a rendezvous listens on all of them)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LearnerRank:
    """One rank of the learner. Start through `LearnerGroup`."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        master_port: int,
        model_path: str,
        learner: LearnerSection,
        algo: AlgorithmSection,
        temperature: float,
        seed: int,
        master_addr: str = "127.0.0.1",
    ) -> None:
        import torch
        import torch.distributed as dist

        from rl.parallelize import build_model, require_runnable

        require_runnable(learner)
        # Rank 0's node address: ranks on other nodes rendezvous there.
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        torch.set_num_threads(learner.threads_per_rank)
        torch.manual_seed(seed)
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
        self.rank, self.world_size = rank, world_size
        self.cfg, self.algo, self.temperature = learner, algo, temperature
        self.model = build_model(model_path, learner, self.device)
        # The KL term's reference: the starting weights, frozen, sharded like the policy.
        self.reference = build_model(model_path, learner, self.device).eval() if algo.kl_coef else None
        if self.reference is not None:
            self.reference.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=learner.lr, betas=learner.betas, weight_decay=learner.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_multiplier(step, learner))
        self.steps = 0

    def ready(self) -> int:
        return self.rank

    def train_step(self, minibatches: list[list[TrainSample]]) -> RankStats:
        """One optimizer step per minibatch over this rank's share of it (possibly empty). Each
        sample carries its loss weight, computed over the whole minibatch (all ranks)."""
        import torch

        from rl.parallelize import precompute_float8_scales

        self.model.train()
        micro = [micro_batches(mb, self.cfg.micro_batch_tokens) for mb in minibatches]
        rounds = self._rounds(micro)
        stats = RankStats()
        every = self.cfg.float8_drift_every
        if self.cfg.float8 != "off" and every and self.steps % every == 0:
            self._lockstep(micro[0][:1], 1, lambda mb: self._float8_drift(mb, stats))
        if len(micro) > 1:  # later minibatches need the step-start (proximal) logprobs
            for mbs, n in zip(micro, rounds):
                self._lockstep(mbs, n, self._set_proximal)
        for mbs, n in zip(micro, rounds):
            self.optimizer.zero_grad(set_to_none=True)
            self._lockstep(mbs, n, lambda mb: self._accumulate(mb, stats))
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            stats.grad_norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
            self.optimizer.step()
            self.scheduler.step()
            precompute_float8_scales(self.model, self.cfg, self.device)
        self.steps += 1
        return stats

    def _rounds(self, micro: list[list[MicroBatch]]) -> list[int]:
        """Per minibatch, the most micro-batches any rank has (one all-reduce for the step)."""
        import torch
        import torch.distributed as dist

        counts = torch.tensor([len(m) for m in micro], device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        return counts.tolist()

    def _lockstep(self, micro: list[MicroBatch], rounds: int, fn: Callable[[MicroBatch], None]) -> None:
        """`fn` on each micro-batch, then on dummies up to `rounds` calls: the same pass on every rank."""
        for i in range(rounds):
            fn((micro[i] if i < len(micro) else dummy_micro_batch()).to(self.device))

    def _logprobs(self, mb: MicroBatch, model: Any = None) -> tuple[Any, Any]:
        from rl.loss import token_logprobs

        model = self.model if model is None else model
        logits = model(**mb.model_inputs()).logits[0]  # [M, V]: only where a model token is predicted
        return token_logprobs(logits, mb.targets, self.temperature)

    def _set_proximal(self, mb: MicroBatch) -> None:
        import torch

        with torch.no_grad():
            mb.proximal = self._logprobs(mb)[0]

    def _float8_drift(self, mb: MicroBatch, stats: RankStats) -> None:
        """Logprobs of one micro-batch with and without float8, same weights: the price of float8.
        Both run eagerly: swapping the layers' forward inside compiled blocks would recompile them
        (twice per probe) and could exhaust dynamo's cache, after which blocks run uncompiled."""
        import torch

        from rl.parallelize import float8_bypassed

        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            fp8 = self._logprobs(mb)[0]
            with float8_bypassed(self.model):
                plain = self._logprobs(mb)[0]
        stats.float8_drift_sum += float(((fp8 - plain).abs() * mb.mask).sum())
        stats.float8_drift_tokens += float(mb.mask.sum())

    def _accumulate(self, mb: MicroBatch, stats: RankStats) -> None:
        import torch

        from rl.loss import LossInputs, policy_loss

        logp, entropy = self._logprobs(mb)
        prox = mb.proximal if mb.proximal is not None else logp.detach()
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref = self._logprobs(mb, self.reference)[0]
        inputs = LossInputs(
            logp=logp,
            prox=prox,
            sampler=mb.sampler,
            advantages=mb.advantages,
            mask=mb.mask,
            weights=mb.weights,
            seq=mb.seq,
            ages=mb.ages,
            entropy=entropy,
            ref=ref,
        )
        out = policy_loss(inputs, self.algo)
        # FSDP averages gradients over ranks; the weights already hold the batch's normaliser.
        (out.loss_sum * self.world_size).backward()
        with torch.no_grad():
            m = mb.mask
            diff = (prox - mb.sampler) * m  # learner (step start) vs sampler, same tokens
            stats.loss_sum += out.policy_sum
            stats.tokens += out.tokens
            stats.clipped += out.clipped
            stats.kl_sum += out.kl_sum
            stats.entropy_sum += float((entropy.detach() * m).sum())
            stats.mismatch_k3_sum += float(((torch.exp(diff) - 1 - diff) * m).sum())
            stats.mismatch_abs_sum += float(diff.abs().sum())
            stats.importance = merge_importance([stats.importance, out.importance])

    def full_state_dict(self) -> dict[str, Any] | None:
        """The full (unsharded) fp32 state dict on rank 0; None elsewhere. Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(self.model, options=options)
        return sd if self.rank == 0 else None

    def publish(self, root: str, version: int) -> WeightPush | None:
        """Write this version's weights for the engines (rank 0 writes; all ranks must call)."""
        from rl.weights import publish

        sd = self.full_state_dict()
        return publish(sd, Path(root), version) if sd is not None else None

    def connect_engines(self, engines: list[Any], tp_sizes: list[int], weights: WeightsSection, dtype: str) -> None:
        """Set up the broadcast weight transport (collective; rank 0 opens it on its node)."""
        import torch

        from rl.weight_broadcast import connect

        if getattr(self, "sender", None) is not None:  # formed again: a restarted engine, say
            self.sender.shutdown()
        self.sender = connect(
            self.model,
            self.rank,
            engines,
            tp_sizes,
            weights.bucket_mb,
            weights.timeout_s,
            getattr(torch, dtype),
            free_port() if self.rank == 0 else 0,
        )

    def broadcast(self, version: int) -> Any:
        """Stream this version's weights to the engines (collective); rank 0 returns its PushStats."""
        return self.sender.send_weights(version)

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

        if getattr(self, "sender", None) is not None:
            self.sender.shutdown()
        if dist.is_initialized():
            dist.destroy_process_group()


def balance(samples: Sequence[TrainSample], n: int) -> list[list[TrainSample]]:
    """Split samples into n parts of similar token counts (longest first, to the lightest part)."""
    parts: list[list[TrainSample]] = [[] for _ in range(n)]
    loads = [0] * n
    for s in sorted(samples, key=lambda s: -len(s.input_ids)):
        r = loads.index(min(loads))
        parts[r].append(s)
        loads[r] += len(s.input_ids)
    return parts


def weigh(minibatch: Sequence[TrainSample], algo: AlgorithmSection, max_tokens: int) -> list[TrainSample]:
    """The minibatch's samples with their loss weights (`rl.loss.aggregation_weights`), which
    need the whole minibatch: ranks and micro-batches see parts of it."""
    counts = [int(s.loss_mask.sum()) for s in minibatch]
    weights = aggregation_weights(counts, algo, max_tokens)
    return [s.model_copy(update={"weight": w}) for s, w in zip(minibatch, weights)]


def _rank_options(learner: LearnerSection, reservation: Reservation | None) -> list[dict[str, Any]]:
    """Ray options of each rank: its bundle of the run's placement, or (no placement) one CPU and,
    when the cluster has GPUs, one GPU."""
    import ray

    if reservation is not None:
        return [reservation.options(p) for p in reservation.plan.learner]
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return [{"num_cpus": min(learner.threads_per_rank, 1), "num_gpus": gpus}] * learner.world_size


def _rendezvous(reservation: Reservation | None) -> tuple[str, int]:
    """Rank 0's node address and a port free there (where every rank meets)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if reservation is None:
        return "127.0.0.1", free_port()
    node = reservation.plan.learner[0].node
    on_node = NodeAffinitySchedulingStrategy(node.node_id, soft=False)
    port = ray.remote(free_port).options(num_cpus=0, scheduling_strategy=on_node).remote()
    return node.address, ray.get(port)


class StepStats(BaseModel):
    """What one learner step reports: token means over the step's model tokens."""

    loss: float
    entropy: float
    clip_frac: float
    mismatch_kl: float
    mismatch_abs: float
    grad_norm: float
    """Mean pre-clip gradient norm over the step's optimizer steps (one per minibatch)."""
    grad_norms: list[float]
    """Pre-clip gradient norm of each optimizer step."""
    float8_drift: float | None = None
    """Mean |logprob with float8 − without| per token on this step's probe (None: not measured)."""
    kl: float | None = None
    """Mean KL estimate to the reference policy per token (None: no KL term)."""
    importance: dict[int, ImportanceStats] = {}
    """Behaviour-weight statistics by staleness, summed over the ranks."""
    tokens: int
    train_s: float


class LearnerGroup:
    """Driver-side handle on the learner ranks."""

    def __init__(
        self,
        model_path: str,
        learner: LearnerSection,
        algo: AlgorithmSection,
        temperature: float,
        seed: int,
        max_tokens: int = 1,
        reservation: Reservation | None = None,
    ) -> None:
        """`max_tokens`: the rollout's token limit per turn, the constant of `aggregation: token_sum`.
        `reservation`: the run's placement (`rl.placement`); None: this machine's Ray, any GPU."""
        import ray

        from rl.parallelize import require_runnable

        options = _rank_options(learner, reservation)
        # Check the kernels where a rank will run, so a bad choice is one clear error, not a dead actor.
        probe = ray.remote(require_runnable).options(**options[0])
        try:
            ray.get(probe.remote(learner))
        except ray.exceptions.RayTaskError as err:
            raise err.cause from None
        address, port = _rendezvous(reservation)
        remote = ray.remote(LearnerRank)
        self.ranks = [
            remote.options(**options[r]).remote(
                r, learner.world_size, port, model_path, learner, algo, temperature, seed, address
            )
            for r in range(learner.world_size)
        ]
        ray.get([r.ready.remote() for r in self.ranks])
        self.world_size, self.algo, self.max_tokens = learner.world_size, algo, max_tokens
        log.info(
            "learner: %d rank(s) ready, rendezvous at %s:%d (%s attention, %s float8, mixed precision %s)",
            self.world_size,
            address,
            port,
            learner.attention,
            learner.float8,
            learner.mixed_precision,
        )

    def train_step(self, minibatches: Sequence[Sequence[TrainSample]]) -> StepStats:
        """One optimizer step per minibatch; each is split across ranks with balanced tokens (a
        rank's share may be empty)."""
        import ray

        start = time.perf_counter()
        shards: list[list[list[TrainSample]]] = [[] for _ in self.ranks]
        for mb in minibatches:
            for rank_shard, part in zip(shards, balance(weigh(mb, self.algo, self.max_tokens), len(self.ranks))):
                rank_shard.append(part)
        stats = ray.get([rank.train_step.remote(shard) for rank, shard in zip(self.ranks, shards)])
        tok = max(sum(s.tokens for s in stats), 1.0)
        probed = sum(s.float8_drift_tokens for s in stats)
        drift = sum(s.float8_drift_sum for s in stats) / probed if probed else None
        if drift is not None:
            log.info("learner: float8 logprob drift %.4f nats/token (%d probe tokens)", drift, probed)
        norms = stats[0].grad_norms
        return StepStats(
            loss=sum(s.loss_sum for s in stats) / tok,
            entropy=sum(s.entropy_sum for s in stats) / tok,
            clip_frac=sum(s.clipped for s in stats) / tok,
            mismatch_kl=sum(s.mismatch_k3_sum for s in stats) / tok,
            mismatch_abs=sum(s.mismatch_abs_sum for s in stats) / tok,
            grad_norm=sum(norms) / len(norms),
            grad_norms=norms,
            float8_drift=drift,
            kl=sum(s.kl_sum for s in stats) / tok if self.algo.kl_coef else None,
            importance=merge_importance([s.importance for s in stats]),
            tokens=int(tok),
            train_s=time.perf_counter() - start,
        )

    def publish(self, root: Path, version: int) -> WeightPush:
        import ray

        pushes = ray.get([r.publish.remote(str(root), version) for r in self.ranks])
        return next(p for p in pushes if p is not None)

    def connect_engines(self, engines: list[Any], tp_sizes: list[int], weights: WeightsSection, dtype: str) -> None:
        """Join the broadcast transport with the engines (they receive in `dtype`)."""
        import ray

        ray.get([r.connect_engines.remote(engines, tp_sizes, weights, dtype) for r in self.ranks])

    def broadcast(self, version: int) -> Any:
        """Stream this version's weights into every engine; returns rank 0's PushStats. Raises
        `WeightTransferRefused` when an engine refused the push (it keeps its previous weights)."""
        import ray

        from workers.weight_transfer import WeightTransferRefused

        try:
            return ray.get([r.broadcast.remote(version) for r in self.ranks])[0]
        except ray.exceptions.RayTaskError as err:
            raise (err.cause if isinstance(err.cause, WeightTransferRefused) else err) from None

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
        """End the ranks: an orderly shutdown where a rank still answers, then kill. Never raises:
        a rank may be dead, or stuck in a collective with a dead peer (a failed learner)."""
        import ray

        for rank in self.ranks:
            try:
                ray.get(rank.shutdown.remote(), timeout=10)
            except Exception:
                pass  # dead or stuck: killed below either way
            ray.kill(rank, no_restart=True)
