"""Bug injection and diff handling on the host: each mutation kind, one-line changes, exact
round trips through `git apply`, and protected files dropped from a model's diff."""

import ast

import pytest

from envs.swe.build.mutate import mutations, sample_mutations
from envs.swe.diffs import PatchError, apply_diff, drop_protected, file_diff, touched_paths, tree_diff

SOURCE = '''"""Module docstring."""


def clamp(x, lo, hi):  # keep me
    if x < lo:
        return lo
    if not (x <= hi):
        return hi
    return x


def window(seq, n):
    return [seq[i : i + n] for i in range(len(seq) - n + 1)]


def ratio(a, b):
    return a / b if a and b else 0
'''


def _by_kind():
    found = {}
    for m in mutations("pkg/mod.py", SOURCE):
        found.setdefault(m.kind, []).append(m)
    return found


def test_every_kind_is_produced_and_changes_exactly_one_line():
    found = _by_kind()
    assert set(found) == {
        "flip_comparison",
        "off_by_one",
        "swap_operands",
        "drop_return",
        "negate_condition",
        "swap_boolop",
    }
    for group in found.values():
        for m in group:
            changed = [i for i, (a, b) in enumerate(zip(SOURCE.splitlines(), m.source.splitlines())) if a != b]
            assert changed == [m.lineno - 1]
            ast.parse(m.source)
            assert "# keep me" in m.source


def test_specific_rewrites():
    found = _by_kind()
    assert ("x < lo", "x >= lo") in {(m.original, m.mutated) for m in found["flip_comparison"]}
    assert ("a / b", "b / a") in {(m.original, m.mutated) for m in found["swap_operands"]}
    assert ("not (x <= hi)", "x <= hi") in {(m.original, m.mutated) for m in found["negate_condition"]}
    assert ("a and b", "a or b") in {(m.original, m.mutated) for m in found["swap_boolop"]}
    assert {(m.original, m.mutated) for m in found["off_by_one"]} == {("1", "0"), ("0", "1")}
    assert {m.original for m in found["drop_return"]} >= {"return lo", "return x"}


def test_sampling_is_reproducible_and_seed_dependent():
    files = {"pkg/mod.py": SOURCE}
    first = [(m.lineno, m.kind) for m in sample_mutations(files, seed=3)]
    assert first == [(m.lineno, m.kind) for m in sample_mutations(files, seed=3)]
    assert first != [(m.lineno, m.kind) for m in sample_mutations(files, seed=4)]


def test_mutation_diff_round_trips_through_git_apply():
    m = next(mutations("pkg/mod.py", SOURCE))
    base = {"pkg/mod.py": SOURCE.encode()}
    bug = file_diff("pkg/mod.py", SOURCE.encode(), m.source.encode())
    assert apply_diff(base, bug) == {"pkg/mod.py": m.source.encode()}
    fix = file_diff("pkg/mod.py", m.source.encode(), SOURCE.encode())
    assert apply_diff({"pkg/mod.py": m.source.encode()}, fix) == {"pkg/mod.py": SOURCE.encode()}
    assert apply_diff({"pkg/mod.py": m.source.encode()}, bug, reverse=True) == base


def test_tree_diff_adds_deletes_and_keeps_missing_final_newlines():
    old = {"a.py": b"x = 1\n", "gone.py": b"bye\n", "raw.txt": b"no newline"}
    new = {"a.py": b"x = 2\n", "new.py": b"hi\n", "raw.txt": b"still none"}
    diff = tree_diff(old, new)
    assert touched_paths(diff) == (["a.py", "gone.py", "raw.txt"], ["a.py", "new.py", "raw.txt"])
    assert apply_diff(old, diff) == {"a.py": b"x = 2\n", "gone.py": None, "raw.txt": b"still none", "new.py": b"hi\n"}


def test_empty_files_created_and_deleted_survive_the_round_trip():
    diff = tree_diff({"gone.py": b""}, {"pkg/__init__.py": b""})
    assert touched_paths(diff) == (["gone.py"], ["pkg/__init__.py"])
    assert apply_diff({"gone.py": b""}, diff) == {"gone.py": None, "pkg/__init__.py": b""}


def test_drop_protected_removes_trusted_tests_and_hijack_files_only():
    old = {"pkg/a.py": b"x = 1\n", "tests/test_a.py": b"def test(): assert 0\n"}
    new = {
        "pkg/a.py": b"x = 2\n",
        "tests/test_a.py": b"def test(): pass\n",
        "conftest.py": b"evil\n",
        "pkg/sitecustomize.py": b"evil\n",
        "pkg/helper.py": b"ok\n",
    }
    kept, dropped = drop_protected(tree_diff(old, new), trusted={"tests/test_a.py"})
    assert sorted(dropped) == ["conftest.py", "pkg/sitecustomize.py", "tests/test_a.py"]
    assert touched_paths(kept)[1] == ["pkg/a.py", "pkg/helper.py"]


def test_a_diff_that_does_not_apply_says_so():
    diff = file_diff("a.py", b"x = 1\n", b"x = 2\n")
    with pytest.raises(PatchError, match="does not apply"):
        apply_diff({"a.py": b"y = 1\n"}, diff)
    with pytest.raises(PatchError, match="not in the repository"):
        apply_diff({}, diff)


@pytest.mark.parametrize("path", ["../escape.py", "a/../../escape.py", "/etc/passwd"])
def test_paths_outside_the_repository_are_refused_before_touching_the_host(path):
    diff = f"diff --git a/{path} b/{path}\nnew file mode 100644\n--- /dev/null\n+++ b/{path}\n@@ -0,0 +1 @@\n+x\n"
    with pytest.raises(PatchError, match="outside the repository"):
        apply_diff({}, diff)


def test_a_diff_creating_a_symlink_is_refused():
    diff = (
        "diff --git a/link b/link\nnew file mode 120000\n--- /dev/null\n+++ b/link\n@@ -0,0 +1 @@\n"
        "+/etc/hostname\n\\ No newline at end of file\n"
    )
    with pytest.raises(PatchError, match="symbolic link"):
        apply_diff({}, diff)
