"""Limits every sandbox of a pool gets, whatever the backend, and the profile of what an image's
programs may write."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SandboxLimits(BaseModel):
    """Per-sandbox caps. Memory is per request (ExecRequest.memory_mb); the rest is per pool."""

    model_config = ConfigDict(extra="forbid")

    pids: int = Field(default=128, ge=8, le=32768)
    """Most processes and threads alive at once in one sandbox (a fork bomb stops here)."""
    cpus: float = Field(default=1.0, gt=0, le=64)
    """CPU share of one sandbox, in cores."""
    work_mb: int = Field(default=256, ge=1)
    """Size of the work dir (a tmpfs: its bytes count against the memory limit too)."""
    tmp_mb: int = Field(default=64, ge=1)
    """Size of /tmp (a tmpfs)."""
    shm_mb: int = Field(default=16, ge=1)
    """Size of /dev/shm (a tmpfs)."""
    nofile: int = Field(default=1024, ge=16, le=1 << 20)
    """Most open file descriptors per process."""
    max_file_bytes: int = Field(default=64 << 20, ge=1)
    """Cap on the bytes get_files returns in one call."""
    workload_uid: int = Field(default=1000, ge=1)
    """Docker backend: the uid programs run as (the agent and its launcher run as root with three
    capabilities; PID 1 of the container as 65534)."""
    call_deadline_s: float = Field(default=30.0, gt=0, le=3600)
    """Host deadline of a file transfer (plus its bytes at 20 MB/s) or a reset (twice this): an
    agent that has not answered by then is hung or stopped, and its sandbox is destroyed."""
    recycle_after: int = Field(default=256, ge=1)
    """Tasks (one-shot runs or sessions) one sandbox serves before it is replaced by a fresh one:
    whatever a task might leave behind that no cleanup knows of dies with it."""


_RESERVED_ROOTS = ("/proc", "/sys", "/dev", "/work", "/tmp", "/run", "/.codeworld")
"""Paths the sandbox itself mounts or needs untouched: a writable path may not be one of them or
lie inside one (nor contain one, which `/` and `/usr`-like parents of them would)."""
_PATH_CHARS = re.compile(r"^(/[A-Za-z0-9._-]+)+$")


class SandboxProfile(BaseModel):
    """What an image's programs may change beyond the work dirs. The root stays read-only; each
    writable path is a tmpfs of its own, filled with the image's content at that path when the
    sandbox starts and again at every reset (so a task never sees what the last one wrote). Docker
    backend only: the image's content reaches the sandbox through a read-only volume Docker fills
    from the image once per node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    writable_paths: tuple[str, ...] = ()
    """Absolute image paths made writable per sandbox, e.g. `/testbed` of an official SWE-bench
    image; none by default (every sandbox is then as before)."""
    writable_mb: int = Field(default=2048, ge=1, le=1 << 20)
    """Size cap of each writable path (a tmpfs: its bytes count against the memory limit too)."""

    @field_validator("writable_paths")
    @classmethod
    def _check_paths(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        for path in paths:
            if not _PATH_CHARS.match(path) or any(p in (".", "..") for p in path.split("/")):
                raise ValueError(
                    f"writable path {path!r} must be an absolute, normalised path of letters, "
                    "digits, '.', '_', '-' and '/'."
                )
            for root in _RESERVED_ROOTS:
                if path == root or path.startswith(root + "/") or root.startswith(path + "/"):
                    raise ValueError(f"writable path {path!r} overlaps {root}, which the sandbox manages itself.")
        for a in paths:
            for b in paths:
                if a != b and b.startswith(a + "/"):
                    raise ValueError(f"writable paths {a!r} and {b!r} are nested; give only one of them.")
        if len(set(paths)) != len(paths):
            raise ValueError("writable paths must not repeat.")
        return paths


class ImagePolicy(BaseModel):
    """How a pool gets its image on a node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pull: bool = False
    """Pull the image from the registry its name names when this node lacks it (off: a missing
    image is an error at once)."""
    manage: bool = False
    """Record the image as one this node's store manages: it counts against `budget_gb` and may
    be removed when unused (SWE instance images; never the base sandbox image)."""
    budget_gb: float | None = Field(default=None, gt=0)
    """Disk the managed images of this node may take (each image's full size, shared layers
    counted in each, so the figure errs high); the least recently used unused ones are removed
    beyond it. None: nothing is removed."""
    state_dir: str | None = None
    """Folder of the node's record of image use; None: `$CODEWORLD_CACHE/images` (default
    `~/.cache/codeworld/images`)."""
