"""The learner's side of the broadcast weight transport, as a vLLM trainer-side weight-transfer
engine registered under our backend names (`WeightTransferTrainerFactory`).

Every learner rank iterates the FSDP2 model parameter by parameter (`full_tensor()`, an
all-gather), so no host ever holds a second full copy of the model: rank 0 packs the gathered
parameters into a bucket of `weights.bucket_mb` and sends it as soon as it is full. Per push it
drives every engine through vLLM's flow — `start_weight_update`, `update_weights` with one bucket
header, concurrently with that bucket's broadcast, then `finish_weight_update` — over the
`RolloutWorker` actors (`EngineFleet`). Rank 0 opens the transfer group on its own node, on a free
port there. The wire format and the engine side are `workers.weight_transfer`.

Imported only where a broadcast is set up: it imports vLLM, which takes seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    materialize_full_tensor,
)

from workers.weight_transfer import (
    GLOO_BACKEND,
    NCCL_BACKEND,
    WIRE_OF_BACKEND,
    Bucket,
    Endpoint,
    TensorMeta,
    WeightTransferRefused,
    Wire,
    checksum,
    layout,
    open_wire,
    plan_buckets,
)

log = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")
"""Name parts that activation checkpointing and torch.compile add; checkpoints have none."""


class PushStats(BaseModel):
    """What one broadcast push measured on rank 0 (zeros on the other ranks)."""

    seconds: float = 0.0
    """From the first gather to the last engine's load."""
    bytes: int = 0
    """Bytes broadcast (the wire dtype's size of every parameter, plus alignment)."""
    buckets: int = 0
    """Buckets broadcast."""


class ShardedSource(WeightSource):
    """The learner's parameters with checkpoint names, in the wire dtype. Iterating all-gathers
    one parameter at a time: a collective, so every rank iterates, in the same order."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype

    def _params(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for name, param in self.model.named_parameters():  # tied weights come once
            for prefix in _WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            yield name, param

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, self.dtype, tuple(p.shape)) for name, p in self._params()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in self._params():
            yield name, materialize_full_tensor(param.detach()).to(self.dtype)


class EngineFleet:
    """vLLM's weight-sync client protocol (`VLLMWeightSyncClient`) over the run's RolloutWorker
    actors: each call goes to every engine and waits for all. The engines are separate vLLM
    instances, so each gets its own rank offset in the transfer group."""

    def __init__(self, engines: list[Any], tp_sizes: list[int], timeout_s: float) -> None:
        self.engines, self.tp_sizes, self.timeout_s = engines, tp_sizes, timeout_s

    def _all(self, calls: list[Any]) -> list[Any]:
        import ray

        try:
            return ray.get(calls, timeout=self.timeout_s)
        except ray.exceptions.RayTaskError as err:
            raise (err.cause if isinstance(err.cause, WeightTransferRefused) else err) from None

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self.engines))]
        self._all(
            [e.init_weight_transfer.remote(Endpoint(**init_info, rank_offset=o)) for e, o in zip(self.engines, offsets)]
        )

    def start_weight_update(self) -> None:
        self._all([e.start_weight_update.remote() for e in self.engines])

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._all([e.receive_bucket.remote(update_info) for e in self.engines])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all([e.finish_weight_update.remote(int(weight_version or 0)) for e in self.engines])

    def abort(self) -> None:
        """End a push that failed on the learner's side: every engine keeps its weights."""
        import ray

        ray.get([e.abort_weight_update.remote() for e in self.engines], timeout=self.timeout_s)


@dataclass
class GlooBroadcastInit(TrainerInitInfo):
    """Trainer-side init info of the broadcast over gloo (CPU)."""

    backend: ClassVar[str] = GLOO_BACKEND
    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int
    timeout_s: float


@dataclass
class NcclBroadcastInit(GlooBroadcastInit):
    """The same over NCCL (GPU)."""

    backend: ClassVar[str] = NCCL_BACKEND


class BroadcastSender(TrainerWeightTransferEngine[GlooBroadcastInit]):
    """On rank 0: holds the wire and drives the engines. Elsewhere: takes part in the gathers."""

    init_info_cls = GlooBroadcastInit

    def __init__(
        self, *, client: EngineFleet, source: ShardedSource, init: GlooBroadcastInit, wire: Wire | None
    ) -> None:
        super().__init__(client=client, source=source, is_sender=init.is_sender)  # type: ignore[arg-type]
        self.fleet, self.params, self.init, self.wire = client, source, init, wire
        self.buffers: list[torch.Tensor] = []

    @classmethod
    def trainer_init(
        cls, init_info: GlooBroadcastInit, *, client: Any, source: WeightSource | None = None
    ) -> BroadcastSender:
        if not isinstance(source, ShardedSource):
            raise TypeError("the broadcast sender replays a ShardedSource every push.")
        if not init_info.is_sender:
            return cls(client=client, source=source, init=init_info, wire=None)
        endpoint = Endpoint(
            master_address=init_info.master_address,
            master_port=init_info.master_port,
            rank_offset=1,
            world_size=init_info.world_size,
            timeout_s=init_info.timeout_s,
            local_address=init_info.master_address,
        )
        # The engines block inside their init until every member has joined, the sender included.
        with ThreadPoolExecutor(1) as pool:
            joined = pool.submit(
                client.init_weight_transfer_engine, endpoint.model_dump(exclude={"rank_offset", "local_address"})
            )
            wire = open_wire(WIRE_OF_BACKEND[init_info.backend], endpoint, 0)
            joined.result()
        return cls(client=client, source=source, init=init_info, wire=wire)

    def send_weights(self, version: int = 0) -> PushStats:  # type: ignore[override]
        """Stream every parameter to every engine as `version`. Collective over the learner ranks.
        Raises `WeightTransferRefused` (rank 0) when an engine refused the push; every engine
        then still serves its previous version."""
        start = time.perf_counter()
        plan = plan_buckets(
            [
                TensorMeta(name=m.name, dtype=str(m.dtype).removeprefix("torch."), shape=list(m.shape))
                for m in self.params.metadata()
            ],
            self.init.bucket_bytes,
        )
        params = iter(self.params)
        if not self.is_sender:
            for _ in params:  # the gathers rank 0 needs
                pass
            return PushStats()
        try:
            self.fleet.start_weight_update()
            sent = self._stream(version, plan, params)
            self.fleet.finish_weight_update(str(version))
        except BaseException:
            for _ in params:  # keep the other ranks' gathers paired before giving up
                pass
            self.fleet.abort()
            raise
        return PushStats(seconds=time.perf_counter() - start, bytes=sent, buckets=len(plan))

    def _stream(self, version: int, plan: list[list[TensorMeta]], params: Iterator[tuple[str, torch.Tensor]]) -> int:
        """Pack each bucket and hand it to a send thread, which announces it, broadcasts it and
        waits until every engine took it (and verified the one before) before the next one goes:
        the engines stay in step, and one that refused a bucket is sent nothing more. Two buffers
        let the next bucket be gathered and packed while the previous one is on the wire."""
        sent, sends, refused = 0, [], threading.Event()
        with ThreadPoolExecutor(1) as send_thread, ThreadPoolExecutor(1) as announce:
            for index, tensors in enumerate(plan):
                if index >= 2:
                    sends[index - 2].result()  # its buffer is free again (and it was accepted)
                for done in sends:
                    if done.done():
                        done.result()  # a refusal stops the packing early
                buffer = self._buffers(plan)[index % 2]
                offsets, nbytes = layout(tensors)
                for meta, offset in zip(tensors, offsets):
                    name, tensor = next(params)
                    if name != meta.name:
                        raise RuntimeError(
                            f"parameter order changed during a push: {name} where {meta.name} was planned."
                        )
                    flat = tensor.contiguous().view(-1).view(torch.uint8)
                    buffer[offset : offset + flat.numel()].copy_(flat)
                data = buffer[:nbytes]
                bucket = Bucket(
                    version=version,
                    index=index,
                    count=len(plan),
                    tensors=tensors,
                    nbytes=nbytes,
                    checksum=checksum(data),
                )
                sends.append(send_thread.submit(self._send, bucket, data, announce, refused))
                sent += nbytes
            for done in sends:
                done.result()
        return sent

    def _send(self, bucket: Bucket, data: torch.Tensor, announce: ThreadPoolExecutor, refused: threading.Event) -> None:
        """Announce one bucket and broadcast its bytes (the engines receive them inside their
        `update_weights`, so both go at once); return once every engine accepted it. After a
        refusal nothing more goes out: no engine would join the broadcast."""
        if refused.is_set():
            return
        try:
            announced = announce.submit(self.fleet.update_weights, bucket.model_dump())
            self._broadcast(data)
            announced.result()
        except BaseException:
            refused.set()
            raise

    def _buffers(self, plan: list[list[TensorMeta]]) -> list[torch.Tensor]:
        """The two packing buffers, kept between pushes (fresh pages cost ~0.3 s per GB on CPU)."""
        size = max(layout(b)[1] for b in plan)
        if not self.buffers or self.buffers[0].numel() < size:
            device = next(self.params.model.parameters()).device
            self.buffers = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2)]
        return self.buffers

    def _broadcast(self, data: torch.Tensor) -> None:
        """Send one bucket's bytes (the engines receive them inside `update_weights`)."""
        assert self.wire is not None
        self.wire.broadcast(data)

    def shutdown(self) -> None:
        if self.wire is not None:
            self.wire.close()
            self.wire = None


for _name in (GLOO_BACKEND, NCCL_BACKEND):
    if _name not in WeightTransferTrainerFactory._registry:  # a second import must not raise
        WeightTransferTrainerFactory.register_engine(_name, BroadcastSender)


def connect(
    model: torch.nn.Module,
    rank: int,
    engines: list[Any],
    tp_sizes: list[int],
    bucket_mb: float,
    timeout_s: float,
    dtype: torch.dtype,
    port: int,
) -> BroadcastSender:
    """Every learner rank: the broadcast sender over `model`'s parameters. Rank 0 (`port`: free on
    its node) opens the group and has every engine join it."""
    import ray

    init_cls = NcclBroadcastInit if torch.cuda.is_available() else GlooBroadcastInit
    address = ray.util.get_node_ip_address()
    init = init_cls(
        master_address=address,
        master_port=port,
        world_size=1 + sum(tp_sizes),
        bucket_bytes=int(bucket_mb * 2**20),
        timeout_s=timeout_s,
        rank=rank,
    )
    sender = WeightTransferTrainerFactory.trainer_init(
        init, client=EngineFleet(engines, tp_sizes, timeout_s), source=ShardedSource(model, dtype)
    )
    if rank == 0:
        log.info(
            "weights: broadcast over %s from %s:%d to %d engine(s)",
            WIRE_OF_BACKEND[init.backend],
            address,
            port,
            len(engines),
        )
    return sender  # type: ignore[return-value]
