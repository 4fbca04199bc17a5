"""The sandbox image as the offline builder makes it (`make test` runs `codeworld sandbox
build-image --if-missing` first, so a fresh machine builds it with debootstrap + docker import
before this runs), and the `--if-missing` fast path."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import docker

from workers.sandbox import DEFAULT_IMAGE
from workers.sandbox.image import IMAGE_LABEL, check_image

CLI = str(Path(sys.executable).with_name("codeworld"))


def test_default_image_comes_from_the_builder_with_python_and_pytest() -> None:
    client = docker.from_env()
    try:
        image = client.images.get(DEFAULT_IMAGE)
        assert image.labels.get(IMAGE_LABEL) == "1"  # set by build-image (and the Dockerfile) only
        assert image.attrs["Config"]["WorkingDir"] == "/work"
        probe = "id -u sandbox; stat -c %u /work; python3 -m pytest --version"
        out = client.containers.run(DEFAULT_IMAGE, ["sh", "-c", probe], remove=True, network_mode="none").decode()
    finally:
        client.close()
    lines = out.splitlines()
    assert lines[:2] == ["1000", "1000"] and lines[2].startswith("pytest 7."), out
    said: list[str] = []
    check_image(DEFAULT_IMAGE, echo=said.append)
    assert said and said[0].startswith(f"codeworld: {DEFAULT_IMAGE} ready (Python 3.11")


def test_build_image_if_missing_is_fast_when_present() -> None:
    started = time.monotonic()
    again = subprocess.run([CLI, "sandbox", "build-image", "--if-missing"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.strip() == f"codeworld: sandbox image {DEFAULT_IMAGE} is present."
    assert time.monotonic() - started < 10
