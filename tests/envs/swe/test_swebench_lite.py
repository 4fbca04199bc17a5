"""One SWE-bench Lite instance graded end to end here: marshmallow-code__marshmallow-1359 (a
pure-Python repository), its repository stood in for by the marshmallow 3.0.0 sdist from PyPI,
its test dependencies shipped as wheels. Instances whose image or repository is missing say so."""

from __future__ import annotations

import json

import pytest

from envs.data import data_root
from envs.swe.task import load_swe_tasks
from reward.swe import grade_swe

pytestmark = pytest.mark.asyncio(loop_scope="session")

DEV = data_root() / "swebench_lite" / "dev.json"
INSTANCE = "marshmallow-code__marshmallow-1359"


@pytest.fixture(scope="module")
def marshmallow_task_file(tmp_path_factory, swe_cli, swe_cache):
    out = tmp_path_factory.mktemp("lite") / "marshmallow.jsonl"
    summary = swe_cli(
        "swe",
        "from-sdist",
        "--data",
        str(DEV),
        "--id",
        INSTANCE,
        "--package",
        "marshmallow==3.0.0",
        "--dep",
        "pytz",
        "--dep",
        "simplejson",
        "--out",
        str(out),
        "--cache",
        str(swe_cache),
    ).summary
    assert summary == {"instance_id": INSTANCE, "package": "marshmallow==3.0.0", "out": str(out)}
    return out


async def test_gold_patch_resolves_the_instance(marshmallow_task_file, tmp_path, swe_cli):
    results = tmp_path / "results.jsonl"
    run = swe_cli("swe", "grade", "--data", str(marshmallow_task_file), "--gold", "--out", str(results))
    assert run.summary == {"n": 1, "passed": 1, "failed": 0, "errors": 0}
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["fail_to_pass"]["passed"] == ["tests/test_fields.py::TestParentAndName::test_datetime_list_inner_format"]
    assert len(row["pass_to_pass"]["passed"]) == 76 and not row["pass_to_pass"]["failed"]


async def test_no_change_leaves_the_instance_unresolved(marshmallow_task_file, swe_pool):
    (task,) = load_swe_tasks(marshmallow_task_file)
    result = await grade_swe(task, "", swe_pool)
    assert result.reward == 0.0
    assert result.fail_to_pass.failed == task.FAIL_TO_PASS and len(result.pass_to_pass.passed) == 76


async def test_instance_without_its_image_names_the_missing_image(swe_cli):
    """The image is looked for under a template that names a closed loopback port: not on this
    node, and the pull fails at once (no traffic leaves the machine)."""
    run = swe_cli(
        "swe",
        "grade",
        "--data",
        str(DEV),
        "--id",
        INSTANCE,
        "--gold",
        "--image-template",
        "127.0.0.1:9/{name}",
        check=False,
    )
    assert run.summary == {"n": 1, "passed": 0, "failed": 0, "errors": 1}
    assert "127.0.0.1:9/sweb.eval.x86_64.marshmallow-code_1776_marshmallow-1359:latest" in run.proc.stderr
    assert "could not be pulled" in run.proc.stderr and "codeworld swe build-image" in run.proc.stderr


async def test_sdist_that_is_not_the_repository_is_refused(tmp_path, swe_cli, swe_cache):
    wrong = "marshmallow-code__marshmallow-1343"  # a 2.20 instance; 3.0.0's files differ
    run = swe_cli(
        "swe",
        "from-sdist",
        "--data",
        str(DEV),
        "--id",
        wrong,
        "--package",
        "marshmallow==3.0.0",
        "--out",
        str(tmp_path / "x.jsonl"),
        "--cache",
        str(swe_cache),
        check=False,
    )
    assert run.proc.returncode == 1 and not (tmp_path / "x.jsonl").exists()
    assert f"is not the repository of {wrong}" in run.proc.stderr and "does not apply" in run.proc.stderr
