"""Limits every sandbox of a pool gets, whatever the backend."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
