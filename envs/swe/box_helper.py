"""Runs inside the sandbox (stdlib only, passed as `python3 -I -c`: isolated mode, so that nothing
in the repository or the working folder, such as a planted `json.py`, and no PYTHON* variable
shadows its imports). File transfer works on any path (an image's /testbed as well as the
sandbox work dir) and needs nothing but python3:

* `snapshot REPO SNAP` copies the repository at the start of an episode;
* `changed REPO SNAP` prints, as JSON, both versions of every file changed since (base64), so
  that the host writes the diff;
* `read REPO PATH...` prints `{path: base64 | null}` (null = no such readable regular file);
* `write REPO` reads `{path: base64 | null}` on stdin, writes (null = deletes) the files and
  prints `{"errors": {path: why}}` for those it could not write.

The tree may be the policy's: a path that cannot be read or written is reported per path, never
a crash, and no write goes through a symbolic link. The host validates every report."""

import base64
import json
import os
import shutil
import sys

# Caches and build output are not part of a solution, and a .git folder is not compared (the
# diff is computed against the snapshot, never against git).
IGNORED = {".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".tox", ".hypothesis", ".eggs"}
MAX_FILE_BYTES = 1 << 20
MAX_TOTAL_BYTES = 8 << 20


def ignored(name):
    return name in IGNORED or name.endswith((".pyc", ".pyo", ".egg-info"))


def files(root):
    found = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not ignored(d)]
        for name in names:
            path = os.path.join(folder, name)
            if not ignored(name) and os.path.isfile(path) and not os.path.islink(path):
                found[os.path.relpath(path, root)] = path
    return found


def read(path):
    with open(path, "rb") as f:
        return f.read(MAX_FILE_BYTES + 1)


def snapshot(repo, snap):
    shutil.rmtree(snap, ignore_errors=True)
    shutil.copytree(repo, snap, symlinks=True, ignore=lambda _d, names: [n for n in names if ignored(n)])


def changed(repo, snap):
    now, then = files(repo), files(snap)
    out = {"files": {}, "skipped": []}
    total = 0
    for rel in sorted(now.keys() | then.keys()):
        try:
            new = read(now[rel]) if rel in now else None
            old = read(then[rel]) if rel in then else None
        except OSError:
            out["skipped"].append(rel)
            continue
        if new == old:
            continue
        sizes = [len(x) for x in (new, old) if x is not None]
        binary = any(b"\0" in x for x in (new, old) if x is not None)
        if binary or max(sizes) > MAX_FILE_BYTES or total + sum(sizes) > MAX_TOTAL_BYTES:
            out["skipped"].append(rel)
            continue
        total += sum(sizes)
        out["files"][rel] = [None if x is None else base64.b64encode(x).decode() for x in (old, new)]
    json.dump(out, sys.stdout)


def read_files(repo, *paths):
    out = {}
    for rel in paths:
        path = os.path.join(repo, rel)
        out[rel] = None
        if os.path.isfile(path):  # checked first: opening a FIFO would block
            try:
                with open(path, "rb") as f:
                    out[rel] = base64.b64encode(f.read()).decode()
            except OSError:
                pass
    json.dump(out, sys.stdout)


def through_link(repo, rel, path):
    """Whether writing `path` would follow a symbolic link (the file itself, or a folder on the
    way from the repository to it)."""
    if os.path.islink(path):
        return True
    base = os.path.realpath(repo) if not os.path.isabs(rel) else "/"
    parent = os.path.dirname(os.path.normpath(os.path.join(base, rel)))
    return os.path.lexists(parent) and os.path.realpath(parent) != parent


def write_one(repo, rel, data):
    path = os.path.join(repo, rel)
    if through_link(repo, rel, path):
        raise OSError(f"{rel} is or lies under a symbolic link")
    if data is None:
        if os.path.lexists(path):
            os.remove(path)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(base64.b64decode(data))


def write_files(repo):
    errors = {}
    for rel, data in json.load(sys.stdin).items():
        try:
            write_one(repo, rel, data)
        except (OSError, ValueError) as exc:
            errors[rel] = f"{type(exc).__name__}: {exc}"[:300]
    json.dump({"errors": errors}, sys.stdout)


if __name__ == "__main__":
    ops = {"snapshot": snapshot, "changed": changed, "read": read_files, "write": write_files}
    ops[sys.argv[1]](*sys.argv[2:])
