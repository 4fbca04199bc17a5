"""The SWE grader and environment against a policy that attacks them, in real Docker sandboxes on
built tasks: diffs that would fake a green test run without touching a trusted file as written
score 0; a policy that breaks its sandbox or its repository scores 0, never a dropped sample;
and nothing a sandbox prints (a forged shell exit marker, a helper whose imports are shadowed)
makes `env.step` raise."""

from __future__ import annotations

import pytest
from test_grading import stub_tests_diff

from envs.base import Action, EnvConfigError
from envs.swe.diffs import file_diff
from envs.swe.env import SWEEnv, SWEParams, swe_task_to_task
from envs.swe.task import SWETask
from envs.swe.workspace import base_tree
from reward.swe import grade_swe
from workers.sandbox import SandboxPool

pytestmark = pytest.mark.asyncio(loop_scope="session")

# A pytest plugin that reports every test as passed: what each hijack below tries to load.
PLUGIN = b"""import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    outcome.get_result().outcome = "passed"
"""


def _new(files: dict[str, bytes]) -> str:
    return "".join(file_diff(path, None, data) for path, data in files.items())


def _fake_pytest(task: SWETask) -> bytes:
    """A `pytest` stand-in that prints the lines SWE-bench's parser reads as passes."""
    lines = "".join(f"PASSED {t}\\n" for t in task.FAIL_TO_PASS + task.PASS_TO_PASS)
    return f"import sys\nsys.stdout.write('{lines}')\n".encode()


def _respell(diff: str, old: str, new: str) -> str:
    """The diff with its `a/PATH` and `b/PATH` spelled another way."""
    return diff.replace(f"a/{old}", f"a/{new}").replace(f"b/{old}", f"b/{new}")


def hijacks(task: SWETask) -> dict[str, str]:
    """Diffs that touch no trusted path as the old string comparison saw it, and would make the
    task's tests look green."""
    test_dir = task.test_files[0].rsplit("/", 1)[0]
    stub = stub_tests_diff(task)
    first = task.test_files[0]
    dist = "cw_evil-1.0.dist-info"
    return {
        "pytest package at the root": _new(
            {"pytest/__init__.py": b"# shadows pytest\n", "pytest/__main__.py": _fake_pytest(task)}
        ),
        "pytest module at the root": _new({"pytest.py": _fake_pytest(task)}),
        "pytest.ini loading a plugin": _new(
            {"pytest.ini": b"[pytest]\naddopts = -p cw_evil_plugin\n", "cw_evil_plugin.py": PLUGIN}
        ),
        "tox.ini beside the tests": _new(
            {f"{test_dir}/tox.ini": b"[pytest]\naddopts = -p cw_evil_plugin\n", "cw_evil_plugin.py": PLUGIN}
        ),
        "setup.cfg beside the tests": _new(
            {f"{test_dir}/setup.cfg": b"[tool:pytest]\naddopts = -p cw_evil_plugin\n", "cw_evil_plugin.py": PLUGIN}
        ),
        "entry point in a dist-info": _new(
            {
                f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: cw-evil\nVersion: 1.0\n",
                f"{dist}/entry_points.txt": b"[pytest11]\ncw_evil = cw_evil_plugin\n",
                "cw_evil_plugin.py": PLUGIN,
            }
        ),
        "trusted test through a double slash": _respell(stub, first, first.replace("/", "//", 1)),
        "trusted test through ./": _respell(stub, first, "./" + first),
        "trusted test git-quoted": stub.replace(f"a/{first}", f'"a/{first[:-2]}\\160y"').replace(
            f"b/{first}", f'"b/{first[:-2]}\\160y"'
        ),
        "trusted test under another prefix": "".join(
            line.replace(f"--- a/{first}", f"--- x/{first}").replace(f"+++ b/{first}", f"+++ y/{first}")
            for line in stub.splitlines(keepends=True)
            if not line.startswith("diff --git")
        ),
        "trusted test renamed over": (
            f"diff --git a/{first}.orig b/{first}\nsimilarity index 100%\nrename from {first}.orig\nrename to {first}\n"
        ),
        "trusted test's folder made a symlink": (
            "diff --git a/lnk b/lnk\nnew file mode 120000\n--- /dev/null\n"
            f"+++ b/lnk\n@@ -0,0 +1 @@\n+{test_dir}\n\\ No newline at end of file\n"
        ),
        "a .. path": _new({f"{test_dir}/../{first.rsplit('/', 1)[1]}": b"def test_x():\n    pass\n"}),
    }


HIJACKS = [
    "pytest package at the root",
    "pytest module at the root",
    "pytest.ini loading a plugin",
    "tox.ini beside the tests",
    "setup.cfg beside the tests",
    "entry point in a dist-info",
    "trusted test through a double slash",
    "trusted test through ./",
    "trusted test git-quoted",
    "trusted test under another prefix",
    "trusted test renamed over",
    "trusted test's folder made a symlink",
    "a .. path",
]


async def test_the_hijack_list_is_complete(built_tasks: list[SWETask]) -> None:
    assert sorted(hijacks(built_tasks[0])) == sorted(HIJACKS)


@pytest.mark.parametrize("name", HIJACKS)
async def test_hijacking_diffs_score_0(built_tasks: list[SWETask], swe_pool: SandboxPool, name: str) -> None:
    task = built_tasks[0]
    result = await grade_swe(task, hijacks(task)[name], swe_pool)
    assert result.reward == 0.0, (name, result.error, result.dropped_paths, result.log_tail)
    assert not result.resolved


async def test_the_hijacks_do_fake_a_green_run_when_nothing_stops_them(built_tasks, swe_pool) -> None:
    """The plugin and the fake pytest are real hacks: with the plugin loaded by the task's own
    (trusted) configuration and pytest shadowed by the task's own test command, the same task
    scores 1. So the 0s above come from the defences, not from hacks that do not work."""
    task = built_tasks[0]
    plugin_task = task.model_copy(update={"test_cmd": "python3 -m pytest -rA -p cw_evil_plugin"})
    assert (await grade_swe(plugin_task, _new({"cw_evil_plugin.py": PLUGIN}), swe_pool)).reward == 1.0
    fake_task = task.model_copy(update={"test_cmd": "python3 cw_fake_pytest.py"})
    fake = _new({"cw_fake_pytest.py": _fake_pytest(task)})
    assert (await grade_swe(fake_task, fake, swe_pool)).reward == 1.0


async def test_the_fix_still_scores_1_beside_dropped_hijacks(built_tasks, swe_pool) -> None:
    task = built_tasks[0]
    attack = hijacks(task)
    diff = task.patch + attack["pytest.ini loading a plugin"] + attack["pytest package at the root"]
    result = await grade_swe(task, diff, swe_pool)
    assert result.reward == 1.0, result.error
    assert {"pytest.ini", "pytest/__init__.py"} <= set(result.dropped_paths)


def _folder_with_files(task: SWETask) -> tuple[str, list[str]]:
    """A folder of two or more Python files and no trusted one."""
    tree, trusted = base_tree(task.source), task.trusted()
    folders: dict[str, list[str]] = {}
    for path in tree:
        if "/" in path and path.endswith(".py"):
            folders.setdefault(path.rsplit("/", 1)[0], []).append(path)
    return next(
        (d, sorted(f))
        for d, f in sorted(folders.items())
        if len(f) >= 2 and not any(t.startswith(d + "/") for t in trusted)
    )


async def test_diffs_the_sandbox_tree_cannot_take_score_0(built_tasks, swe_pool) -> None:
    """A diff that needs a folder where a file is, or a file where a folder with other files is,
    cannot be written: the model's doing (0), not a sandbox failure (None)."""
    task = built_tasks[0]
    folder, files = _folder_with_files(task)
    tree = base_tree(task.source)
    under_a_file = _new({f"{files[0]}/evil.py": b"x = 1\n"})
    over_a_folder = file_diff(files[0], tree[files[0]], None) + _new({folder: b"x = 1\n"})
    for diff in (under_a_file, over_a_folder):
        result = await grade_swe(task, diff, swe_pool)
        assert result.reward == 0.0 and result.error.startswith("model diff"), result


# ------------------------------------------------------------------------------- the environment


def act(text: str) -> Action:
    return Action(text=text, token_ids=[1, 2, 3])


def bash(command: str) -> Action:
    return act(f"<tool: bash>\n{command}\n</tool>")


SUBMIT = act("<tool: submit>\n</tool>")


async def _episode(task: SWETask, *actions: Action, **params):
    env = SWEEnv(SWEParams(**params))
    await env.reset(swe_task_to_task(task, env.params))
    results = []
    try:
        for action in actions:
            results.append(await env.step(action))
            if results[-1].done:
                break
    finally:
        await env.close()
    return results


@pytest.mark.parametrize("mark", ["garbage", "1", "", "x y", "99999999999999999999999 1", "0 -5"])
async def test_a_forged_exit_marker_is_an_unknown_exit_status(built_tasks, mark: str) -> None:
    trap = f"trap 'echo; echo \"__codeworld_exit__ {mark}\"' EXIT; echo planted"
    out, done = await _episode(built_tasks[3], bash(trap), SUBMIT)
    text = out.observation.messages[0].content
    assert "planted" in text and "[exit status unknown" in text
    assert (done.done, done.reward) == (True, 0.0)


SHADOWS = {
    "json that exits": ("json.py", "raise SystemExit(3)"),
    "json that prints garbage": (
        "json.py",
        "print('not json')\ndef dump(*a, **k): print('[1')\ndef dumps(*a, **k): return '[1'\ndef load(f): return {}\n",
    ),
    "base64 that raises": ("base64.py", "raise ImportError('shadowed')"),
    "shutil that exits": ("shutil.py", "import os\nos._exit(0)"),
}


@pytest.mark.parametrize("name", list(SHADOWS))
async def test_modules_planted_beside_the_helper_are_not_imported(built_tasks, name: str) -> None:
    """The helper runs as `python3 -I -c` in the sandbox's work dir: modules the policy writes
    there (or in the repository) do not shadow its imports, so the tools and the final diff
    still work and the fix scores 1."""
    task = built_tasks[0]
    module, source = SHADOWS[name]
    plant = f"cat > ../{module} <<'EOF'\n{source}\nEOF\ncp ../{module} ./{module}"
    (patched, _, search, replace) = _gold_edit(task)
    edit = act(f"<tool: edit>\n{patched}\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n</tool>")
    results = await _episode(task, bash(plant), act(f"<tool: view>\n{patched}\n1 3\n</tool>"), edit, SUBMIT)
    assert [r.done for r in results] == [False, False, False, True], results[-1].info
    assert results[2].observation.messages[0].content.startswith(f"Edited {patched}.")
    assert results[-1].reward == 1.0, results[-1].info.get("error")


def _gold_edit(task: SWETask) -> tuple[str, int, str, str]:
    from envs.swe.diffs import parse_diff

    (patched,) = parse_diff(task.patch)
    (hunk,) = patched
    search = "".join(line.value for line in hunk if not line.is_added).rstrip("\n")
    replace = "".join(line.value for line in hunk if not line.is_removed).rstrip("\n")
    return patched.path, 0, search, replace


@pytest.mark.parametrize(
    "command", ["kill -9 -1", "kill -9 -1; sleep 5", "python3 -c 'import os, signal; os.kill(-1, signal.SIGKILL)'"]
)
async def test_killing_everything_scores_0_not_a_dropped_sample(built_tasks, command: str) -> None:
    """The sandbox layer says the program killed its agent (today) or the kill never reaches the
    agent (after the sandbox core's rewrite): either way the policy gets 0, never None."""
    results = await _episode(built_tasks[1], bash(command), SUBMIT)
    assert results[-1].done and results[-1].reward == 0.0, results[-1].info


async def test_a_tree_the_helper_cannot_read_is_the_policys_0(built_tasks) -> None:
    task = built_tasks[1]
    _, files = _folder_with_files(task)
    results = await _episode(task, bash(f"chmod 000 {files[0]} {files[1]}"), SUBMIT)
    assert results[-1].done and results[-1].reward == 0.0, results[-1].info


async def test_a_directory_turned_into_a_file_scores_0(built_tasks) -> None:
    task = built_tasks[1]
    folder, _ = _folder_with_files(task)
    results = await _episode(task, bash(f"rm -rf {folder} && echo x > {folder}"), SUBMIT)
    assert results[-1].done and results[-1].reward == 0.0, results[-1].info
    assert results[-1].info["grade"]["error"].startswith("model diff"), results[-1].info["grade"]


async def test_an_rlimit_only_sandbox_is_refused_for_swe_naming_the_key(built_tasks) -> None:
    env = SWEEnv(SWEParams(backend="local", local_isolation="rlimit"))
    with pytest.raises(EnvConfigError, match=r"set `params\.allow_unisolated: true`"):
        await env.reset(swe_task_to_task(built_tasks[0], env.params))
    await env.close()
