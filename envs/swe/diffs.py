"""Diffs on the host: reading them (`unidiff`, checked against `git apply`'s own reading),
writing them (`difflib`), applying them (`git apply` in a scratch folder), and keeping a model's
diff away from the trusted test files and from anything that runs code in the test process.

A path in a diff is an adversary's string. Every path is normalised the way `git apply` and the
file system resolve it (git's C-quoting undone, the `a/`/`b/` component stripped, empty and `.`
components collapsed) before any check, and a path that is not plainly inside the repository
(`..`, absolute, NUL or control characters, backslashes) is refused. `git apply --numstat` reads
the same diff and must name the same paths in the same order, or the diff is refused: a diff the
two parsers read differently cannot be checked.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from unidiff import PatchSet
from unidiff.errors import UnidiffParseError

# Files that run code inside the test process wherever they appear: pytest plugins and the
# configuration files pytest reads (`addopts = -p module` loads a plugin), interpreter start-up
# hooks, environment files that plugins export, and compiled modules (a .pyc or a native module
# beside a source file imports in its place). No diff may touch them, at any depth, in any case.
_HIJACK_NAMES = (
    "conftest.py",
    "sitecustomize.py",
    "usercustomize.py",
    "*.pth",
    "pytest.ini",
    ".pytest.ini",
    "pytest.toml",
    ".pytest.toml",
    "pyproject.toml",
    "tox.ini",
    "setup.cfg",
    ".env",
    "*.pyc",
    "*.pyo",
    "*.so",
    "*.pyd",
    "*.egg-link",
)
# Folders whose contents change what gets imported or run: git's own (hooks, config), bytecode
# caches, and package metadata (an entry point in a *.dist-info on sys.path is a pytest plugin).
_HIJACK_DIRS = (".git", "__pycache__", "*.dist-info", "*.egg-info")
_SPECIAL_MODE = re.compile(r"^(?:new file mode|new mode|old mode|deleted file mode|index \S+) (120000|160000)$", re.M)
_ESCAPES = {"a": 7, "b": 8, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13, '"': 34, "\\": 92}
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


class PatchError(ValueError):
    """A diff could not be parsed or applied; the message says which and why."""


@dataclass(frozen=True)
class FileChange:
    """One file's part of a diff, its paths as the file system will resolve them."""

    source: str | None
    """The path it reads (None: the diff creates the file)."""
    target: str | None
    """The path it writes (None: the diff deletes the file); differs from `source` on a rename."""
    special: str | None
    """Why it cannot be applied as text ("a symbolic link", "a submodule", "a binary file")."""
    text: str
    """This part of the diff, as written."""

    @property
    def paths(self) -> list[str]:
        """Every path the change touches."""
        return list(dict.fromkeys(p for p in (self.source, self.target) if p is not None))


def _unquote(raw: str) -> str:
    """A path as git reads it: `"b/t\\145st.py"` (git's C-quoting) is `b/test.py`."""
    if not (len(raw) >= 2 and raw[0] == raw[-1] == '"'):
        return raw
    body, out, i = raw[1:-1], bytearray(), 0
    while i < len(body):
        if body[i] != "\\":
            out += body[i].encode()
            i += 1
        elif body[i + 1 : i + 2] in _ESCAPES:
            out.append(_ESCAPES[body[i + 1]])
            i += 2
        elif re.fullmatch(r"[0-3][0-7]{2}", body[i + 1 : i + 4]):
            out.append(int(body[i + 1 : i + 4], 8))
            i += 4
        else:
            raise PatchError(f"The diff names a path with a bad escape: {raw[:80]!r}.")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise PatchError(f"The diff names a path that is not UTF-8: {raw[:80]!r}.") from None


def normalize_path(path: str, strip: bool = False) -> str:
    """`path` as the file system resolves it inside the repository: with `strip`, the first
    component (`a/`, `b/`, or any other, as `git apply -p1` does) dropped; empty and `.`
    components collapsed. PatchError when it is not plainly inside the repository."""
    raw = _unquote(path)
    rest = raw
    if strip and "/" in raw:
        rest = raw.split("/", 1)[1]
    parts = [p for p in rest.split("/") if p not in ("", ".")]
    if rest.startswith("/") or not parts or ".." in parts or _CONTROL.search(rest):
        raise PatchError(f"The diff touches {raw[:200]!r}, which is outside the repository or not a plain path.")
    return "/".join(parts)


def _special(patched) -> str | None:
    mode = _SPECIAL_MODE.search(str(patched.patch_info or ""))
    if mode:
        return "a symbolic link" if mode.group(1) == "120000" else "a submodule"
    return "a binary file" if patched.is_binary_file else None


def _parse(diff: str) -> PatchSet:
    try:
        return PatchSet(diff)
    except UnidiffParseError as err:
        raise PatchError(f"The diff is not a valid unified diff: {err}.") from None


def parse_diff(diff: str) -> PatchSet:
    """The diff as a `unidiff.PatchSet`, or PatchError saying why it is not a unified diff."""
    return _parse(diff)


@functools.lru_cache(maxsize=256)
def _git_paths(diff: str) -> tuple[str, ...]:
    """The path of every file part of `diff` as `git apply` reads it (the new path; the old
    one for a deletion), in order."""
    with tempfile.TemporaryDirectory(prefix="codeworld-numstat-") as tmp:
        env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(Path(tmp).parent)}
        proc = subprocess.run(
            ["git", "apply", "--numstat", "-z", "-"], cwd=tmp, input=diff.encode(), capture_output=True, env=env
        )
    if proc.returncode != 0:
        reason = proc.stderr.decode(errors="replace").strip().splitlines()
        raise PatchError(f"The diff is not a valid patch: {reason[0] if reason else 'git apply failed'}.")
    fields = proc.stdout.split(b"\0")[:-1]
    try:
        return tuple(f.split(b"\t", 2)[2].decode("utf-8") for f in fields)
    except (IndexError, UnicodeDecodeError):
        raise PatchError("The diff names paths git cannot report.") from None


@functools.lru_cache(maxsize=256)
def _changes(diff: str) -> tuple[FileChange, ...]:
    changes = []
    for patched in _parse(diff):
        source = None if patched.is_added_file else normalize_path(patched.source_file, strip=True)
        target = None if patched.is_removed_file else normalize_path(patched.target_file, strip=True)
        if source is None and target is None:
            raise PatchError("The diff has a part that neither reads nor writes a file.")
        changes.append(FileChange(source, target, _special(patched), str(patched)))
    theirs = [normalize_path(p) for p in _git_paths(diff)]
    ours = [c.target if c.target is not None else c.source for c in changes]
    if theirs != ours:
        raise PatchError(
            f"The diff's file headers are ambiguous: git reads its paths as {theirs[:5]}, the grader as {ours[:5]}."
        )
    return tuple(changes)


def file_changes(diff: str) -> list[FileChange]:
    """The file parts of `diff` with normalised paths; PatchError for a diff that is not a valid
    patch, names a path outside the repository, or that git reads differently."""
    return list(_changes(diff)) if diff.strip() else []


def touched_paths(diff: str) -> tuple[list[str], list[str]]:
    """(paths the diff reads from the base, paths it writes), repository-relative, normalised."""
    changes = file_changes(diff)
    return ([c.source for c in changes if c.source is not None], [c.target for c in changes if c.target is not None])


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name.casefold(), pat) for pat in patterns)


def is_protected(path: str, trusted: set[str]) -> bool:
    """Whether a diff may not touch `path` (normalised): a trusted test file of the task, a
    folder on the way to one (a file there would block it) or a path below one, or a file that
    would run code inside the test process. Compared case-insensitively: a case variant is
    refused too, whatever the file system."""
    folded = path.casefold()
    parts = folded.split("/")
    for t in trusted:
        t = t.casefold()
        if folded == t or t.startswith(folded + "/") or folded.startswith(t + "/"):
            return True
    return _matches(parts[-1], _HIJACK_NAMES) or any(_matches(p, _HIJACK_DIRS) for p in parts[:-1])


def normalize_trusted(paths: set[str] | list[str]) -> set[str]:
    """Trusted paths (from a task) in the normalised form the checks compare against."""
    return {normalize_path(p) for p in paths}


def _keep(diff: str, drop: Callable[[FileChange], bool]) -> tuple[str, list[str]]:
    kept, dropped = [], []
    for change in file_changes(diff):
        if drop(change):
            dropped.extend(change.paths)
        else:
            kept.append(change.text)
    return "".join(kept), dropped


def drop_protected(diff: str, trusted: set[str]) -> tuple[str, list[str]]:
    """The diff without its changes to protected paths (see `is_protected`) and without parts
    that are not plain text files (symbolic links, submodules, binary patches: what they do
    cannot be checked here), and the paths of the parts it dropped. PatchError for a diff that
    cannot be read safely."""
    safe = normalize_trusted(trusted)
    return _keep(diff, lambda c: c.special is not None or any(is_protected(p, safe) for p in c.paths))


def module_name(path: str) -> tuple[str, str] | None:
    """(the import name, the folder that must be a package for it not to be top-level) of a
    Python source file, or None when the file is not importable as written."""
    p = PurePosixPath(path)
    if p.suffix != ".py":
        return None
    if p.name == "__init__.py":
        if str(p.parent) == ".":
            return None
        return p.parent.name, str(p.parent.parent)
    return p.stem, str(p.parent)


def _init_of(folder: str) -> str:
    return "__init__.py" if folder == "." else f"{folder}/__init__.py"


def _new_modules(changes: list[FileChange]) -> list[tuple[str, str, str]]:
    """(path, import name, folder that must be a package) of each Python file the diff creates."""
    found = []
    for change in changes:
        if change.target is not None and change.target != change.source:
            named = module_name(change.target)
            if named is not None:
                found.append((change.target, *named))
    return found


def package_inits(diff: str) -> list[str]:
    """The `__init__.py` files whose presence before the diff decides which of the modules it
    creates are top-level (see `shadowing_paths`)."""
    return sorted({_init_of(folder) for _, _, folder in _new_modules(file_changes(diff))})


def shadowing_paths(diff: str, importable: set[str], base_inits: set[str]) -> list[str]:
    """Files the diff creates that would import in place of an installed or standard module: a
    module or package named like one of `importable`, in a folder that is not a package (no
    `__init__.py` in `base_inits`, the ones present before the diff, once the diff's own
    additions and deletions are counted), so that it is top-level wherever that folder is on
    sys.path (the repository root, a PYTHONPATH folder, a test's folder under pytest's default
    import mode). `pytest/__init__.py` or `tests/json.py` would be one."""
    changes = file_changes(diff)
    written = {c.target for c in changes if c.target is not None}
    removed = {c.source for c in changes if c.source is not None and c.source not in written}
    inits = (base_inits - removed) | written
    return [
        path for path, name, folder in _new_modules(changes) if name in importable and _init_of(folder) not in inits
    ]


def drop_paths(diff: str, paths: set[str]) -> str:
    """The diff without the parts that touch any of `paths`."""
    return _keep(diff, lambda c: bool(set(c.paths) & paths))[0]


def safe_diff_path(path: str) -> bool:
    """Whether a file found in a repository can be written into a diff that reads back the same
    (no quoting needed, no surrounding white space in any component)."""
    try:
        plain = normalize_path(path) == path
    except PatchError:
        return False
    return plain and '"' not in path and all(part == part.strip() for part in path.split("/"))


def file_diff(path: str, old: bytes | None, new: bytes | None) -> str:
    """A git-style unified diff of one file (None = the file does not exist on that side)."""
    old_lines = (old or b"").decode("utf-8", "replace").splitlines(keepends=True)
    new_lines = (new or b"").decode("utf-8", "replace").splitlines(keepends=True)
    header = f"diff --git a/{path} b/{path}\n"
    if old is None:
        header += "new file mode 100644\n"
    elif new is None:
        header += "deleted file mode 100644\n"
    body = difflib.unified_diff(
        old_lines, new_lines, "/dev/null" if old is None else f"a/{path}", "/dev/null" if new is None else f"b/{path}"
    )
    # A last line without a newline must be marked, or `git apply` reads the next header into it.
    text = "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in body)
    if not text and (old is None) != (new is None):
        return header  # an empty file created or deleted: the header alone says so
    return header + text if text else ""


def tree_diff(old: dict[str, bytes], new: dict[str, bytes]) -> str:
    """A git-style diff that turns the files `old` into the files `new` (path → content)."""
    return "".join(
        file_diff(p, old.get(p), new.get(p)) for p in sorted(old.keys() | new.keys()) if old.get(p) != new.get(p)
    )


def apply_diff(files: dict[str, bytes], diff: str, reverse: bool = False) -> dict[str, bytes | None]:
    """Apply `diff` with `git apply` to `files` (the base content of every path it reads) and
    return the content of every path it touched (None = deleted). Raises PatchError."""
    if not diff.strip():
        return {}
    changes = file_changes(diff)
    special = next((c for c in changes if c.special), None)
    if special is not None:
        raise PatchError(f"The diff makes {special.paths[0]!r} {special.special}, which is not supported.")
    reads, writes = touched_paths(diff)
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


_HUNK = re.compile(r"^@@ -(\d+(?:,\d+)?) \+(\d+(?:,\d+)?) @@(.*)$")
_SWAPPED_HEADERS = {"new file mode ": "deleted file mode ", "deleted file mode ": "new file mode "}


def reverse_diff(diff: str) -> str:
    """The diff that undoes `diff` (what `git apply --reverse` applies), written out: e.g. the fix
    of a SWE-smith task, whose published patch is the bug. PatchError for a part that cannot be
    undone as text (a copy, a binary part)."""
    file_changes(diff)  # refuses what is not a plain, readable patch
    out, lines, i = [], diff.splitlines(keepends=True), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("diff --git "):
            old, new = _git_header_paths(line)
            out.append(f"diff --git {new.replace('b/', 'a/', 1)} {old.replace('a/', 'b/', 1)}\n")
        elif line.startswith(("copy from ", "copy to ", "GIT binary patch", "Binary files ")):
            raise PatchError("The diff copies a file or has a binary part; it cannot be reversed as text.")
        elif line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            old, new = line[4:].rstrip("\n"), lines[i + 1][4:].rstrip("\n")
            out += [f"--- {_side(new, 'a/')}\n", f"+++ {_side(old, 'b/')}\n"]
            i += 1
        elif line.startswith(("old mode ", "rename from ")) and i + 1 < len(lines):
            old_mode = line.startswith("old")
            key_old, key_new = ("old mode ", "new mode ") if old_mode else ("rename from ", "rename to ")
            out += [key_old + lines[i + 1][len(key_new) :], key_new + line[len(key_old) :]]
            i += 1
        elif line.startswith(tuple(_SWAPPED_HEADERS)):
            head = next(h for h in _SWAPPED_HEADERS if line.startswith(h))
            out.append(_SWAPPED_HEADERS[head] + line[len(head) :])
        elif line.startswith("index ") and ".." in line:
            ids, _, mode = line[6:].rstrip("\n").partition(" ")
            before, after = ids.split("..", 1)
            out.append(f"index {after}..{before}{' ' + mode if mode else ''}\n")
        elif (hunk := _HUNK.match(line.rstrip("\n"))) is not None:
            out.append(f"@@ -{hunk.group(2)} +{hunk.group(1)} @@{hunk.group(3)}\n")
        elif line[:1] in "+-" and not line.startswith(("+++ ", "--- ")):
            out.append(("-" if line[0] == "+" else "+") + line[1:])
        else:
            out.append(line)
        i += 1
    return "".join(out)


def _git_header_paths(line: str) -> tuple[str, str]:
    rest = line[len("diff --git ") :].rstrip("\n")
    half = len(rest) // 2  # "a/X b/X": the paths are equal but for their prefixes (no rename here)
    if rest[half : half + 1] == " " and rest[:half][2:] == rest[half + 1 :][2:]:
        return rest[:half], rest[half + 1 :]
    old, sep, new = rest.partition(" b/")
    if not sep:
        raise PatchError(f"The diff header {line.strip()[:200]!r} cannot be reversed.")
    return old, "b/" + new


def _side(path: str, prefix: str) -> str:
    return path if path == "/dev/null" else prefix + path[2:]
