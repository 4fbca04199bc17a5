"""The SWE environment end to end with a scripted agent on built tasks: tools, the persistent
shell, budgets stated in every observation, limits, and the final grade."""

from __future__ import annotations

import re

import pytest

from envs.base import Action, Task
from envs.registry import get_env
from envs.swe.diffs import parse_diff, touched_paths
from envs.swe.env import SWEEnv, SWEParams, swe_task_to_task
from envs.swe.task import SWETask
from envs.swe.tools import TOOL_DOC

pytestmark = pytest.mark.asyncio(loop_scope="session")


def act(text: str, tokens: int = 10) -> Action:
    return Action(text=text, token_ids=list(range(tokens)))


def bash(command: str) -> Action:
    return act(f"<tool: bash>\n{command}\n</tool>")


def fix_edit(task: SWETask) -> tuple[str, str, str, int, str]:
    """(file, SEARCH, REPLACE, buggy line number, buggy line) of a built task's gold patch, the
    hunk's context lines included so that SEARCH is unique, as an agent would write it."""
    (patched,) = parse_diff(task.patch)
    (hunk,) = patched
    search = "".join(line.value for line in hunk if not line.is_added).rstrip("\n")
    replace = "".join(line.value for line in hunk if not line.is_removed).rstrip("\n")
    removed = next(line for line in hunk if line.is_removed)
    return patched.path, search, replace, removed.source_line_no, removed.value.rstrip("\n")


async def start(task: SWETask, **params) -> tuple[SWEEnv, Task]:
    env_params = SWEParams(**params)
    env = SWEEnv(env_params)
    row = swe_task_to_task(task, env_params)
    first = await env.reset(row)
    assert first.messages == row.prompt
    return env, row


async def test_registered_and_prompt_documents_the_tools(built_tasks):
    assert get_env("swe") is SWEEnv
    row = swe_task_to_task(built_tasks[0], SWEParams(max_turns=7, token_budget=900))
    system, user = row.prompt
    assert TOOL_DOC in system.content
    assert built_tasks[0].problem_statement in user.content and "7 turns and 900 tokens" in user.content
    assert row.hidden["swe"]["patch"] == built_tasks[0].patch and row.hidden["swe"]["patch"] not in user.content


async def test_scripted_agent_fixes_the_bug_and_scores_1(built_tasks):
    task = built_tasks[0]
    path, search, replace, lineno, buggy = fix_edit(task)
    env, _ = await start(task, max_turns=12, token_budget=1000)
    try:
        out = await env.step(bash("ls"))
        assert "pyproject.toml" in out.observation.messages[0].content
        assert out.observation.messages[0].content.endswith("[exit code 0]\n[11 turns and 990 tokens left]")
        await env.step(bash("S=clobbered; LIMIT=0; cd toolz && export PROBE=persisted"))
        out = await env.step(bash('pwd; echo "$PROBE"'))
        assert re.search(r"/toolz\npersisted\n\[exit code 0\]", out.observation.messages[0].content)
        out = await env.step(act(f"<tool: view>\n{path}\n{lineno} {lineno}\n</tool>"))
        assert out.observation.messages[0].content.startswith(f"{lineno:6d}\t{buggy}\n")
        out = await env.step(act("I will just think."))
        assert out.observation.messages[0].content.startswith("Error: No tool call found")
        assert not out.done
        edit = f"<tool: edit>\n{path}\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n</tool>"
        out = await env.step(act(edit))
        assert out.observation.messages[0].content.startswith(f"Edited {path}.")
        tests = " ".join(task.FAIL_TO_PASS)
        out = await env.step(bash(f"cd .. && python -m pytest -q -p no:cacheprovider {tests}"))
        content = out.observation.messages[0].content
        assert "passed" in content and "[exit code 0]" in content
        done = await env.step(act("<tool: submit>\n</tool>"))
    finally:
        await env.close()
    assert done.done and done.reward == 1.0
    assert done.info["reason"] == "submitted" and done.info["turns"] == 8
    assert touched_paths(done.info["diff"])[1] == [path]


async def test_timeouts_are_reported_and_no_change_scores_0(built_tasks):
    env, _ = await start(built_tasks[3], command_timeout_s=2)
    try:
        out = await env.step(bash("echo started; sleep 30"))
        text = out.observation.messages[0].content
        assert "started" in text and "[timed out after 2 s and killed" in text
        done = await env.step(act("<tool: submit>\n</tool>"))
    finally:
        await env.close()
    assert (done.done, done.reward, done.info["diff"]) == (True, 0.0, "")


async def test_create_over_a_test_file_is_discarded_at_grading(built_tasks):
    task = built_tasks[3]
    stub = "def test_nothing():\n    pass"
    env, _ = await start(task)
    try:
        out = await env.step(act(f"<tool: create>\n{task.test_files[0]}\n{stub}\n</tool>"))
        assert out.observation.messages[0].content.startswith(f"Overwrote {task.test_files[0]}")
        done = await env.step(act("<tool: submit>\n</tool>"))
    finally:
        await env.close()
    assert done.reward == 0.0 and done.info["grade"]["dropped_paths"] == [task.test_files[0]]


async def test_turn_and_token_budgets_end_the_episode_with_a_grade(built_tasks):
    env, _ = await start(built_tasks[1], max_turns=2)
    try:
        out = await env.step(bash("true"))
        assert out.observation.messages[0].content.endswith("[1 turns and 32758 tokens left]")
        done = await env.step(bash("true"))
    finally:
        await env.close()
    assert (done.done, done.reward, done.info["reason"]) == (True, 0.0, "out of turns")
    env, _ = await start(built_tasks[1], token_budget=50)
    try:
        done = await env.step(act("<tool: bash>\ntrue\n</tool>", tokens=50))
    finally:
        await env.close()
    assert (done.done, done.reward, done.info["reason"]) == (True, 0.0, "out of tokens")


async def test_missing_image_gives_no_reward(built_tasks):
    env, _ = await start(built_tasks[0], image="codeworld-no-such-image:1")
    try:
        done = await env.step(bash("ls"))
    finally:
        await env.close()
    assert done.done and done.reward is None and "codeworld-no-such-image:1" in done.info["error"]
