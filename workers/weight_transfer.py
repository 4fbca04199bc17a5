"""What a weight push is on the wire, for both transports: the engine side of the contract.

File transport (one node): the learner writes one safetensors file (`WeightPush` names it) into
shared memory, and the engine checks its SHA-256 before reloading from it.

Broadcast transport (any node): the learner streams its weights in buckets through a process
group that joins learner rank 0 (the sender, rank 0 of that group) with every worker of every
engine. Before each bucket's bytes are broadcast, the engine receives its `Bucket` header (names,
dtypes, shapes, size, checksum, version, position in the push) through vLLM's `update_weights`.
The engine verifies each bucket against its header and stages it; only a complete, verified push
is loaded, so a torn or corrupted push is refused whole and the previous version keeps serving.
The group is gloo on CPU and vLLM's NCCL communicator (`PyNcclCommunicator`) on GPU; everything
else is the same code on both.

This module imports nothing of `rl`: the learner depends on it, not the other way round.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

WEIGHTS_FILE = "model.safetensors"

GLOO_BACKEND = "codeworld_gloo"
"""vLLM weight-transfer backend name of the broadcast over gloo (CPU)."""
NCCL_BACKEND = "codeworld_nccl"
"""vLLM weight-transfer backend name of the broadcast over NCCL (GPU)."""
WIRE_OF_BACKEND: dict[str, Literal["gloo", "nccl"]] = {GLOO_BACKEND: "gloo", NCCL_BACKEND: "nccl"}

ALIGN = 64
"""Byte alignment of every tensor inside a bucket (any dtype view of the bytes stays aligned)."""


class ChecksumMismatch(RuntimeError):
    """A push (file or bucket) does not match what was announced for it; nothing was loaded."""


class WeightTransferRefused(RuntimeError):
    """An engine refused a broadcast push (torn, corrupted or mismatched); it still serves the
    version it had before."""


class WeightPush(BaseModel):
    """One set of weights published as a file (the one-node transport)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    version: int
    """Policy version: the number of learner steps these weights include."""
    path: Path
    """Directory holding `model.safetensors` (what vLLM's reload reads)."""
    checksum: str
    """SHA-256 of `model.safetensors`."""
    num_bytes: int
    """Size of the file."""


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_push(push: WeightPush) -> None:
    """Raise `ChecksumMismatch` unless the pushed file is exactly the one announced."""
    file = push.path / WEIGHTS_FILE
    if not file.is_file():
        raise ChecksumMismatch(f"Weight push v{push.version}: {file} does not exist.")
    actual = sha256_file(file)
    if actual != push.checksum:
        raise ChecksumMismatch(
            f"Weight push v{push.version}: checksum {actual[:12]} of {file} does not "
            f"match the announced {push.checksum[:12]}."
        )


# ----------------------------------------------------------------------------------- broadcast
class Endpoint(BaseModel):
    """Where an engine's workers join the transfer group: the `init_weight_transfer_engine` payload."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    master_address: str
    """Address of learner rank 0's node, where the group's store listens."""
    master_port: int = Field(ge=1, le=65535)
    """Port of the group's store on that node."""
    rank_offset: int = Field(ge=1)
    """Group rank of this engine's first worker (the sender is rank 0)."""
    world_size: int = Field(ge=2)
    """Sender plus every worker of every engine."""
    timeout_s: float = Field(gt=0)
    """How long any one step of a push (joining, one bucket) may wait for the other side."""
    local_address: str = ""
    """This engine's node address, which gloo binds to (set by the engine; "" lets gloo resolve
    the host name, which on some clusters resolves to loopback)."""


class TensorMeta(BaseModel):
    """One tensor inside a bucket."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str
    """Checkpoint (Hugging Face) name, as vLLM's `load_weights` expects it."""
    dtype: str
    """torch dtype name ("float32", "bfloat16")."""
    shape: list[int]
    """Full (unsharded) shape."""


class Bucket(BaseModel):
    """The header of one bucket: the `update_weights` payload sent right before its bytes."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    version: int = Field(ge=0)
    """Policy version of the push this bucket belongs to."""
    index: int = Field(ge=0)
    """Position of the bucket in the push (0-based)."""
    count: int = Field(ge=1)
    """Buckets in the push."""
    tensors: list[TensorMeta] = Field(min_length=1)
    """The tensors packed in the bucket, in order, each at the next `ALIGN`-byte offset."""
    nbytes: int = Field(ge=1)
    """Size of the bucket's bytes (what `layout` computes from `tensors`)."""
    checksum: str
    """`checksum()` of the bucket's bytes as the sender packed them."""


def _torch_dtype(name: str) -> Any:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def layout(tensors: list[TensorMeta]) -> tuple[list[int], int]:
    """Byte offset of each tensor in a bucket, and the bucket's size (both sides compute it)."""
    import math

    offsets, end = [], 0
    for meta in tensors:
        start = -(-end // ALIGN) * ALIGN
        offsets.append(start)
        end = start + math.prod(meta.shape) * _torch_dtype(meta.dtype).itemsize
    return offsets, -(-end // ALIGN) * ALIGN


def plan_buckets(tensors: list[TensorMeta], bucket_bytes: int) -> list[list[TensorMeta]]:
    """Tensors in order, grouped into buckets of at most `bucket_bytes` (a larger tensor alone)."""
    buckets: list[list[TensorMeta]] = [[]]
    for meta in tensors:
        if buckets[-1] and layout(buckets[-1] + [meta])[1] > bucket_bytes:
            buckets.append([])
        buckets[-1].append(meta)
    return buckets if buckets[0] else []


def views(buffer: Any, tensors: list[TensorMeta]) -> list[tuple[str, Any]]:
    """(name, tensor view) of each tensor packed in `buffer` (a flat uint8 tensor)."""
    offsets, _ = layout(tensors)
    out = []
    for meta, start in zip(tensors, offsets):
        dtype = _torch_dtype(meta.dtype)
        count = 1
        for dim in meta.shape:
            count *= dim
        out.append((meta.name, buffer[start : start + count * dtype.itemsize].view(dtype).view(meta.shape)))
    return out


def checksum(buffer: Any) -> str:
    """xxh3-64 of a flat uint8 tensor's bytes (~6 GB/s on one core here, against SHA-256's 1.3:
    a corruption check, not a signature). A GPU buffer is copied to the host first."""
    import xxhash

    host = buffer if buffer.device.type == "cpu" else buffer.cpu()
    return "xxh3:" + xxhash.xxh3_64_hexdigest(memoryview(host.numpy()))


class Wire(Protocol):
    """One process group's broadcast, rank 0 the source."""

    def broadcast(self, tensor: Any) -> None:
        """Send (rank 0) or receive (others) `tensor` in place; returns once it is complete here."""

    def close(self) -> None:
        """Leave the group."""


GLOO_STREAMS = 2
"""TCP connections of a gloo wire: every broadcast is split into this many parts sent at once.
One connection is bound by one thread's copies. Measured here: 256 MiB over loopback at 3.3 GB/s
over one, 4.8 over two, 5.3 over four; a 1.4 GB push between two containers in 1.60 s over one
and 1.43 s over two (medians of five runs, bench/weight_sync.py's cluster job)."""


class GlooWire:
    """Broadcast over a gloo process group of its own (the default group, if any, is untouched),
    split across `GLOO_STREAMS` connections (both sides split a tensor the same way)."""

    def __init__(self, endpoint: Endpoint, rank: int) -> None:
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=endpoint.timeout_s)
        self._store = dist.TCPStore(
            endpoint.master_address, endpoint.master_port, endpoint.world_size, is_master=rank == 0, timeout=timeout
        )
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        # Bind to the node's own address: the host name may resolve to loopback (Debian's /etc/hosts
        # does), and a loopback address is unreachable from other nodes.
        options._devices = [
            dist.ProcessGroupGloo.create_device(hostname=endpoint.local_address) for _ in range(GLOO_STREAMS)
        ]
        options._threads = GLOO_STREAMS
        self._group = dist.ProcessGroupGloo(self._store, rank, endpoint.world_size, options)

    def broadcast(self, tensor: Any) -> None:
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank = 0
        parts = [self._group.broadcast([part], options) for part in tensor.view(-1).chunk(GLOO_STREAMS)]
        for work in parts:
            work.wait()

    def close(self) -> None:
        self._group = None  # type: ignore[assignment]
        self._store = None  # type: ignore[assignment]


class NcclWire:
    """Broadcast over vLLM's NCCL communicator, joined through its stateless rendezvous (the same
    helper vLLM's own "nccl" weight-transfer backend uses)."""

    def __init__(self, endpoint: Endpoint, rank: int) -> None:
        import torch
        from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

        self._comm = stateless_init_process_group(
            endpoint.master_address, endpoint.master_port, rank, endpoint.world_size, torch.cuda.current_device()
        )

    def broadcast(self, tensor: Any) -> None:
        import torch

        self._comm.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()

    def close(self) -> None:
        self._comm.destroy()


def open_wire(kind: Literal["gloo", "nccl"], endpoint: Endpoint, rank: int) -> Wire:
    """Join the transfer group as `rank` (blocks until every rank has joined)."""
    return GlooWire(endpoint, rank) if kind == "gloo" else NcclWire(endpoint, rank)
