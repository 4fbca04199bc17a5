"""PyPI source distributions and dependency bundles, downloaded once into a cache folder with
pip's own client, and read into memory as `{relative path: bytes}` trees."""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

_SPEC = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)$")


def parse_spec(spec: str) -> tuple[str, str]:
    """`NAME==VERSION` split in two, or ValueError naming the spec."""
    match = _SPEC.match(spec.strip())
    if match is None:
        raise ValueError(f"Package {spec!r} must be given as NAME==VERSION (e.g. toolz==1.2.0).")
    return match.group(1), match.group(2)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def fetch_sdist(spec: str, cache: Path) -> Path:
    """The sdist of `spec` (NAME==VERSION), downloaded with `pip download --no-binary :all:`
    into `cache/sdists` unless already there."""
    name, version = parse_spec(spec)
    folder = cache / "sdists"
    folder.mkdir(parents=True, exist_ok=True)
    # Sdist names vary (`python-slugify` ships `python_slugify-9.2.0.tar.gz`): compare normalised.
    wanted = _normalise(f"{name}-{version}")
    for found in sorted(folder.glob("*.tar.gz")):
        if _normalise(found.name.removesuffix(".tar.gz")) == wanted:
            return found
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--dest",
            tmp,
            f"{name}=={version}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not got:
            why = (proc.stderr.strip().splitlines() or ["no .tar.gz sdist was published"])[-1]
            raise RuntimeError(f"Could not download the sdist of {spec}: {why}")
        return got[0].rename(folder / got[0].name)


def fetch_deps(requirements: list[str], cache: Path) -> Path:
    """A .tar.gz of `requirements` installed with `pip install --target` (wheels only, for the
    host's Python, which matches the sandbox image's), cached by the requirement list."""
    key = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:16]
    out = cache / "deps" / f"deps-{key}.tar.gz"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--only-binary",
            ":all:",
            "--target",
            tmp,
            *requirements,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise RuntimeError(f"Could not install the dependencies {' '.join(requirements)}: {why}")
        partial = out.with_suffix(".partial")
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(tmp, arcname=".")
        partial.rename(out)
    return out


def read_tree(tarball: Path, prefix: str = "") -> dict[str, bytes]:
    """The regular files of `tarball` under `prefix`, by path relative to `prefix`."""
    tree: dict[str, bytes] = {}
    lead = prefix.strip("/") + "/" if prefix.strip("/") else ""
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if member.isfile() and name.startswith(lead):
                data = tar.extractfile(member)
                if data is not None:
                    tree[name[len(lead) :]] = data.read()
    if not tree:
        raise ValueError(f"Tarball {str(tarball)!r} has no files under {prefix!r}.")
    return tree


def executable_paths(tarball: Path, prefix: str = "") -> set[str]:
    """The regular files of `tarball` under `prefix` that are executable (scripts such as
    Django's `tests/runtests.py`), by path relative to `prefix`."""
    lead = prefix.strip("/") + "/" if prefix.strip("/") else ""
    with tarfile.open(tarball, "r:gz") as tar:
        return {
            m.name.removeprefix("./")[len(lead) :]
            for m in tar
            if m.isfile() and m.mode & 0o111 and m.name.removeprefix("./").startswith(lead)
        }


def sdist_prefix(tarball: Path) -> str:
    """The single top folder of an sdist (e.g. `toolz-1.2.0`)."""
    with tarfile.open(tarball, "r:gz") as tar:
        tops = {m.name.removeprefix("./").split("/", 1)[0] for m in tar.getmembers()}
    if len(tops) != 1:
        raise ValueError(f"Sdist {str(tarball)!r} does not have exactly one top folder.")
    return tops.pop()


def tree_tarball(tree: dict[str, bytes]) -> bytes:
    """A .tar.gz (in memory) of a `{path: bytes}` tree, for sending a whole tree at once."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, data in sorted(tree.items()):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
