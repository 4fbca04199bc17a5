"""A model's diff as an adversary's text, on the host: paths normalised as git and the file
system resolve them, every spelling of a protected path caught, ambiguous diffs refused, new
modules that would shadow importable ones found, and the one rule that blames a failed sandbox
call on the policy or on the infrastructure."""

from __future__ import annotations

import pytest

from envs.swe.diffs import (
    PatchError,
    apply_diff,
    drop_protected,
    file_changes,
    file_diff,
    is_protected,
    normalize_path,
    package_inits,
    safe_diff_path,
    shadowing_paths,
    touched_paths,
)
from envs.swe.workspace import blame
from workers.sandbox import ExecResult, Status

TRUSTED = {"tests/test_x.py"}
STUB = b"def test_x():\n    pass\n"


def _modify(header_a: str, header_b: str, git: bool = True) -> str:
    head = f"diff --git {header_a} {header_b}\n" if git else ""
    return f"{head}--- {header_a}\n+++ {header_b}\n@@ -1 +1 @@\n-x\n+y\n"


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("b/tests/test_x.py", "tests/test_x.py"),
        ("b/tests//test_x.py", "tests/test_x.py"),
        ("b/./tests/test_x.py", "tests/test_x.py"),
        ("b/tests/./test_x.py/", "tests/test_x.py"),
        ("x/tests/test_x.py", "tests/test_x.py"),  # git apply -p1 strips any first component
        ('"b/tests/\\164est_x.py"', "tests/test_x.py"),  # git's C-quoting, octal escape
        ('"b/tests/t\\303\\251st.py"', "tests/tést.py"),  # UTF-8 bytes quoted
        ("b/x.py", "x.py"),
    ],
)
def test_paths_normalise_as_git_and_the_file_system_resolve_them(raw: str, path: str) -> None:
    assert normalize_path(raw, strip=True) == path


@pytest.mark.parametrize(
    "raw",
    [
        "b/../x.py",
        "b/a/../../x.py",
        "b/tests/../../etc/passwd",
        "b//etc/passwd",
        "b/a\\b.py",
        "b/a\x00b",
        "b/new\nline.py",
        "b/tab\t.py",
        '"b/a\\qb"',
        '"b/\\377.py"',
        "b/",
        "b/.",
        "b/./",
    ],
)
def test_paths_that_are_not_plainly_inside_the_repository_are_refused(raw: str) -> None:
    with pytest.raises(PatchError):
        normalize_path(raw, strip=True)


@pytest.mark.parametrize(
    "header",
    [
        ("a/tests//test_x.py", "b/tests//test_x.py"),
        ("a/./tests/test_x.py", "b/./tests/test_x.py"),
        ('"a/tests/\\164est_x.py"', '"b/tests/\\164est_x.py"'),
        ('"a/\\164ests/test_x.py"', '"b/\\164ests/test_x.py"'),
    ],
)
def test_every_spelling_of_a_trusted_test_is_dropped(header: tuple[str, str]) -> None:
    diff = _modify(*header) + file_diff("pkg/a.py", b"x\n", b"y\n")
    kept, dropped = drop_protected(diff, TRUSTED)
    assert dropped == ["tests/test_x.py"]
    assert touched_paths(kept)[1] == ["pkg/a.py"]


def test_a_traditional_diff_under_another_prefix_is_read_as_git_reads_it() -> None:
    kept, dropped = drop_protected(_modify("x/tests/test_x.py", "y/tests/test_x.py", git=False), TRUSTED)
    assert (kept, dropped) == ("", ["tests/test_x.py"])


def test_a_diff_git_reads_differently_is_refused() -> None:
    # Without a prefix git strips the first folder ("tests/"), where a reader that only strips
    # a/ and b/ would see the trusted path's neighbour. Either way the two must agree.
    unprefixed = "--- tests/test_x.py\n+++ tests/test_x.py\n@@ -1 +1 @@\n-x\n+y\n"
    assert touched_paths(unprefixed) == (["test_x.py"], ["test_x.py"])
    mismatched = "diff --git a/pkg/a.py b/pkg/a.py\n--- a/pkg/b.py\n+++ b/pkg/b.py\n@@ -1 +1 @@\n-x\n+y\n"
    with pytest.raises(PatchError):
        file_changes(mismatched)


@pytest.mark.parametrize(
    "diff",
    [
        "diff --git a/tests/test_x.py.orig b/tests/test_x.py\nsimilarity index 100%\n"
        "rename from tests/test_x.py.orig\nrename to tests/test_x.py\n",
        "diff --git a/tests/test_x.py b/tests/moved.py\nsimilarity index 100%\n"
        "rename from tests/test_x.py\nrename to tests/moved.py\n",
        "diff --git a/pkg/a.py b/tests/test_x.py\nsimilarity index 90%\ncopy from pkg/a.py\n"
        "copy to tests/test_x.py\n"
        "--- a/pkg/a.py\n+++ b/tests/test_x.py\n@@ -1 +1 @@\n-x\n+y\n",
        "diff --git a/tests/test_x.py b/tests/test_x.py\nold mode 100644\nnew mode 100755\n",
        "diff --git a/tests/test_x.py b/tests/test_x.py\ndeleted file mode 100644\n--- a/tests/test_x.py\n"
        "+++ /dev/null\n@@ -1 +0,0 @@\n-x\n",
    ],
)
def test_renames_copies_modes_and_deletions_of_a_trusted_test_are_dropped(diff: str) -> None:
    kept, dropped = drop_protected(diff, TRUSTED)
    assert kept == "" and "tests/test_x.py" in dropped


@pytest.mark.parametrize(
    "path",
    [
        "conftest.py",
        "pkg/deep/conftest.py",
        "CONFTEST.PY",
        "pytest.ini",
        "sub/.pytest.ini",
        "pytest.toml",
        "tests/tox.ini",
        "a/b/setup.cfg",
        "pkg/pyproject.toml",
        "sitecustomize.py",
        "lib/usercustomize.py",
        "x.pth",
        "A.PTH",
        ".env",
        "tests/__pycache__/test_x.cpython-311-pytest-7.2.1.pyc",
        "pkg/mod.pyc",
        "pkg/_speedups.so",
        "evil-1.0.dist-info/entry_points.txt",
        "evil.egg-info/entry_points.txt",
        ".git/hooks/pre-commit",
        ".GIT/config",
        "evil.egg-link",
        "Tests/Test_X.py",
        "tests",
        "tests/test_x.py/inner.py",
    ],
)
def test_protected_paths(path: str) -> None:
    assert is_protected(path, TRUSTED)


@pytest.mark.parametrize(
    "path",
    [
        "pkg/a.py",
        "tests/test_y.py",
        "tests/helpers.py",
        "docs/conf.py",
        "pkg/setup_utils.py",
        "conftest_helpers.py",
        "pkg/env.py",
    ],
)
def test_ordinary_paths_are_not_protected(path: str) -> None:
    assert not is_protected(path, TRUSTED)


@pytest.mark.parametrize(
    ("mode_line", "why"),
    [
        ("new file mode 120000", "symbolic link"),
        ("new file mode 160000", "submodule"),
    ],
)
def test_links_and_submodules_are_dropped_and_never_applied(mode_line: str, why: str) -> None:
    diff = f"diff --git a/lnk b/lnk\n{mode_line}\n--- /dev/null\n+++ b/lnk\n@@ -0,0 +1 @@\n+tests\n"
    assert drop_protected(diff, TRUSTED) == ("", ["lnk"])
    with pytest.raises(PatchError, match=why):
        apply_diff({}, diff)


def test_binary_patches_are_dropped() -> None:
    diff = (
        "diff --git a/img.png b/img.png\nnew file mode 100644\nindex 0000000..e69de29\n"
        "Binary files /dev/null and b/img.png differ\n"
    )
    assert drop_protected(diff, TRUSTED) == ("", ["img.png"])


IMPORTABLE = {"pytest", "json", "toolz", "os", "_pytest"}


def _new(*paths: str) -> str:
    return "".join(file_diff(p, None, b"x = 1\n") for p in paths)


@pytest.mark.parametrize(
    ("paths", "shadowing"),
    [
        (["pytest/__init__.py", "pytest/__main__.py"], ["pytest/__init__.py"]),
        (["pytest.py"], ["pytest.py"]),
        (["src/pytest/__init__.py"], ["src/pytest/__init__.py"]),
        (["tests/json.py"], ["tests/json.py"]),  # tests/ is no package: its folder is on sys.path
        (["tests/toolz.py"], ["tests/toolz.py"]),  # the repository's own package, shadowed
        (["pkg/json.py"], []),  # pkg.json, a submodule: shadows nothing
        (["pkg/sub/__init__.py", "pkg/sub/json.py"], []),
        (["newdir/json.py"], ["newdir/json.py"]),
        (["newpkg/__init__.py", "newpkg/json.py"], []),  # a new package's own submodule
        (["tests/helpers.py", "tests/test_new.py"], []),
    ],
)
def test_new_modules_that_shadow_importable_ones(paths: list[str], shadowing: list[str]) -> None:
    assert shadowing_paths(_new(*paths), IMPORTABLE, {"pkg/__init__.py"}) == shadowing


def test_deleting_or_renaming_away_an_init_makes_its_folder_top_level() -> None:
    deleted = file_diff("pkg/__init__.py", b"x\n", None) + _new("pkg/json.py")
    assert package_inits(deleted) == ["pkg/__init__.py"]
    pytest_package = _new("pytest/__init__.py", "pytest/__main__.py")
    assert package_inits(pytest_package) == ["__init__.py", "pytest/__init__.py"]
    assert shadowing_paths(deleted, IMPORTABLE, {"pkg/__init__.py"}) == ["pkg/json.py"]
    renamed = (
        "diff --git a/pkg/__init__.py b/pkg/init.py\nsimilarity index 100%\n"
        "rename from pkg/__init__.py\nrename to pkg/init.py\n"
    ) + _new("pkg/os.py")
    assert shadowing_paths(renamed, IMPORTABLE, {"pkg/__init__.py"}) == ["pkg/os.py"]
    kept = file_diff("pkg/__init__.py", b"x\n", b"y\n") + _new("pkg/json.py")
    assert shadowing_paths(kept, IMPORTABLE, {"pkg/__init__.py"}) == []


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("pkg/a.py", True),
        ("docs/über.txt", True),
        ("a b/c.py", True),
        ("x\ny.py", False),
        (" lead.py", False),
        ("trail /x.py", False),
        ('q"uote.py', False),
        ("back\\slash.py", False),
        ("a//b.py", False),
        ("../x.py", False),
    ],
)
def test_which_repository_paths_a_diff_can_carry_plainly(path: str, ok: bool) -> None:
    assert safe_diff_path(path) is ok


@pytest.mark.parametrize(
    ("result", "acted", "who"),
    [
        (ExecResult(status=Status.RUNTIME_ERROR, exit_code=-9, broke_sandbox=True), False, "policy"),
        (ExecResult(status=Status.OK, exit_code=0, broke_sandbox=True), True, "policy"),
        (ExecResult(status=Status.SANDBOX_ERROR, error="container vanished"), True, "infrastructure"),
        (ExecResult(status=Status.SANDBOX_ERROR, error="container vanished"), False, "infrastructure"),
        (ExecResult(status=Status.RUNTIME_ERROR, exit_code=1), True, "policy"),
        (ExecResult(status=Status.RUNTIME_ERROR, exit_code=1), False, "infrastructure"),
        (ExecResult(status=Status.TIMEOUT), True, "policy"),
        (ExecResult(status=Status.OOM), False, "infrastructure"),
        (ExecResult(status=Status.OUTPUT_LIMIT), True, "policy"),
        (ExecResult(status=Status.OK, exit_code=0), True, "policy"),  # ran, but printed no report
        (ExecResult(status=Status.OK, exit_code=0), False, "infrastructure"),
    ],
)
def test_blame_for_a_failed_sandbox_call(result: ExecResult, acted: bool, who: str) -> None:
    assert blame(result, acted) == who
