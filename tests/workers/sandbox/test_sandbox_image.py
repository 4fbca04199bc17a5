"""The offline image builder: a real debootstrap + docker import into a throwaway tag, and the
`--if-missing` fast path that `make test` takes when the image exists."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import docker

CLI = [sys.executable, "-m", "rl.cli"] if not Path(sys.executable).with_name("codeworld").exists() \
    else [str(Path(sys.executable).with_name("codeworld"))]


def test_build_image_from_debian_packages_and_skip_when_present() -> None:
    tag = f"codeworld-sandbox:buildtest-{os.getpid()}"
    client = docker.from_env()
    try:
        built = subprocess.run([*CLI, "sandbox", "build-image", "--tag", tag], capture_output=True, text=True,
                               timeout=600)
        assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
        assert "debootstrap" in built.stdout and "I: Base system installed successfully." in built.stdout
        assert f"{tag} ready (Python 3.11" in built.stdout
        out = client.containers.run(tag, ["sh", "-c", "id -u sandbox; stat -c %u /work; python3 -m pytest --version"],
                                    remove=True, network_mode="none").decode()
        assert out.splitlines()[:2] == ["1000", "1000"] and "pytest 7." in out
        started = time.monotonic()
        again = subprocess.run([*CLI, "sandbox", "build-image", "--tag", tag, "--if-missing"],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "is present" in again.stdout
        assert time.monotonic() - started < 10
    finally:
        try:
            client.images.remove(tag, force=True)
        except docker.errors.ImageNotFound:
            pass
        client.close()
