"""SWE-bench instances in the official layout, graded with SWE-bench's own evaluation script and
report functions, on images `codeworld swe build-image` made from the exact releases the
instances name (five instances, three repositories): the gold patch resolves each, the empty
patch and patches that edit or delete the tests do not, and for every case codeworld's verdict
equals both swebench's report on the same log and what swebench's own harness (`run_instance`,
its containers, its `git apply`) says on the same image and patch. Hijacks the official harness
falls for are dropped here."""

from __future__ import annotations

from pathlib import Path

import docker
import pytest
from conftest import CACHE, OFFICIAL, OFFICIAL_PARAMS, official_pool
from swebench.harness.grading import get_eval_report
from swebench.harness.run_evaluation import run_instance
from test_adversarial import PLUGIN
from test_grading import stub_tests_diff

from envs.base import Action
from envs.swe import official
from envs.swe.build.swebench_sdist import sdist_tree
from envs.swe.diffs import apply_diff, file_diff, parse_diff, touched_paths, tree_diff
from envs.swe.env import SWEEnv, swe_task_to_task
from envs.swe.task import SWETask
from reward.swe import GradeResult, grade_swe

pytestmark = pytest.mark.asyncio(loop_scope="session")


def base_files(task: SWETask) -> dict[str, bytes]:
    """The repository at the instance's base (the sdist the image was built from)."""
    return sdist_tree(task, OFFICIAL[task.instance_id][1], CACHE)[1]


def edit_tests_diff(task: SWETask, base: dict[str, bytes]) -> str:
    """The test patch applied with every FAIL_TO_PASS test's body emptied: the tests the grader
    runs, made to pass whatever the code does."""
    reads, writes = touched_paths(task.test_patch)
    after = {
        **base,
        **{p: d for p, d in apply_diff({p: base[p] for p in reads}, task.test_patch).items() if d},
    }
    stubbed = dict(after)
    for path, data in apply_diff(
        {p: after[p] for p in writes if p.endswith(".py")},
        stub_tests_diff(task, after, [p for p in writes if p.endswith(".py")]),
    ).items():
        stubbed[path] = data
    return tree_diff({p: base[p] for p in writes if p in base}, {p: stubbed[p] for p in writes})


def delete_tests_diff(task: SWETask, base: dict[str, bytes]) -> str:
    """A diff that deletes the test files the test patch changes."""
    return "".join(file_diff(p, base[p], None) for p in touched_paths(task.test_patch)[0])


def cases(task: SWETask) -> dict[str, tuple[str, float]]:
    base = base_files(task)
    return {
        "gold": (task.patch, 1.0),
        "empty": ("", 0.0),
        "edits the tests": (edit_tests_diff(task, base), 0.0),
        "deletes the tests": (delete_tests_diff(task, base), 0.0),
    }


def swebench_report(task: SWETask, image: str, diff: str, log: str, tmp: Path) -> dict:
    """swebench's own report on a log, from a spec made by its `make_test_spec`."""
    (tmp / "log.txt").write_text(log)
    spec = official.test_spec(task, image)
    prediction = {"instance_id": task.instance_id, "model_patch": diff, "model_name_or_path": "t"}
    return get_eval_report(spec, prediction, str(tmp / "log.txt"), include_tests_status=True)[task.instance_id]


def official_harness(
    task: SWETask, image: str, diff: str, run_id: str, tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> bool:
    """Whether swebench's harness (`run_instance`: its container, its git apply chain, the same
    evaluation script) resolves the instance with `diff` on the same image."""
    monkeypatch.chdir(tmp)  # it writes its logs under ./logs
    client = docker.from_env()
    try:
        done = run_instance(
            official.test_spec(task, image),
            {"instance_id": task.instance_id, "model_patch": diff, "model_name_or_path": "codeworld-test"},
            client,
            run_id,
            timeout=600,
        )
    finally:
        client.close()
    if done is None:  # the harness gives up on a patch it cannot apply: unresolved
        return False
    return bool(done[1][task.instance_id]["resolved"])


@pytest.mark.parametrize("instance", list(OFFICIAL))
async def test_verdicts_equal_swebenchs_own(instance: str, official_tasks, official_images, tmp_path, monkeypatch):
    task, image = official_tasks[instance], official_images[instance]
    pool = await official_pool(task)
    for name, (diff, expected) in cases(task).items():
        result: GradeResult = await grade_swe(task, diff, pool)
        assert result.reward == expected, (instance, name, result.error, result.log_tail)
        report = swebench_report(task, image, diff, result.log, tmp_path)
        assert report["resolved"] == result.resolved, (instance, name)
        assert report["tests_status"]["FAIL_TO_PASS"]["success"] == result.fail_to_pass.passed
        harness = official_harness(task, image, diff, f"cw-{name.replace(' ', '-')}", tmp_path, monkeypatch)
        assert harness == result.resolved, (instance, name, "swebench's harness disagrees")
        if name in ("edits the tests", "deletes the tests"):
            assert result.dropped_paths, (instance, name)  # the grader's test files were out of its reach


async def test_a_conftest_that_fools_the_official_harness_scores_0_here(
    official_tasks, official_images, tmp_path, monkeypatch
):
    """A root conftest.py plugin that reports every test passed: swebench's harness takes it (its
    evaluation script resets only the test patch's files), codeworld drops it first."""
    instance = "pydicom__pydicom-1256"
    task, image = official_tasks[instance], official_images[instance]
    hijack = file_diff("conftest.py", None, PLUGIN.replace(b"import pytest", b"import pytest  # noqa"))
    assert official_harness(task, image, hijack, "cw-conftest", tmp_path, monkeypatch) is True
    result = await grade_swe(task, hijack, await official_pool(task))
    assert result.reward == 0.0 and result.dropped_paths == ["conftest.py"]


async def test_built_images_declare_no_volumes(official_images) -> None:
    """Built by committing containers: a mount of the build would be a VOLUME of the image, and
    every sandbox of it would leave anonymous volumes behind."""
    client = docker.from_env()
    for image in official_images.values():
        config = client.images.get(image).attrs["Config"]
        assert not config.get("Volumes"), (image, config.get("Volumes"))
        assert config["WorkingDir"] == "/testbed"
    client.close()


def act(text: str) -> Action:
    return Action(text=text, token_ids=[1, 2, 3])


async def test_an_episode_edits_testbed_and_a_fresh_sandbox_grades_it(official_tasks, official_images):
    """The agent's tools work on /testbed as in a built task: the shell starts there, `edit`
    changes it, the tests run in the image's environment, and the diff is graded in a fresh
    sandbox; the next episode on the same pool sees the image's /testbed again."""
    task = official_tasks["marshmallow-code__marshmallow-1359"]
    (patched,) = parse_diff(task.patch)
    (hunk,) = patched
    search = "".join(line.value for line in hunk if not line.is_added).rstrip("\n")
    replace = "".join(line.value for line in hunk if not line.is_removed).rstrip("\n")
    env = SWEEnv(OFFICIAL_PARAMS)
    await env.reset(swe_task_to_task(task, OFFICIAL_PARAMS))
    try:
        out = await env.step(act("<tool: bash>\npwd && git status --short && which python\n</tool>"))
        text = out.observation.messages[0].content
        assert text.startswith("/testbed\n/opt/miniconda3/envs/testbed/bin/python\n[exit code 0]"), text
        edit = f"<tool: edit>\n{patched.path}\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n</tool>"
        out = await env.step(act(edit))
        assert out.observation.messages[0].content.startswith(f"Edited {patched.path}.")
        out = await env.step(
            act(
                "<tool: bash>\ngit diff --stat && pytest -q -p no:cacheprovider tests/test_fields.py"
                " 2>&1 | tail -1\n</tool>"
            )
        )
        assert f"{patched.path} | " in out.observation.messages[0].content
        assert " passed" in out.observation.messages[0].content
        done = await env.step(act("<tool: submit>\n</tool>"))
    finally:
        await env.close()
    assert done.done and done.reward == 1.0, done.info.get("error")
    assert touched_paths(done.info["diff"])[1] == [patched.path]
    env = SWEEnv(OFFICIAL_PARAMS)
    await env.reset(swe_task_to_task(task, OFFICIAL_PARAMS))
    try:
        out = await env.step(act("<tool: bash>\ngit status --short; git diff | wc -l\n</tool>"))
    finally:
        await env.close()
    assert out.observation.messages[0].content.startswith("0\n[exit code 0]")
