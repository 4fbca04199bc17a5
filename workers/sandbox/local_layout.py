"""The bubblewrap command line of a local sandbox.

As root, one bwrap sets up the mounts and the net/ipc/uts/pid namespaces and starts the agent as
PID 1 of its pid namespace, root with only the capabilities SETUID, SETGID and KILL; programs run as
a dedicated unprivileged uid with none (see agent.py), so they can never signal or limit the agent
or its launcher. As an ordinary user, one unprivileged bwrap adds a user namespace (further user
namespaces disabled) in which the agent and the programs share the one uid that namespace maps;
RLIMIT_NPROC, counted per user namespace, is then the pids cap."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from workers.sandbox.config import SandboxLimits

_UID_BASE = 1_000_000_000
LAUNCHER_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_KILL")
"""What the agent and its launcher keep as root: becoming the programs' uid and killing them."""


def unprivileged_uid(owner_pid: int, index: int) -> int:
    """A uid no account uses, distinct per owner process and sandbox (RLIMIT_NPROC counts per uid)."""
    return _UID_BASE + (owner_pid % 1_000_000) * 1000 + index % 1000


def launcher_privileges() -> list[str]:
    """setpriv arguments that leave a root process only the launcher's capabilities (the local
    backend without bubblewrap, where the agent runs on the host itself)."""
    keep = ",".join("+" + cap.removeprefix("CAP_").lower() for cap in LAUNCHER_CAPS)
    return ["setpriv", f"--bounding-set=-all,{keep}", "--inh-caps=-all", "--no-new-privs"]


@functools.lru_cache(maxsize=8)
def python_prefixes(python: str) -> tuple[str, str]:
    """(prefix, base_prefix) of an interpreter: a venv needs both mounted."""
    out = subprocess.run(
        [python, "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split("\n")
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
            args += _dirs_to("/run/codeworld/cgroup", bound)
            args += ["--ro-bind", str(self.oom_file.parent), "/run/codeworld/cgroup"]
        return args

    def _scratch_mounts(self) -> list[str]:
        mb = 1 << 20
        return [
            "--dev",
            "/dev",
            "--perms",
            "01777",
            "--size",
            str(self.limits.shm_mb * mb),
            "--tmpfs",
            "/dev/shm",
            "--perms",
            "01777",
            "--size",
            str(self.limits.tmp_mb * mb),
            "--tmpfs",
            "/tmp",
            "--perms",
            "0777",
            "--size",
            str(self.limits.work_mb * mb),
            "--tmpfs",
            "/work",
        ]

    def argv(self) -> list[str]:
        """The command that starts the agent's interpreter (its own arguments follow)."""
        common = [
            "bwrap",
            "--die-with-parent",
            "--new-session",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-pid",
            *self._system_mounts(),
            *self._scratch_mounts(),
            "--proc",
            "/proc",
            "--chdir",
            "/",
        ]
        if os.geteuid() == 0:
            # bwrap's own init is PID 1: the agent's change of file-system uid clears its
            # parent-death signal, but the init keeps it, and the whole namespace dies with it.
            caps = [arg for cap in LAUNCHER_CAPS for arg in ("--cap-add", cap)]
            return [*common, "--cap-drop", "ALL", *caps, "--", self.python]
        # One shared uid: the agent itself is PID 1, which no program in the namespace can kill.
        return [*common, "--unshare-user", "--disable-userns", "--as-pid-1", "--", self.python]

    def agent_config(self) -> dict:
        env = {
            "PATH": f"{self.bindir}:/usr/local/bin:/usr/bin:/bin",
            "HOME": "/work",
            "TMPDIR": "/tmp",
            "LANG": "C.UTF-8",
        }
        oom = [f"/run/codeworld/cgroup/{self.oom_file.name}"] if self.oom_file is not None else []
        config = {"work": "/work", "wipe": ["/work", "/tmp", "/dev/shm"], "env": env, "oom_files": oom}
        if os.geteuid() == 0:
            config["program_uid"] = self.uid
        return config
