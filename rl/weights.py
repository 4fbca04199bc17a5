"""Weight transport from the learner to the rollout engines: the learner's side.

Two transports behind `weights.transport` (`auto` picks): `file` — the learner writes the full
state dict as safetensors into shared memory (`/dev/shm`) and each engine reloads in place from
that directory, which only an engine on the learner's node can open; `broadcast` — learner rank
0 streams the weights in buckets to every worker of every engine through a process group of its
own (gloo on CPU, vLLM's NCCL communicator on GPU), which works across nodes.

The broadcast is vLLM's weight-transfer flow (`init_weight_transfer_engine`, then per push
`start_weight_update` → `update_weights` per bucket → `finish_weight_update`), registered under
our backend names in vLLM's trainer-side factory. Every rank iterates the FSDP2 model parameter by
parameter (`full_tensor()`, an all-gather), so no host ever holds a second full copy of the model:
rank 0 packs the gathered parameters into a bucket and sends it once the bucket is full. The
engine side and the wire format are `workers.weight_transfer`; every push carries its version,
and every bucket a checksum the engines verify before anything is loaded.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rl.config import WeightsSection
from workers.weight_transfer import (
    WEIGHTS_FILE,
    ChecksumMismatch,
    WeightPush,
    WeightTransferRefused,
    sha256_file,
)

if TYPE_CHECKING:
    from rl.learner import LearnerGroup

log = logging.getLogger(__name__)


def exchange_dir(run_name: str) -> Path:
    """Where a run's weight versions live: shared memory when the machine has it."""
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else Path("/tmp")
    return root / "codeworld" / run_name


def publish(state_dict: Mapping[str, "torch.Tensor"], root: Path, version: int) -> WeightPush:  # noqa: F821
    """Write `state_dict` as version `version` under `root` and delete older versions.
    The file is written under a temporary name and renamed, so readers never see half a file."""
    from safetensors.torch import save_file

    target = root / f"v{version:06d}"
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / (WEIGHTS_FILE + ".tmp")
    save_file(_without_aliases(state_dict), str(tmp), metadata={"format": "pt"})
    final = target / WEIGHTS_FILE
    os.replace(tmp, final)
    for old in root.glob("v*"):
        if old != target and old.name < target.name:
            shutil.rmtree(old, ignore_errors=True)
    return WeightPush(version=version, path=target, checksum=sha256_file(final), num_bytes=final.stat().st_size)


def _without_aliases(state_dict: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:  # noqa: F821
    """Drop tensors that alias an earlier one (tied embeddings): the checkpoint format stores
    them once, as Hugging Face does, and the loader re-ties them."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor.contiguous()
    return out


def save_hf_checkpoint(state_dict: Mapping[str, "torch.Tensor"], like: Path, out: Path) -> None:  # noqa: F821
    """Save weights as a Hugging Face checkpoint: `like`'s config and tokenizer files plus the
    weights, so vLLM, transformers and `model.path` load it."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in like.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    save_file(_without_aliases(state_dict), str(out / WEIGHTS_FILE), metadata={"format": "pt"})


class WeightSync:
    """The run's weight pushes, over the transport its placement allows (`weights.transport`).

    `file`: the orchestrator publishes and `rl.faults.EngineSupervisor.push` loads each engine.
    `broadcast`: `push` streams the learner's weights into the engines given; the transfer group
    is formed again whenever the learner or an engine is not the one it was formed with (a
    restarted engine, a rebuilt learner). A push an engine refused (a corrupted or torn transfer, a
    mismatched version) leaves every engine on its previous weights; it is tried again up to
    `weights.push_attempts` times, then the run stops with the engines' reason."""

    def __init__(
        self, cfg: WeightsSection, tp_sizes: list[int], transport: Literal["file", "broadcast"], root: Path, dtype: str
    ) -> None:
        self.cfg, self.tp_sizes, self.transport, self.root, self.dtype = cfg, tp_sizes, transport, root, dtype
        self._formed: tuple[int, ...] | None = None
        """Identity of the learner and engine handles the broadcast group was formed with."""

    def push(self, learner: LearnerGroup, engines: list[Any], version: int) -> None:
        """Load the learner's current weights into every engine as `version` (blocking)."""
        members = (id(learner), *map(id, engines))
        for attempt in range(1, self.cfg.push_attempts + 1):
            try:
                if self.transport == "file":
                    self._by_file(learner, engines, version)
                    return
                if self._formed != members:
                    self._formed = None
                    learner.connect_engines(engines, self.tp_sizes, self.cfg, self.dtype)
                    log.info("weights: broadcast group formed with %d engine(s)", len(engines))
                    self._formed = members
                learner.broadcast(version)
                return
            except (WeightTransferRefused, ChecksumMismatch) as err:
                if attempt == self.cfg.push_attempts:
                    raise
                log.warning(
                    "weights: push v%d refused (%s); attempt %d of %d",
                    version,
                    err,
                    attempt + 1,
                    self.cfg.push_attempts,
                )

    def _by_file(self, learner: LearnerGroup, engines: list[Any], version: int) -> None:
        import ray

        push = learner.publish(self.root, version)
        try:
            ray.get([w.update_weights.remote(push) for w in engines])
        except ray.exceptions.RayTaskError as err:
            raise (err.cause if isinstance(err.cause, ChecksumMismatch) else err) from None

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
