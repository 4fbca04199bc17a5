"""Files in and out of a sandbox travel as tar streams of regular files with validated paths."""

from __future__ import annotations

import io
import tarfile

from workers.sandbox.models import validate_relative_path


def pack_files(files: dict[str, bytes]) -> bytes:
    """A tar of regular files; empty bytes when there is nothing to send (the agent skips it)."""
    if not files:
        return b""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(validate_relative_path(path))
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def unpack_files(blob: bytes) -> dict[str, bytes]:
    """Reads an agent's tar back; anything but a regular file at a safe path is an error."""
    files: dict[str, bytes] = {}
    if not blob:
        return files
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                raise ValueError(f"the sandbox returned {member.name!r}, which is not a regular file.")
            reader = tar.extractfile(member)
            files[validate_relative_path(member.name)] = reader.read() if reader else b""
    return files
