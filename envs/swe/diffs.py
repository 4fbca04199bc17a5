"""Diffs on the host: reading them (`unidiff`), writing them (`difflib`), applying them (`git
apply` in a scratch folder), and keeping a model's diff away from the trusted test files."""

from __future__ import annotations

import difflib
import fnmatch
import os
import subprocess
import tempfile
from pathlib import Path, PurePosixPath

from unidiff import PatchSet
from unidiff.errors import UnidiffParseError

# Files that run code inside the test process wherever they appear (pytest plugins, interpreter
# start-up hooks): a diff could add one to rewrite test outcomes, so no diff may touch them.
_HIJACK_NAMES = ("conftest.py", "sitecustomize.py", "usercustomize.py", "*.pth")


class PatchError(ValueError):
    """A diff could not be parsed or applied; the message says which and why."""


def _strip_prefix(path: str) -> str:
    return path[2:] if path.startswith(("a/", "b/")) else path


def touched_paths(diff: str) -> tuple[list[str], list[str]]:
    """(paths the diff reads from the base, paths it writes), repository-relative."""
    reads, writes = [], []
    for patched in parse_diff(diff):
        if not patched.is_added_file:
            reads.append(_strip_prefix(patched.source_file))
        if not patched.is_removed_file:
            writes.append(_strip_prefix(patched.target_file))
    return reads, writes


def parse_diff(diff: str) -> PatchSet:
    """The diff as a `unidiff.PatchSet`, or PatchError saying why it is not a unified diff."""
    try:
        return PatchSet(diff)
    except UnidiffParseError as err:
        raise PatchError(f"The diff is not a valid unified diff: {err}.") from None


def is_protected(path: str, trusted: set[str]) -> bool:
    """Whether a diff may not touch `path`: a trusted test file of the task, or a file that would
    run code inside the test process."""
    name = PurePosixPath(path).name
    return path in trusted or any(fnmatch.fnmatch(name, pat) for pat in _HIJACK_NAMES)


def drop_protected(diff: str, trusted: set[str]) -> tuple[str, list[str]]:
    """The diff without its changes to protected paths (see `is_protected`), and the repository
    paths whose changes were dropped."""
    kept, dropped = [], []
    for patched in parse_diff(diff):
        paths = {_strip_prefix(patched.source_file), _strip_prefix(patched.target_file)} - {"/dev/null"}
        if any(is_protected(p, trusted) for p in paths):
            dropped.extend(sorted(paths))
        else:
            kept.append(str(patched))
    return "".join(kept), dropped


def file_diff(path: str, old: bytes | None, new: bytes | None) -> str:
    """A git-style unified diff of one file (None = the file does not exist on that side)."""
    old_lines = (old or b"").decode("utf-8", "replace").splitlines(keepends=True)
    new_lines = (new or b"").decode("utf-8", "replace").splitlines(keepends=True)
    header = f"diff --git a/{path} b/{path}\n"
    if old is None:
        header += "new file mode 100644\n"
    elif new is None:
        header += "deleted file mode 100644\n"
    body = difflib.unified_diff(old_lines, new_lines, "/dev/null" if old is None else f"a/{path}",
                                "/dev/null" if new is None else f"b/{path}")
    # A last line without a newline must be marked, or `git apply` reads the next header into it.
    text = "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in body)
    return header + text if text else ""


def tree_diff(old: dict[str, bytes], new: dict[str, bytes]) -> str:
    """A git-style diff that turns the files `old` into the files `new` (path → content)."""
    return "".join(file_diff(p, old.get(p), new.get(p)) for p in sorted(old.keys() | new.keys())
                   if old.get(p) != new.get(p))


def apply_diff(files: dict[str, bytes], diff: str, reverse: bool = False) -> dict[str, bytes | None]:
    """Apply `diff` with `git apply` to `files` (the base content of every path it reads) and
    return the content of every path it touched (None = deleted). Raises PatchError."""
    if not diff.strip():
        return {}
    reads, writes = touched_paths(diff)
    for path in reads + writes:
        _check_inside(path)
    missing = [p for p in reads if p not in files]
    if missing:
        raise PatchError(f"The diff changes {missing[0]!r}, which is not in the repository.")
    with tempfile.TemporaryDirectory(prefix="codeworld-apply-") as tmp:
        root = Path(tmp)
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        cmd = ["git", "apply", "--whitespace=nowarn", *(["--reverse"] if reverse else []), "-"]
        # GIT_CEILING_DIRECTORIES: never let git find an enclosing repository and apply there.
        env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(root.parent)}
        proc = subprocess.run(cmd, cwd=root, input=diff.encode(), capture_output=True, env=env)
        if proc.returncode != 0:
            reason = proc.stderr.decode(errors="replace").strip().splitlines()
            raise PatchError(f"The diff does not apply: {reason[0] if reason else 'git apply failed'}.")
        touched = list(dict.fromkeys(reads + writes))
        if any((root / p).is_symlink() for p in touched):
            # Reading through a link would read the host's files, not the repository's.
            raise PatchError("The diff creates a symbolic link, which is not supported.")
        return {p: (root / p).read_bytes() if (root / p).is_file() else None for p in touched}


def _check_inside(path: str) -> None:
    """PatchError unless `path` is a plain relative path inside the repository: the files are
    written on the host, where `../` would escape the scratch folder."""
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or ".." in parts or "\0" in path:
        raise PatchError(f"The diff touches {path!r}, which is outside the repository.")
