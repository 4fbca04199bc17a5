"""Per-sandbox cgroups for the local backend: a memory limit with an OOM-kill counter, a pids
limit and a CPU quota. Works with cgroup v1 (memory + pids hierarchies) and v2; without write access to the
cgroup tree the local backend falls back to rlimits and says so in its isolation label."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

_ROOT = Path("/sys/fs/cgroup")


def _own_paths() -> dict[str, str]:
    """controller -> this process's cgroup path ("" = the v2 unified hierarchy)."""
    paths: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


class SlotCgroup:
    """The cgroup(s) one local sandbox's processes live in."""

    def __init__(self, dirs: list[Path], memory_dir: Path, pids_dir: Path, cpu_dir: Path, v2: bool) -> None:
        self.dirs = dirs
        self.memory_dir, self.pids_dir, self.cpu_dir = memory_dir, pids_dir, cpu_dir
        self.v2 = v2

    @classmethod
    def create(cls, name: str) -> "SlotCgroup | None":
        """Makes the cgroup(s) below our own; None if the tree is not writable here."""
        try:
            own = _own_paths()
            if all(c in own for c in ("memory", "pids", "cpu")) and (_ROOT / "memory").is_dir():
                memory_dir, pids_dir, cpu_dir = (
                    _ROOT / c / own[c].lstrip("/") / name for c in ("memory", "pids", "cpu")
                )
                dirs, v2 = [memory_dir, pids_dir, cpu_dir], False
            elif "" in own and (_ROOT / "cgroup.controllers").exists():
                memory_dir = pids_dir = cpu_dir = _ROOT / own[""].lstrip("/") / name
                dirs, v2 = [memory_dir], True
            else:
                return None
            for path in dirs:
                path.mkdir(exist_ok=True)
            group = cls(dirs, memory_dir, pids_dir, cpu_dir, v2)
            group.set_memory(256)
            return group
        except OSError:
            return None

    @property
    def oom_file(self) -> Path:
        """The file whose `oom_kill N` line counts OOM kills in this cgroup."""
        return self.memory_dir / ("memory.events" if self.v2 else "memory.oom_control")

    def set_memory(self, memory_mb: int) -> None:
        """Memory limit with no swap, so a memory bomb is killed instead of thrashing."""
        value = str(memory_mb << 20)
        if self.v2:
            (self.memory_dir / "memory.max").write_text(value)
            swap = self.memory_dir / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
            return
        limit, memsw = self.memory_dir / "memory.limit_in_bytes", self.memory_dir / "memory.memsw.limit_in_bytes"
        current = int(limit.read_text())
        # memsw must stay >= limit at every step, so the order depends on the direction.
        order = [memsw, limit] if int(value) > current else [limit, memsw]
        for path in order:
            if path.exists():
                path.write_text(value)

    def set_pids(self, pids: int) -> None:
        (self.pids_dir / "pids.max").write_text(str(pids))

    def set_cpus(self, cpus: float) -> None:
        period = 100_000
        quota = max(1000, int(cpus * period))
        if self.v2:
            (self.cpu_dir / "cpu.max").write_text(f"{quota} {period}")
        else:
            (self.cpu_dir / "cpu.cfs_period_us").write_text(str(period))
            (self.cpu_dir / "cpu.cfs_quota_us").write_text(str(quota))

    def procs_files(self) -> list[Path]:
        """Files a process writes "0" to in order to join (before it execs the sandbox)."""
        return [path / "cgroup.procs" for path in self.dirs]

    def remove(self) -> None:
        """Kills what is left inside and removes the cgroup(s)."""
        for path in self.dirs:
            remove_cgroup_dir(path)


def remove_cgroup_dir(path: Path) -> None:
    for _ in range(100):
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.02)


def stale_cgroup_dirs(prefix: str) -> list[Path]:
    """Cgroup dirs below ours whose name starts with `prefix` (left by earlier pools)."""
    found: list[Path] = []
    for controller, own in _own_paths().items():
        base = _ROOT / controller / own.lstrip("/") if controller else _ROOT / own.lstrip("/")
        if base.is_dir():
            found.extend(p for p in base.iterdir() if p.name.startswith(prefix) and p.is_dir())
    return found
