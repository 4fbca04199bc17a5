"""Task sources: SWE-bench (Lite here; full, Verified and Multimodal share its schema), SWE-Gym
and SWE-smith rows in their published shapes (constructed rows, see tests/data/swe/SOURCE.md),
their image names and templates, and errors that name the row; a SWE-smith row graded for real
on an official-layout image (its bug applied first, its fix the bug reversed)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import docker
import pytest
from conftest import LITE, OFFICIAL_PARAMS, official_pool
from pydantic import ValidationError

from envs.base import Action
from envs.swe import official
from envs.swe.diffs import PatchError, apply_diff, reverse_diff, touched_paths
from envs.swe.env import SWEEnv, SWEParams, swe_task_to_task, task_image
from envs.swe.task import load_swe_tasks
from reward.swe import grade_swe

DATA = Path(__file__).resolve().parents[2] / "data" / "swe"
LITE_DEV = LITE / "dev.json"
session_loop = pytest.mark.asyncio(loop_scope="session")


def test_swe_gym_rows_load_and_are_named_as_swe_gym_publishes_its_images() -> None:
    tasks = load_swe_tasks(DATA / "swe_gym_shaped.jsonl", "swe-gym")
    assert [t.dataset for t in tasks] == ["swe-gym", "swe-gym"]
    lite = {t.instance_id: t for t in load_swe_tasks(LITE_DEV)}
    for task in tasks:  # test lists given as JSON lists (first row) or JSON strings (second)
        assert (task.FAIL_TO_PASS, task.PASS_TO_PASS) == (
            lite[task.instance_id].FAIL_TO_PASS,
            lite[task.instance_id].PASS_TO_PASS,
        )
    assert [official.default_image(t) for t in tasks] == [
        "xingyaoww/sweb.eval.x86_64.marshmallow-code_s_marshmallow-1359:latest",
        "xingyaoww/sweb.eval.x86_64.pydicom_s_pydicom-1256:latest",
    ]
    # Read as SWE-bench rows (the same columns), they get SWE-bench's image names.
    assert (
        official.default_image(load_swe_tasks(DATA / "swe_gym_shaped.jsonl")[0])
        == "swebench/sweb.eval.x86_64.marshmallow-code_1776_marshmallow-1359:latest"
    )


def test_swe_smith_rows_are_told_by_their_image_name_and_their_bug_is_the_setup() -> None:
    tasks = load_swe_tasks(DATA / "swe_smith_shaped.jsonl")
    rows = [json.loads(line) for line in (DATA / "swe_smith_shaped.jsonl").read_text().splitlines()]
    for task, row in zip(tasks, rows):
        assert task.dataset == "swe-smith" and task.image == row["image_name"]
        assert task.setup_patch == row["patch"] and task.patch == reverse_diff(row["patch"])
        assert task.trusted() >= {"tests/test_utils.py"}
        assert official.test_directives(task) == ["tests/test_utils.py"]
        assert official.default_image(task) == row["image_name"]


def _write(tmp_path: Path, rows: list[object]) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_unknown_fields_are_ignored_and_a_missing_one_names_the_row(tmp_path: Path) -> None:
    gym = [json.loads(line) for line in (DATA / "swe_gym_shaped.jsonl").read_text().splitlines()]
    smith = [json.loads(line) for line in (DATA / "swe_smith_shaped.jsonl").read_text().splitlines()]
    assert load_swe_tasks(_write(tmp_path, [{**gym[0], "difficulty": "<15 min", "nested": {"x": [1]}}]), "swe-gym")
    broken = {k: v for k, v in gym[1].items() if k != "FAIL_TO_PASS"}
    with pytest.raises(
        ValueError,
        match=r"rows.jsonl: record 1 \(pydicom__pydicom-1256\) is not a swe-gym task "
        r"\(FAIL_TO_PASS: Field required\)",
    ):
        load_swe_tasks(_write(tmp_path, [gym[0], broken]), "swe-gym")
    no_id = {k: v for k, v in smith[0].items() if k != "instance_id"}
    with pytest.raises(ValueError, match=r"record 0 is not a swe-smith task \(instance_id: Field required\)"):
        load_swe_tasks(_write(tmp_path, [no_id]))
    with pytest.raises(ValueError, match=r"record 0 is not a JSON object"):
        load_swe_tasks(_write(tmp_path, [["a list"]]))
    binary = {**smith[1], "patch": "diff --git a/x.bin b/x.bin\nBinary files a/x.bin and b/x.bin differ\n"}
    with pytest.raises(ValueError, match=r"codeworld_constructed__2\) is not a swe-smith task: its patch cannot be"):
        load_swe_tasks(_write(tmp_path, [binary]))


def test_a_row_with_its_own_image_and_eval_script_keeps_them(tmp_path: Path) -> None:
    """SWE-bench 5.x task repositories publish each instance's image and evaluation script."""
    row = json.loads((DATA / "swe_gym_shaped.jsonl").read_text().splitlines()[0])
    script = (
        "#!/bin/bash\nset -uxo pipefail\ncd /testbed\n: '>>>>> Start Test Output'\npytest -rA\n"
        ": '>>>>> End Test Output'\n"
    )
    (task,) = load_swe_tasks(
        _write(
            tmp_path,
            [{**row, "image": "sweb.eval.x86_64.x:v2", "eval_script": script, "eval_type": "fail_only"}],
        )
    )
    assert official.default_image(task) == "sweb.eval.x86_64.x:v2" and official.eval_script(task) == script
    spec = official.test_spec(task, "sweb.eval.x86_64.x:v2")
    assert (
        spec.eval_type == "fail_only"
        and spec.eval_script_list[-1] == 'echo ">>>>> Test Exit Code: $SWEBENCH_TEST_EXIT_CODE"'
    )


def test_the_written_eval_script_is_swebenchs_layout() -> None:
    task = next(t for t in load_swe_tasks(LITE_DEV) if t.instance_id == "marshmallow-code__marshmallow-1359")
    lines = official.eval_script(task).splitlines()
    assert lines[:4] == [
        "#!/bin/bash",
        "set -uxo pipefail",
        "source /opt/miniconda3/bin/activate",
        "conda activate testbed",
    ]
    reset = f"git checkout {task.base_commit} tests/test_fields.py"
    apply = next(i for i, line in enumerate(lines) if line.startswith("git apply -v - <<'EOF_"))
    start, end = lines.index(": '>>>>> Start Test Output'"), lines.index(": '>>>>> End Test Output'")
    assert lines.index(reset) < apply < start and lines[start + 1 : end] == ["pytest -rA tests/test_fields.py"]
    assert lines[-1] == reset and lines.count(reset) == 2


def test_image_templates_map_names_and_a_bad_one_names_the_setting() -> None:
    task = next(t for t in load_swe_tasks(LITE_DEV) if t.instance_id == "pydicom__pydicom-1256")
    assert (
        task_image(task, SWEParams(image_template="registry.local:5000/{image}"))
        == "registry.local:5000/swebench/sweb.eval.x86_64.pydicom_1776_pydicom-1256:latest"
    )
    assert (
        task_image(task, SWEParams(image_template="10.0.0.2:5000/mirror/{name}"))
        == "10.0.0.2:5000/mirror/sweb.eval.x86_64.pydicom_1776_pydicom-1256:latest"
    )
    assert task_image(task, SWEParams(image_template="swe/{docker_id}:v1")) == "swe/pydicom_1776_pydicom-1256:v1"
    for bad in ("{nope}", "Registry/{name}", "{image} extra", "a/{name}:{name}", "{0}"):
        with pytest.raises(ValidationError, match="params.image_template"):
            SWEParams(image_template=bad)


def _git_apply_check(files: dict[str, bytes], diff: str, tmp: Path) -> None:
    """Proves with git itself that `diff` applies to `files`."""
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    subprocess.run(["git", "apply", "--check", "-"], cwd=tmp, input=diff.encode(), check=True)


def test_reverse_diffs_undo_real_patches_and_every_kind_of_part(tmp_path: Path) -> None:
    new_and_gone = (
        "diff --git a/new.py b/new.py\nnew file mode 100644\nindex 0000000..e69de29\n--- /dev/null\n"
        "+++ b/new.py\n@@ -0,0 +1,2 @@\n+x = 1\n+y = 2\n"
        "diff --git a/old.py b/old.py\ndeleted file mode 100755\nindex 1234567..0000000\n--- a/old.py\n"
        "+++ /dev/null\n@@ -1 +0,0 @@\n-gone\n\\ No newline at end of file\n"
        "diff --git a/run.sh b/run.sh\nold mode 100644\nnew mode 100755\n"
        "diff --git a/a.txt b/b.txt\nsimilarity index 100%\nrename from a.txt\nrename to b.txt\n"
    )
    base = {"old.py": b"gone", "run.sh": b"echo\n", "a.txt": b"same\n"}
    after = {p: d for p, d in {**base, **apply_diff(base, new_and_gone)}.items() if d is not None}
    assert after == {"new.py": b"x = 1\ny = 2\n", "run.sh": b"echo\n", "b.txt": b"same\n"}
    back = reverse_diff(new_and_gone)
    _git_apply_check(after, back, tmp_path / "synthetic")
    assert reverse_diff(back) == new_and_gone
    assert {p: d for p, d in {**after, **apply_diff(after, back)}.items() if d is not None} == base
    for task in load_swe_tasks(LITE_DEV):
        for diff in (task.patch, task.test_patch):
            assert reverse_diff(reverse_diff(diff)) == diff, task.instance_id
            assert touched_paths(reverse_diff(diff))[0] == touched_paths(diff)[1], task.instance_id
    with pytest.raises(PatchError, match="copies a file"):
        reverse_diff("diff --git a/x b/y\nsimilarity index 100%\ncopy from x\ncopy to y\n")


@pytest.fixture(scope="module")
def smith_image(official_images: dict[str, str]) -> str:
    """The SWE-smith rows' image: the official-layout marshmallow image, whose /testbed is the
    repository at the rows' commit, tagged with the name the rows give."""
    row = json.loads((DATA / "swe_smith_shaped.jsonl").read_text().splitlines()[0])
    client = docker.from_env()
    client.images.get(official_images["marshmallow-code__marshmallow-1359"]).tag(row["image_name"], "latest")
    client.close()
    return row["image_name"]


@session_loop
async def test_swe_smith_rows_grade_for_real(smith_image: str) -> None:
    for task in load_swe_tasks(DATA / "swe_smith_shaped.jsonl"):
        pool = await official_pool(task)
        gold = await grade_swe(task, task.patch, pool)
        assert gold.reward == 1.0 and gold.fail_to_pass.passed == task.FAIL_TO_PASS, (
            gold.error,
            gold.log_tail,
        )
        assert len(gold.pass_to_pass.passed) == 31
        empty = await grade_swe(task, "", pool)
        assert empty.reward == 0.0 and empty.fail_to_pass.failed == task.FAIL_TO_PASS
        # The bug itself is no fix: applied twice it does not apply at all.
        assert (await grade_swe(task, task.setup_patch, pool)).reward == 0.0


@session_loop
async def test_a_swe_smith_episode_starts_from_the_bug(smith_image: str) -> None:
    task = load_swe_tasks(DATA / "swe_smith_shaped.jsonl")[0]
    env = SWEEnv(OFFICIAL_PARAMS)
    await env.reset(swe_task_to_task(task, OFFICIAL_PARAMS))
    try:
        probe = "python -c 'from marshmallow.utils import is_keyed_tuple; print(is_keyed_tuple((1, 2)))'"
        out = await env.step(Action(text=f"<tool: bash>\n{probe}\n</tool>", token_ids=[1]))
        assert out.observation.messages[0].content.startswith("True\n[exit code 0]")
        done = await env.step(Action(text="<tool: submit>\n</tool>", token_ids=[1]))
    finally:
        await env.close()
    assert done.reward == 0.0 and done.info["diff"] == ""


@session_loop
async def test_an_episode_whose_image_cannot_be_had_gives_no_reward_naming_it() -> None:
    """Pulled from a registry that is not there (a closed loopback port): no reward, never a 0."""
    task = next(t for t in load_swe_tasks(LITE_DEV) if t.instance_id == "pydicom__pydicom-1256")
    params = SWEParams(image_template="127.0.0.1:9/{name}")
    env = SWEEnv(params)
    await env.reset(swe_task_to_task(task, params))
    try:
        done = await env.step(Action(text="<tool: bash>\nls\n</tool>", token_ids=[1]))
    finally:
        await env.close()
    assert done.done and done.reward is None
    assert "127.0.0.1:9/sweb.eval.x86_64.pydicom_1776_pydicom-1256:latest" in done.info["error"]
    assert "could not be pulled" in done.info["error"]
