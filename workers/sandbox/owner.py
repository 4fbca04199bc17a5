"""Who owns a sandbox: enough to tell, after a crash, whether the owning process is gone."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import BaseModel


def _start_ticks(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


class Owner(BaseModel):
    """The process (and pool) a sandbox belongs to."""

    host: str
    """Host name of the owner's machine."""
    boot_id: str
    """Kernel boot id of that machine: a reboot makes every earlier owner dead."""
    pid: int
    """Owner's process id."""
    start: int
    """Owner's start time in clock ticks since boot."""
    pool: str
    """Id of the owning pool (unique per SandboxPool instance)."""

    @classmethod
    def current(cls, pool: str) -> "Owner":
        pid = os.getpid()
        return cls(host=socket.gethostname(), boot_id=_boot_id(), pid=pid, start=_start_ticks(pid) or 0, pool=pool)

    def is_alive(self) -> bool:
        """False only when we can be sure: same machine and boot, and the process is gone."""
        if self.host != socket.gethostname():
            return True
        if self.boot_id != _boot_id():
            return False
        return _start_ticks(self.pid) == self.start
