"""The offline image builder: a Debian root file system from Debian's own packages (debootstrap),
imported into Docker. Needs no image registry, only a reachable Debian package mirror."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import docker
import docker.errors

from workers.sandbox.config import SandboxLimits

PACKAGES = ("python3", "python3-pytest")
"""Debian packages installed on top of minbase: Python 3.11 and pytest (bookworm's versions)."""
IMAGE_LABEL = "codeworld.sandbox.image"


def image_exists(tag: str) -> bool:
    try:
        docker.from_env().images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def _check_tools() -> None:
    if os.geteuid() != 0:
        raise PermissionError("building the sandbox image runs debootstrap, which needs root; run it with sudo.")
    if shutil.which("debootstrap") is None:
        raise FileNotFoundError("debootstrap is not installed; install the 'debootstrap' package.")


def _run_streaming(argv: list[str], echo: Callable[[str], None]) -> None:
    """Runs a command, passing each output line to `echo` so a long build shows progress."""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            echo(line.rstrip())
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed with exit status {proc.returncode}; see the lines above.")


def _finish_rootfs(rootfs: Path, uid: int) -> None:
    """Adds the sandbox user (so tools that look the uid up work), the work dir, and drops caches."""
    with open(rootfs / "etc/passwd", "a") as f:
        f.write(f"sandbox:x:{uid}:{uid}:sandbox:/work:/bin/sh\n")
    with open(rootfs / "etc/group", "a") as f:
        f.write(f"sandbox:x:{uid}:\n")
    (rootfs / "work").mkdir(exist_ok=True)
    os.chown(rootfs / "work", uid, uid)
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / cache).glob("*"):
            if entry.is_file():
                entry.unlink()


def build_image(
    tag: str, suite: str = "bookworm", mirror: str | None = None, echo: Callable[[str], None] = print
) -> None:
    """Builds `tag` from scratch (about a minute): debootstrap, then `docker import`."""
    _check_tools()
    client = docker.from_env()
    uid = SandboxLimits().workload_uid
    with tempfile.TemporaryDirectory(prefix="codeworld-rootfs-") as tmp:
        rootfs, archive = Path(tmp) / "rootfs", Path(tmp) / "rootfs.tar"
        echo(f"codeworld: debootstrap {suite} with {', '.join(PACKAGES)} ...")
        argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", suite, str(rootfs)]
        _run_streaming(argv + ([mirror] if mirror else []), echo)
        _finish_rootfs(rootfs, uid)
        echo("codeworld: packing the root file system ...")
        _run_streaming(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(archive), "."], echo)
        echo(f"codeworld: importing it into Docker as {tag} ...")
        repository, _, version = tag.partition(":")
        client.api.import_image_from_file(
            str(archive),
            repository=repository,
            tag=version or "latest",
            changes=[
                "ENV LANG=C.UTF-8",
                "ENV PATH=/usr/local/bin:/usr/bin:/bin",
                "WORKDIR /work",
                f"LABEL {IMAGE_LABEL}=1",
                'CMD ["python3"]',
            ],
        )
    check_image(tag, echo)


def check_image(tag: str, echo: Callable[[str], None] = print) -> None:
    """Proves the image runs Python 3.11 and pytest, with the network off."""
    out = docker.from_env().containers.run(
        tag,
        ["python3", "-c", "import sys, pytest; print(sys.version.split()[0], pytest.__version__)"],
        remove=True,
        network_mode="none",
    )
    python, pytest = out.decode().split()
    if not python.startswith("3.11"):
        raise RuntimeError(f"sandbox image {tag} has Python {python}, not 3.11.")
    echo(f"codeworld: {tag} ready (Python {python}, pytest {pytest}).")
