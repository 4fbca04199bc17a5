"""Official-layout instances: SWE-bench-style images (the repository at /testbed, a conda-style
environment the evaluation script activates), their names, and the evaluation script and
`TestSpec` that grade them with the `swebench` package's own functions.

Image names by task source (as those projects publish them; `image_template` maps them to a
private registry or another naming):

| source | image |
| --- | --- |
| SWE-bench (full, Lite, Verified, Multimodal) | `swebench/sweb.eval.x86_64.<id, "__" -> "_1776_">:latest` |
| SWE-Gym | `xingyaoww/sweb.eval.x86_64.<id, "__" -> "_s_">:latest` |
| SWE-smith | the row's `image_name` |

A row that carries its own `image` (SWE-bench 5.x task repos) or `eval_script` keeps them.
Otherwise the evaluation script is written in SWE-bench's own layout: activate the environment,
reset the test files to the base commit, apply the test patch, run the repository's test
command on the test files between SWE-bench's output markers, reset the test files again.
`swebench.harness.utils.make_test_spec` turns it into the spec (it also records the test
command's exit status), and `swebench.harness.grading.get_eval_report` reads the log.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from envs.swe.diffs import touched_paths

if TYPE_CHECKING:
    from swebench.types import TestSpec

    from envs.swe.task import SWETask

REPO_DIR = "/testbed"
ENV_NAME = "testbed"
CONDA_ROOT = "/opt/miniconda3"
ENV_PATH = f"{CONDA_ROOT}/envs/{ENV_NAME}"
# Test commands of SWE-bench's specs (`MAP_REPO_VERSION_TO_SPECS`, swebench 4.x), by repository
# and, where they differ, version; every other repository runs `pytest -rA`.
_PYTEST = "pytest -rA"
_DJANGO = "./tests/runtests.py --verbosity 2 --settings=test_sqlite --parallel 1"
_OFFICIAL_TEST_CMDS: dict[str, str] = {
    "django/django": _DJANGO,
    "sympy/sympy": "PYTHONWARNINGS='ignore::UserWarning,ignore::SyntaxWarning' bin/test -C --verbose",
    "sphinx-doc/sphinx": "tox --current-env -epy39 -v --",
    "mwaskom/seaborn": "pytest --no-header -rA",
}
_VERSION_TEST_CMDS: dict[tuple[str, str], str] = {
    ("django/django", "1.9"): "./tests/runtests.py --verbosity 2",
    **{
        ("astropy/astropy", v): "pytest -rA -vv -o console_output_style=classic --tb=no -p no:nose"
        for v in ("0.1", "0.2", "0.3", "0.4", "1.1", "1.2", "1.3")
    },
}
# Docker references as the engine accepts them: [registry[:port]/]path[:tag] or @digest.
_REFERENCE = re.compile(
    r"^(?:[a-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._/-][a-z0-9]+)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[0-9a-f]{64})?$"
)
_NON_TEST_EXTS = (".json", ".png", "csv", ".txt", ".md", ".jpg", ".jpeg", ".pkl", ".yml", ".yaml", ".toml")


def default_image(task: SWETask) -> str:
    """The image the task's source publishes for it (see the table above)."""
    if task.image:
        return task.image
    if task.dataset == "swe-gym":
        return f"xingyaoww/sweb.eval.x86_64.{task.instance_id.replace('__', '_s_')}:latest".lower()
    return f"swebench/sweb.eval.x86_64.{task.instance_id.replace('__', '_1776_')}:latest".lower()


def image_for(task: SWETask, template: str | None, setting: str = "image_template") -> str:
    """The image of an official-layout task under `template` (None: `default_image`). The
    template may use {image} (the default name), {name} (its last component, e.g.
    `sweb.eval.x86_64.x_1776_y:latest`), {instance_id} and {docker_id} (the id lowercased, "__"
    as "_1776_"); ValueError naming `setting` when the result is not a Docker image name."""
    image = default_image(task)
    if template is None:
        return image
    fields = {
        "image": image,
        "name": image.rsplit("/", 1)[-1],
        "instance_id": task.instance_id,
        "docker_id": task.instance_id.replace("__", "_1776_").lower(),
    }
    try:
        out = template.format(**fields)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"{setting} {template!r} is not a valid template ({err!r}); it may use "
            "{image}, {name}, {instance_id} and {docker_id}."
        ) from None
    if not _REFERENCE.match(out):
        raise ValueError(
            f"{setting} {template!r} gives {out!r} for {task.instance_id}, which is not a Docker "
            "image name (lowercase repository, optional registry, tag or digest)."
        )
    return out


def check_template(template: str, setting: str = "image_template") -> str:
    """`template` if it makes Docker image names (tried on a sample instance), else ValueError."""
    from envs.swe.task import SWETask

    sample = SWETask(
        instance_id="owner__repo-1", repo="owner/repo", problem_statement="", FAIL_TO_PASS=[], PASS_TO_PASS=[]
    )
    image_for(sample, template, setting)
    return template


def official_test_cmd(task: SWETask) -> str:
    """The task's test command in the official layout (its own `test_cmd`, else SWE-bench's)."""
    if task.test_cmd is not None:
        return task.test_cmd
    return _VERSION_TEST_CMDS.get((task.repo, task.version), _OFFICIAL_TEST_CMDS.get(task.repo, _PYTEST))


def test_directives(task: SWETask) -> list[str]:
    """What the test command is given, as SWE-bench computes it: the files the test patch
    touches that are not data (Django: dotted module labels); SWE-smith-style rows without a
    test patch: their `test_files`, else the files of their FAIL_TO_PASS tests."""
    if task.test_files:
        files = list(task.test_files)
    elif task.test_patch:
        files = re.findall(r"diff --git a/.* b/(.*)", task.test_patch)
        files = [f for f in files if not any(f.endswith(ext) for ext in _NON_TEST_EXTS)]
    else:
        files = list(dict.fromkeys(test.split("::", 1)[0] for test in task.FAIL_TO_PASS))
    if task.repo == "django/django":
        files = [f.removesuffix(".py").removeprefix("tests/").replace("/", ".") for f in files]
    return files


def eval_script(task: SWETask) -> str:
    """The evaluation script of the task: its own, else one in SWE-bench's layout (above)."""
    if task.eval_script:
        return task.eval_script
    from swebench.harness.constants import END_TEST_OUTPUT, START_TEST_OUTPUT
    from swebench.utils import generate_heredoc_delimiter, get_modified_files

    lines = [
        f"source {CONDA_ROOT}/bin/activate",
        f"conda activate {ENV_NAME}",
        f"cd {REPO_DIR}",
        f"git config --global --add safe.directory {REPO_DIR}",
        f"cd {REPO_DIR}",
        "git status",
        "git show",
        f"git -c core.fileMode=false diff {task.base_commit}",
        f"source {CONDA_ROOT}/bin/activate",
        f"conda activate {ENV_NAME}",
    ]
    reset = []
    if task.test_patch:
        reset = [f"git checkout {task.base_commit} {' '.join(get_modified_files(task.test_patch))}"]
        delimiter = generate_heredoc_delimiter(task.test_patch)
        lines += [*reset, f"git apply -v - <<'{delimiter}'\n{task.test_patch}\n{delimiter}"]
    lines += [
        f": '{START_TEST_OUTPUT}'",
        " ".join([official_test_cmd(task), *test_directives(task)]),
        f": '{END_TEST_OUTPUT}'",
        *reset,
    ]
    return "\n".join(["#!/bin/bash", "set -uxo pipefail", *lines]) + "\n"


def test_spec(task: SWETask, image: str) -> TestSpec:
    """The task's `swebench` TestSpec, made by `swebench.harness.utils.make_test_spec`."""
    from swebench.harness.constants import FAIL_ONLY_REPOS, EvalType
    from swebench.harness.utils import make_test_spec

    eval_type = task.eval_type or (EvalType.FAIL_ONLY if task.repo in FAIL_ONLY_REPOS else EvalType.PASS_AND_FAIL).value
    instance: dict[str, Any] = {
        "instance_id": task.instance_id,
        "image": image,
        "repo": task.repo,
        "version": task.version,
        "FAIL_TO_PASS": task.FAIL_TO_PASS,
        "PASS_TO_PASS": task.PASS_TO_PASS,
        "log_parser": task.resolved_log_parser(),
        "eval_type": eval_type,
        "eval_script": eval_script(task),
    }
    return make_test_spec(instance)


def test_patch_files(task: SWETask) -> list[str]:
    """Files the test patch reads (they must exist for it to apply)."""
    return touched_paths(task.test_patch)[0] if task.test_patch else []
