"""Grading built SWE tasks in real Docker sandboxes: the original code scores 1, an empty diff 0,
diffs that edit, stub, delete or hijack the tests 0, and failures that are not the model's give
no reward at all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from envs.swe.diffs import file_diff, touched_paths, tree_diff
from envs.swe.task import SWETask
from envs.swe.workspace import base_tree
from reward.swe import grade_swe
from workers.sandbox import DEFAULT_IMAGE, SandboxPool

pytestmark = pytest.mark.asyncio(loop_scope="session")

TASK_INDEXES = range(5)

# A conftest.py that reports every test as passed: the classic way to fake a green run.
HIJACK = b"""import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    report.outcome = "passed"
"""


def stub_tests_diff(task: SWETask, tree: dict[str, bytes] | None = None, test_files: list[str] | None = None) -> str:
    """A diff that empties the body of every FAIL_TO_PASS test (keeping decorators, so the test
    ids stay the same): if applied, those tests would pass whatever the code does. `tree`: the
    files to start from (default: the task's base), `test_files`: where the tests are."""
    tree = tree if tree is not None else base_tree(task.source)
    new = dict(tree)
    for test_file in test_files if test_files is not None else task.test_files:
        source = tree[test_file].decode()
        lines = source.splitlines(keepends=True)
        names = {t.split("::")[-1].split("[")[0] for t in task.FAIL_TO_PASS if t.startswith(test_file + "::")}
        funcs = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name in names]
        for func in sorted(funcs, key=lambda f: f.lineno, reverse=True):
            first, last = func.body[0].lineno, func.body[-1].end_lineno
            indent = lines[first - 1][: len(lines[first - 1]) - len(lines[first - 1].lstrip())]
            lines[first - 1 : last] = [f"{indent}pass\n"]
        new[test_file] = "".join(lines).encode()
    return tree_diff(tree, new)


def delete_tests_diff(task: SWETask) -> str:
    tree = base_tree(task.source)
    return "".join(file_diff(f, tree[f], None) for f in task.test_files)


@pytest.mark.parametrize("index", TASK_INDEXES)
async def test_original_1_empty_0_test_edits_0(built_tasks: list[SWETask], swe_pool: SandboxPool, index: int):
    task = built_tasks[index]
    gold = await grade_swe(task, task.patch, swe_pool)
    assert (gold.reward, gold.resolved, gold.error) == (1.0, True, "")
    assert gold.fail_to_pass.passed == task.FAIL_TO_PASS and not gold.pass_to_pass.failed

    empty = await grade_swe(task, "", swe_pool)
    assert (empty.reward, empty.resolved) == (0.0, False)
    assert empty.fail_to_pass.failed == task.FAIL_TO_PASS

    stubbed = await grade_swe(task, stub_tests_diff(task), swe_pool)
    assert stubbed.reward == 0.0 and stubbed.dropped_paths == task.test_files

    deleted = await grade_swe(task, delete_tests_diff(task), swe_pool)
    assert deleted.reward == 0.0 and deleted.dropped_paths == task.test_files
    assert deleted.fail_to_pass.failed == task.FAIL_TO_PASS  # the restored tests ran, and failed

    hijack = await grade_swe(task, file_diff("conftest.py", None, HIJACK), swe_pool)
    assert hijack.reward == 0.0 and hijack.dropped_paths == ["conftest.py"]


@pytest.mark.parametrize("index", [0, 3])
async def test_the_test_stub_would_pass_if_tests_were_not_restored(built_tasks, swe_pool, index):
    """The stub diff really is a reward hack: graded against a task that trusts no test file,
    it scores 1. So the 0 above comes from restoring the trusted tests."""
    task = built_tasks[index]
    unprotected = task.model_copy(update={"trusted_files": []})
    result = await grade_swe(unprotected, stub_tests_diff(task), swe_pool)
    assert (result.reward, result.dropped_paths) == (1.0, [])


async def test_fix_with_test_edits_keeps_the_fix_and_drops_the_edits(built_tasks, swe_pool):
    task = built_tasks[1]
    result = await grade_swe(task, task.patch + stub_tests_diff(task), swe_pool)
    assert result.reward == 1.0 and result.dropped_paths == task.test_files


async def test_diff_that_does_not_apply_scores_0(built_tasks, swe_pool):
    task = built_tasks[0]
    (path,) = touched_paths(task.patch)[0]
    result = await grade_swe(task, file_diff(path, b"this is not the file\n", b"neither is this\n"), swe_pool)
    assert (result.reward, result.applied) == (0.0, False)
    assert "does not apply" in result.error


async def test_hanging_code_times_out_to_0(built_tasks, swe_pool):
    task = built_tasks[0]
    (path,) = touched_paths(task.patch)[0]
    code = base_tree(task.source)[path]
    result = await grade_swe(task, file_diff(path, code, b"while True:\n    pass\n" + code), swe_pool, timeout_s=5)
    assert result.reward == 0.0 and result.error == "tests ended as timeout"


async def test_broken_task_gives_no_reward(built_tasks, swe_pool):
    task = built_tasks[0]
    broken = task.model_copy(update={"test_patch": file_diff(task.test_files[0], b"not the tests\n", b"x\n")})
    result = await grade_swe(broken, task.patch, swe_pool)
    assert result.reward is None and "is broken" in result.error
    no_tests = task.model_copy(update={"FAIL_TO_PASS": []})
    assert (await grade_swe(no_tests, "", swe_pool)).reward is None


async def test_sandbox_failure_gives_no_reward_not_0(built_tasks):
    pool = SandboxPool(backend="docker", image=DEFAULT_IMAGE, size=1)
    await pool.start()
    await pool.close()
    result = await grade_swe(built_tasks[0], built_tasks[0].patch, pool)
    assert result.reward is None and "closed" in result.error


async def test_task_files_are_portable_and_self_describing(built_tasks: list[SWETask]):
    assert len({t.instance_id for t in built_tasks}) == 5
    assert {t.repo for t in built_tasks} == {"toolz", "inflection"}
    for task in built_tasks:
        assert Path(task.source.tarball).is_file()
        assert not set(task.FAIL_TO_PASS) & set(task.PASS_TO_PASS) and task.PASS_TO_PASS
        assert all(t in task.problem_statement for t in task.FAIL_TO_PASS[:8])
        (changed,) = touched_paths(task.patch)[1]
        assert changed not in task.trusted_files and changed in touched_paths(task.source.setup_patch)[1]
        assert task.patch not in task.problem_statement
