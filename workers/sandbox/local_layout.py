"""The bubblewrap command line of a local sandbox.

As root, an outer bwrap sets up the mounts and the net/ipc/uts namespaces, `setpriv` drops to a
dedicated unprivileged uid with no capabilities, and an inner, unprivileged bwrap adds a user
namespace (with further user namespaces disabled) and a pid namespace whose PID 1 is the agent
(so the program cannot kill it). As an ordinary user, one unprivileged bwrap does all of it."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from workers.sandbox.config import SandboxLimits

_UID_BASE = 1_000_000_000


def unprivileged_uid(owner_pid: int, index: int) -> int:
    """A uid no account uses, distinct per owner process and sandbox (RLIMIT_NPROC counts per uid)."""
    return _UID_BASE + (owner_pid % 1_000_000) * 1000 + index % 1000


@functools.lru_cache(maxsize=8)
def python_prefixes(python: str) -> tuple[str, str]:
    """(prefix, base_prefix) of an interpreter: a venv needs both mounted."""
    out = subprocess.run([python, "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"],
                         capture_output=True, text=True, check=True, timeout=30).stdout.split("\n")
    return os.path.realpath(out[0]), os.path.realpath(out[1])


def _dirs_to(path: str, bound: tuple[str, ...]) -> list[str]:
    """bwrap args creating every missing ancestor of `path` world-traversable (bwrap makes 0700)."""
    args: list[str] = []
    parts = Path(path).parts[1:-1]
    for i in range(len(parts)):
        ancestor = "/" + "/".join(parts[: i + 1])
        if not any(ancestor == b or ancestor.startswith(b + "/") for b in bound):
            args += ["--perms", "0755", "--dir", ancestor]
    return args


class BwrapLayout:
    """Mounts: system dirs and the interpreter read-only; tmpfs work dir, /tmp and /dev/shm."""

    def __init__(self, python: str, limits: SandboxLimits, uid: int, venv_dest: str, oom_file: Path | None) -> None:
        self.limits = limits
        self.uid = uid
        self.prefix, self.base_prefix = python_prefixes(python)
        self.venv_dest = venv_dest if self.prefix != self.base_prefix else None
        bindir = f"{self.venv_dest}/bin" if self.venv_dest else str(Path(self.base_prefix) / "bin")
        self.python = f"{bindir}/{Path(python).name}"
        self.bindir = bindir
        self.oom_file = oom_file

    @staticmethod
    def setpriv(uid: int) -> list[str]:
        return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
                "--bounding-set=-all", "--inh-caps=-all"]

    def _system_mounts(self) -> list[str]:
        args = ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
        for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
            if os.path.islink(name):
                args += ["--symlink", os.readlink(name), name]
            elif os.path.isdir(name):
                args += ["--ro-bind", name, name]
        bound: tuple[str, ...] = ("/usr", "/etc")
        if not self.base_prefix.startswith("/usr/"):
            args += _dirs_to(self.base_prefix + "/x", bound) + ["--ro-bind", self.base_prefix, self.base_prefix]
        if self.venv_dest:
            args += _dirs_to(self.venv_dest, bound) + ["--ro-bind", self.prefix, self.venv_dest]
        if self.oom_file is not None:
            args += _dirs_to("/run/codeworld/cgroup", bound) + ["--ro-bind", str(self.oom_file.parent), "/run/codeworld/cgroup"]
        return args

    def _scratch_mounts(self) -> list[str]:
        mb = 1 << 20
        return ["--dev", "/dev",
                "--perms", "01777", "--size", str(self.limits.shm_mb * mb), "--tmpfs", "/dev/shm",
                "--perms", "01777", "--size", str(self.limits.tmp_mb * mb), "--tmpfs", "/tmp",
                "--perms", "0777", "--size", str(self.limits.work_mb * mb), "--tmpfs", "/work"]

    def argv(self) -> list[str]:
        """The command that starts the agent's interpreter (its own arguments follow)."""
        outer = ["bwrap", "--die-with-parent", "--new-session", "--unshare-net", "--unshare-ipc",
                 "--unshare-uts", *self._system_mounts(), *self._scratch_mounts()]
        inner = ["--unshare-user", "--disable-userns", "--unshare-pid", "--as-pid-1", "--die-with-parent"]
        if os.geteuid() == 0:
            # The outer pid namespace ties everything to the outer bwrap: when it dies with its
            # owner, the kernel kills the whole namespace (uid changes clear parent-death signals).
            return [*outer, "--unshare-pid", "--bind", "/proc", "/proc", *self.setpriv(self.uid), "bwrap", *inner,
                    "--dev-bind", "/", "/", "--proc", "/proc", "--chdir", "/work", "--", self.python]
        return [*outer, *inner, "--proc", "/proc", "--chdir", "/work", "--", self.python]

    def agent_config(self) -> dict:
        env = {"PATH": f"{self.bindir}:/usr/local/bin:/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/tmp",
               "LANG": "C.UTF-8"}
        oom = [f"/run/codeworld/cgroup/{self.oom_file.name}"] if self.oom_file is not None else []
        return {"work": "/work", "wipe": ["/work", "/tmp", "/dev/shm"], "env": env, "oom_files": oom,
                "kill_scope": "uid"}
