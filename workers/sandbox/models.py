"""Wire and result models of the sandbox layer: what a caller asks for and what it gets back.

Bytes travel as base64 in JSON (the HTTP service) and as raw bytes everywhere else.
"""

from __future__ import annotations

import enum
import posixpath

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Status(str, enum.Enum):
    """How one execution ended. Only SANDBOX_ERROR blames the infrastructure."""

    OK = "ok"
    RUNTIME_ERROR = "runtime_error"
    TIMEOUT = "timeout"
    OOM = "oom"
    OUTPUT_LIMIT = "output_limit"
    SANDBOX_ERROR = "sandbox_error"


class Isolation(str, enum.Enum):
    """What actually isolated the program; reported on every result so nobody over-trusts it."""

    DOCKER = "docker"
    """Hardened container: no network, read-only root, no capabilities, cgroup limits."""
    BWRAP_CGROUP = "bwrap+cgroup"
    """bubblewrap namespaces (pid/net/mount/ipc/uts/user), unprivileged uid, cgroup limits."""
    BWRAP_RLIMIT = "bwrap+rlimit"
    """bubblewrap namespaces, unprivileged uid, per-process rlimits only (no cgroup)."""
    RLIMIT = "rlimit"
    """No namespaces: rlimits and killing by uid or session only; sees the host file system."""


_BYTES_AS_BASE64 = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64", extra="forbid")


def validate_relative_path(path: str) -> str:
    """Returns `path` normalised if it names a place inside the work dir, else raises ValueError."""
    if not path or "\x00" in path:
        raise ValueError(f"sandbox path {path!r} is empty or contains a NUL byte.")
    if path.startswith("/"):
        raise ValueError(f"sandbox path {path!r} is absolute; give it relative to the work dir.")
    parts = path.split("/")
    if ".." in parts:
        raise ValueError(f"sandbox path {path!r} contains '..'; it must stay inside the work dir.")
    norm = posixpath.normpath(path)
    if norm in ("", "."):
        raise ValueError(f"sandbox path {path!r} names the work dir itself, not a file.")
    return norm


class ExecRequest(BaseModel):
    """One program to run in a sandbox."""

    model_config = _BYTES_AS_BASE64

    command: list[str] = Field(min_length=1)
    """argv of the program; argv[0] is looked up on the sandbox's PATH."""
    files: dict[str, bytes] = Field(default_factory=dict)
    """Files written into the work dir before the run: relative path -> content."""
    stdin: bytes = b""
    """Bytes fed to the program's standard input (then closed)."""
    timeout_s: float = Field(default=10.0, gt=0, le=3600)
    """Wall-clock limit; the program and everything it started are killed at this deadline."""
    memory_mb: int = Field(default=512, ge=64, le=65536)
    """Memory limit of the sandbox for this run (work-dir files count against it)."""
    max_output_bytes: int = Field(default=1 << 20, ge=1, le=1 << 30)
    """Cap on stdout, and separately on stderr. More stdout ends the run as OUTPUT_LIMIT;
    more stderr is dropped (stderr_truncated) and the program keeps running."""
    workdir: str = "."
    """Directory to run in, relative to the work dir."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment variables (on top of PATH, HOME, LANG set by the sandbox)."""
    fast_path: bool = True
    """Allow `python3 FILE|-c CODE|-m MOD` to run as a fork of a pre-loaded interpreter."""

    @field_validator("files")
    @classmethod
    def _check_files(cls, files: dict[str, bytes]) -> dict[str, bytes]:
        return {validate_relative_path(p): data for p, data in files.items()}

    @field_validator("workdir")
    @classmethod
    def _check_workdir(cls, workdir: str) -> str:
        return "." if workdir in ("", ".") else validate_relative_path(workdir)

    @field_validator("env")
    @classmethod
    def _check_env(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            if not key or "=" in key or "\x00" in key or "\x00" in value:
                raise ValueError(f"environment variable {key!r} has an invalid name or value.")
        return env


class ExecResult(BaseModel):
    """What one execution produced."""

    model_config = _BYTES_AS_BASE64

    status: Status
    """How the run ended (see Status)."""
    exit_code: int | None = None
    """Exit status of the program; negative = killed by that signal; None if it never ran."""
    stdout: bytes = b""
    """Standard output, at most max_output_bytes."""
    stderr: bytes = b""
    """Standard error, at most max_output_bytes."""
    stdout_truncated: bool = False
    """True if the program wrote more stdout than the cap."""
    stderr_truncated: bool = False
    """True if the program wrote more stderr than the cap."""
    wall_s: float = 0.0
    """Wall-clock seconds from start to the end of the program."""
    cpu_s: float = 0.0
    """User + system CPU seconds of the program and its waited-for children."""
    isolation: Isolation | None = None
    """What isolated this run; None when no sandbox was reached."""
    error: str = ""
    """Why the infrastructure failed (SANDBOX_ERROR) or a note on how the run was ended."""
    broke_sandbox: bool = False
    """The program killed, stopped or tampered with the sandbox's agent or launcher (possible only
    where programs share their uid): its own fault, never the infrastructure's. The sandbox is
    replaced, and nothing more runs in a session that holds it."""


class PoolStats(BaseModel):
    """Counters of one pool since it started."""

    size: int
    """Number of sandboxes the pool keeps."""
    ready: int
    """Sandboxes idle right now."""
    waiting: int
    """Callers waiting for a sandbox right now."""
    max_waiting: int
    """Most callers ever waiting at once."""
    runs: int
    """Executions finished (any status)."""
    sandbox_errors: int
    """Executions that ended as SANDBOX_ERROR."""
    retries: int
    """Executions retried on a fresh sandbox after an infrastructure failure."""
    replaced: int
    """Sandboxes destroyed and replaced after an anomaly."""
