"""The SWE task record: a SWE-bench instance as published, plus the few fields that say how to
materialise and test it here. SWE-bench files (JSON arrays) are read as they are; tasks made by
`codeworld swe build-tasks` are JSONL rows of the same shape with `source` and `test_cmd` set."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from envs.data import read_records
from envs.swe.diffs import PatchError, normalize_trusted, reverse_diff, touched_paths

# How the test runner starts: the test environment's interpreter by its absolute path, with the
# working folder taken off sys.path before pytest is imported (safe-path semantics, as `-P` gives
# on Python 3.11+, for every Python a SWE-bench image may hold), so that a `pytest/` package a
# diff adds at the repository root is not what runs.
PYTEST = "{python} -c 'import sys; del sys.path[0]; import pytest; raise SystemExit(pytest.main())'"
# Test commands of the pure-Python SWE-bench repositories (from the SWE-bench harness specs);
# the test files of the task are appended. Repositories not listed here use plain pytest.
# `{python}` is the interpreter's absolute path, `{pytest}` the runner above.
SWEBENCH_TEST_CMDS: dict[str, str] = {
    "django/django": "{python} ./tests/runtests.py --verbosity 2 --settings=test_sqlite --parallel 1",
    "sympy/sympy": ("PYTHONWARNINGS='ignore::UserWarning,ignore::SyntaxWarning' {python} bin/test -C --verbose"),
    "sphinx-doc/sphinx": "{python} -m tox --current-env -epy39 -v --",
    "astropy/astropy": "{pytest} -rA -vv -o console_output_style=classic --tb=no",
    "mwaskom/seaborn": "{pytest} --no-header -rA",
}
DEFAULT_TEST_CMD = "{pytest} -rA"
# Scripts that run the tests of a repository: a diff that rewrote one would print the results.
SWEBENCH_RUNNERS: dict[str, list[str]] = {"django/django": ["tests/runtests.py"], "sympy/sympy": ["bin/test"]}
# A task's own command that starts pytest by name gets the runner above in its place.
_PYTEST_HEAD = re.compile(r"^\s*(?:pytest|py\.test|python3?(?:\.[0-9]+)? -m pytest)(?=\s|$)")
# How the official SWE-bench images start a shell: the repository's conda environment.
SWEBENCH_SHELL_INIT = "source /opt/miniconda3/bin/activate && conda activate testbed"


class SourceSpec(BaseModel):
    """Where the repository's base files come from when they are not inside the image."""

    model_config = ConfigDict(extra="forbid")

    tarball: str
    """A .tar.gz holding the repository (e.g. a PyPI sdist); relative to the task file's folder."""
    prefix: str = ""
    """The folder inside the tarball that is the repository root ('' = the tarball's top)."""
    setup_patch: str = ""
    """A diff applied on the host after unpacking to make the base state (the injected bug of a
    built task). Host-side only: it never enters a sandbox."""
    deps: str | None = None
    """A .tar.gz of installed dependencies (`pip install --target`), relative like `tarball`;
    unpacked next to the repository and put on PYTHONPATH."""
    pythonpath: list[str] = []
    """Repository folders put on PYTHONPATH, for the shell and the tests (e.g. `src`)."""


class SWETask(BaseModel):
    """One SWE task: SWE-bench's fields (extra ones ignored) and how to run it here."""

    model_config = ConfigDict(extra="ignore")

    instance_id: str
    """Unique id, e.g. `pallets__flask-4992` or `toolz-1.2.0-m0007`."""
    repo: str
    """`owner/name` for SWE-bench, the PyPI name for built tasks."""
    problem_statement: str
    """The issue text shown to the model."""
    version: str = ""
    """The repository's version (SWE-bench's environment key)."""
    base_commit: str = ""
    """The commit of the base state (SWE-bench); for built tasks the sdist's sha256."""
    patch: str = ""
    """The gold fix (a diff); never shown to the model."""
    test_patch: str = ""
    """A diff that adds or updates the tests that judge the fix; applied only when grading."""
    FAIL_TO_PASS: list[str]
    """Tests that fail at the base and must pass after the fix (the grader refuses a task
    without any: it would reward every diff)."""
    PASS_TO_PASS: list[str]
    """Tests that pass at the base and must still pass after the fix."""
    image: str | None = Field(default=None, validation_alias=AliasChoices("image", "image_name"))
    """Sandbox image for this task (SWE-smith rows: `image_name`); None = the default of its kind
    (`official.default_image` for official-layout tasks)."""
    dataset: Literal["swe-bench", "swe-gym", "swe-smith"] = "swe-bench"
    """The published source of the row; says how its image is named when it names none."""
    eval_script: str | None = None
    """The row's own SWE-bench evaluation script (SWE-bench 5.x task repositories publish one);
    None: written in SWE-bench's layout (`official.eval_script`). Official layout only."""
    eval_type: Literal["pass_and_fail", "fail_only"] | None = None
    """How SWE-bench scores the tests (`fail_only`: only failures count); None: by repository."""
    setup_patch: str = ""
    """Official layout: a diff applied to the image's repository before the episode and before
    grading (a SWE-smith row's bug); never shown to the model."""
    source: SourceSpec | None = None
    """Base files to unpack; None = the repository is already in the image at `image_workdir`."""
    image_workdir: str = "/testbed"
    """Where an image-resident repository lives (SWE-bench images: /testbed)."""
    test_cmd: str | None = None
    """Shell command that runs the tests, the test files appended; None = by repository. A
    leading `pytest` or `python -m pytest` runs as the safe-path runner (`PYTEST`); `{python}`
    stands for the test interpreter's absolute path."""
    test_files: list[str] = []
    """Test files to run; empty = the files the test_patch touches (SWE-bench's directives)."""
    trusted_files: list[str] = []
    """Test files a model's diff may not change, beyond those of the test_patch."""
    log_parser: str | None = None
    """Name of the `swebench.harness.log_parsers` parser that reads the test output; None = the
    one SWE-bench uses for this repository (pytest's for repositories it does not know)."""
    shell_init: str | None = None
    """Shell commands run before every command (e.g. activating a conda env); None = by kind."""

    @field_validator("FAIL_TO_PASS", "PASS_TO_PASS", mode="before")
    @classmethod
    def _json_list(cls, value: Any) -> Any:
        # SWE-bench publishes these as JSON-encoded strings.
        return json.loads(value) if isinstance(value, str) else value

    def resolved_test_cmd(self, python: str) -> str:
        """The full test command, run with the interpreter at `python` (an absolute path): the
        command for this repository (or the task's own, its leading `pytest` / `python -m pytest`
        replaced by the safe-path runner) and the test files."""
        if self.test_cmd is not None:
            base = _PYTEST_HEAD.sub(lambda _: PYTEST, self.test_cmd, count=1)
        else:
            base = SWEBENCH_TEST_CMDS.get(self.repo, DEFAULT_TEST_CMD)
        command = base.replace("{pytest}", PYTEST).replace("{python}", shlex.quote(python))
        return " ".join([command, *(shlex.quote(d) for d in self.test_directives())])

    def test_directives(self) -> list[str]:
        """What to pass the test command: the test files (Django: dotted test module labels)."""
        files = self.test_files or touched_paths(self.test_patch)[1]
        files = [f for f in files if f.endswith(".py")]
        if self.repo == "django/django":
            return [f.removeprefix("tests/").removesuffix(".py").replace("/", ".") for f in files]
        return files

    def trusted(self) -> set[str]:
        """Paths a model's diff may not change: the test_patch's files, `trusted_files` and the
        repository's test runner script, normalised as diff paths are."""
        reads, writes = touched_paths(self.test_patch) if self.test_patch else ([], [])
        runners = SWEBENCH_RUNNERS.get(self.repo, []) if self.test_cmd is None else []
        return set(reads) | set(writes) | normalize_trusted([*self.trusted_files, *runners])

    def resolved_log_parser(self) -> str:
        """The `PARSER_REGISTRY` name of the parser for this task's test output."""
        # Imported here: `swebench` takes seconds to import, and loading tasks should not.
        from swebench.harness.log_parsers import PARSER_REGISTRY
        from swebench.harness.log_parsers.python import MAP_REPO_TO_PARSER_PY, parse_log_pytest

        if self.log_parser is not None:
            if self.log_parser not in PARSER_REGISTRY:
                raise ValueError(f"Task {self.instance_id}: unknown log_parser {self.log_parser!r}.")
            return self.log_parser
        parser = MAP_REPO_TO_PARSER_PY.get(self.repo, parse_log_pytest)
        return next(name for name, fn in PARSER_REGISTRY.items() if fn is parser)

    def image_resident(self) -> bool:
        """Whether the repository comes with the image rather than from `source`."""
        return self.source is None


Dataset = Literal["auto", "swe-bench", "swe-gym", "swe-smith"]
"""A task file's published source; "auto": SWE-smith for rows with `image_name` and no
`test_patch`, SWE-bench otherwise (SWE-Gym rows look like SWE-bench's: name them)."""


def _from_swe_smith(row: dict[str, Any]) -> dict[str, Any]:
    """A SWE-smith row as a task: its `patch` makes the bug, so it is the setup patch and its
    reverse the gold fix; the files of its tests are trusted and are the ones run."""
    row = dict(row)
    try:
        bug = str(row.get("patch") or "")
        row["patch"] = reverse_diff(bug) if bug.strip() else ""
    except PatchError as err:
        raise ValueError(f"its patch cannot be reversed into a fix ({err})") from None
    row["setup_patch"] = bug
    tests: list[Any] = []
    for key in ("FAIL_TO_PASS", "PASS_TO_PASS"):
        value = SWETask._json_list(row.get(key, []))
        tests += value if isinstance(value, list) else []  # anything else: the model's validation says so
    files = list(dict.fromkeys(t.split("::", 1)[0] for t in tests if isinstance(t, str)))
    row.setdefault("trusted_files", files)
    return row


def load_swe_tasks(path: Path, dataset: Dataset = "auto") -> list[SWETask]:
    """Read SWE tasks from a JSON array or a JSONL file of SWE-bench (full, Lite, Verified,
    Multimodal), SWE-Gym or SWE-smith rows, or of tasks codeworld built; relative tarball paths
    are made absolute against the file's folder. Unknown fields are ignored; an error names the
    file, the record and its instance id, and the field at fault."""
    if not path.is_file():
        raise FileNotFoundError(f"SWE task file {str(path)!r} does not exist.")
    tasks = []
    for index, row in enumerate(read_records(path)):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: record {index} is not a JSON object.")
        instance_id = row.get("instance_id")
        name = f"record {index}" + (f" ({instance_id})" if isinstance(instance_id, str) else "")
        kind = dataset
        if kind == "auto":
            kind = "swe-smith" if row.get("image_name") and not row.get("test_patch") else "swe-bench"
        try:
            fields = _from_swe_smith(row) if kind == "swe-smith" else row
            task = SWETask.model_validate({**fields, "dataset": kind})
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"{path}: {name} is not a {kind} task ({field}: {first['msg']}).") from None
        except ValueError as err:
            raise ValueError(f"{path}: {name} is not a {kind} task: {err}.") from None
        if task.source is not None:
            src = task.source
            task.source = src.model_copy(
                update={
                    "tarball": str((path.parent / src.tarball).resolve()),
                    "deps": str((path.parent / src.deps).resolve()) if src.deps else None,
                }
            )
        tasks.append(task)
    return tasks


def write_swe_tasks(tasks: list[SWETask], out: Path) -> None:
    """Write tasks as JSONL, their tarball paths made relative to the file's folder."""
    lines = []
    for task in tasks:
        row = task.model_dump(mode="json")
        for key in ("tarball", "deps"):
            if row["source"] and row["source"][key]:
                row["source"][key] = str(Path(row["source"][key]).relative_to(out.parent.resolve()))
        lines.append(json.dumps(row))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(line + "\n" for line in lines))
