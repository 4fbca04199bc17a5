"""Weight transport from the learner to the rollout engines.

Transport on one node (and on CPU): the learner writes the full state dict as safetensors into
shared memory (`/dev/shm`), and each engine reloads in place with vLLM's `reload_weights` from
that directory. Every push carries a version and a SHA-256 checksum of the file that the engine
verifies before loading, so a torn or stale file is never served. Older versions are deleted once
a newer one is published.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict

WEIGHTS_FILE = "model.safetensors"


class WeightPush(BaseModel):
    """One published set of weights."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    version: int
    """Policy version: the number of learner steps these weights include."""
    path: Path
    """Directory holding `model.safetensors` (what vLLM's reload reads)."""
    checksum: str
    """SHA-256 of `model.safetensors`."""
    num_bytes: int
    """Size of the file."""


class ChecksumMismatch(RuntimeError):
    """The pushed file does not match its announced checksum."""


def exchange_dir(run_name: str) -> Path:
    """Where a run's weight versions live: shared memory when the machine has it."""
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else Path("/tmp")
    return root / "codeworld" / run_name


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
    return WeightPush(version=version, path=target, checksum=_sha256(final), num_bytes=final.stat().st_size)


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


def verify_push(push: WeightPush) -> None:
    """Raise `ChecksumMismatch` unless the pushed file is exactly the one announced."""
    file = push.path / WEIGHTS_FILE
    if not file.is_file():
        raise ChecksumMismatch(f"Weight push v{push.version}: {file} does not exist.")
    actual = _sha256(file)
    if actual != push.checksum:
        raise ChecksumMismatch(f"Weight push v{push.version}: checksum {actual[:12]} of {file} does not "
                               f"match the announced {push.checksum[:12]}.")
