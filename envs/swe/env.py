"""The SWE environment: a multi-turn agent in a sandbox with the repository at its base state.

Each turn the model calls one tool (`tools.py`); the environment runs it in the episode's
sandbox session and answers with the tool's output and the turns and tokens left. The episode
ends on `submit`, or when the turns or the token budget run out; the repository's diff against
its start is then graded by `reward.swe.grade_swe` in a fresh sandbox.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from envs.base import Action, EnvParams, Environment, Message, Observation, StepResult, Task
from envs.data import resolve
from envs.registry import register_env
from envs.swe.official import check_template, image_for
from envs.swe.pools import release_pool, require_isolation, shared_pool
from envs.swe.task import Dataset, SWETask, load_swe_tasks
from envs.swe.tools import TOOL_DOC, ToolCall, ToolFormatError, parse_tool_call
from envs.swe.workspace import PolicyFault, SandboxFailure, Workspace
from workers.sandbox import ImagePolicy, Isolation, SandboxError, SandboxProfile, SandboxUnavailable
from workers.sandbox.choice import SandboxService

MAX_TURNS = 200

SYSTEM_PROMPT = (
    """You are a software engineer fixing a problem in a repository inside a sandbox \
with no network access. Explore the code, make the fix, check it by running the tests, then \
submit. When you submit (or run out of turns or tokens) your changes are graded by hidden tests. \
Changes to test files are discarded before grading.

"""
    + TOOL_DOC
)


class SWEParams(EnvParams):
    """Settings of the SWE environment."""

    backend: Literal["docker", "local"] = "docker"
    """Sandbox backend (`workers.sandbox`)."""
    image: str = "codeworld-sandbox:py311"
    """Image for tasks that bring their repository as a tarball and name no image."""
    pool_size: int = Field(default=2, ge=1)
    """Sandboxes kept warm per image."""
    max_turns: int = Field(default=30, ge=1, le=MAX_TURNS)
    """Model turns per episode."""
    token_budget: int = Field(default=32768, ge=1)
    """Tokens the model may generate over the whole episode."""
    command_timeout_s: float = Field(default=60.0, gt=0)
    """Time limit of one tool call."""
    test_timeout_s: float = Field(default=900.0, gt=0)
    """Time limit of the grading test run."""
    memory_mb: int = Field(default=2048, ge=256)
    """Memory of the episode's and the grader's sandbox."""
    local_isolation: Literal["bwrap", "rlimit"] | None = None
    """Local backend only: "bwrap" (namespaces, required), "rlimit" (none: where bubblewrap
    cannot create namespaces) or None (bubblewrap when installed)."""
    allow_unisolated: bool = False
    """Accept a sandbox that isolates by rlimits only (the agent and the tests could read the
    host's files, reach the network and signal the trainer's processes). Off: refused when the
    pool starts; on: the final step's info says `"isolation": "rlimit"`."""
    max_observation_chars: int = Field(default=8000, ge=200)
    """Tool output longer than this is cut (head and tail kept)."""
    dataset: Dataset = "auto"
    """The task file's published source: swe-bench (full, Lite, Verified, Multimodal), swe-gym,
    swe-smith, or auto (SWE-smith rows are told by their `image_name`; name swe-gym)."""
    image_template: str | None = None
    """Official-layout tasks: the image name as a template of the published one, e.g.
    `registry.local:5000/{image}` or `registry.local:5000/swe/{name}` ({instance_id} and
    {docker_id} too); None: the published name (envs/swe/official.py)."""
    writable_paths: tuple[str, ...] = ("/testbed",)
    """Official-layout tasks: image paths writable per sandbox and restored on reset (add the
    conda environment, `/opt/miniconda3/envs/testbed`, when an evaluation writes there)."""
    writable_mb: int = Field(default=2048, ge=16)
    """Size cap of each writable path (its bytes count against `memory_mb` too)."""
    pull_images: bool = True
    """Pull an official-layout task's image when this node lacks it (a missing image gives no
    reward, with the image named)."""
    image_budget_gb: float | None = Field(default=None, gt=0)
    """Disk the SWE images of a node may take; the least recently used unused ones are removed
    beyond it. None: no eviction."""
    service: SandboxService = Field(default_factory=SandboxService)
    """Where the pools live: this process, a pool actor per node of the Ray cluster, or a sandbox
    service (`workers.sandbox.choice`)."""

    @field_validator("image_template")
    @classmethod
    def _check_template(cls, template: str | None) -> str | None:
        return None if template is None else check_template(template, "params.image_template")


def task_image(task: SWETask, params: SWEParams) -> str:
    """The image a task runs in: its own, else the default (tarball tasks) or its published
    official-layout image under `params.image_template`."""
    if task.source is not None:
        return task.image or params.image
    return image_for(task, params.image_template, "params.image_template")


def task_pool_options(task: SWETask, params: SWEParams) -> tuple[SandboxProfile | None, ImagePolicy | None]:
    """The sandbox profile and image policy of a task's pool: official-layout tasks get their
    writable paths, pulled and managed images; tarball tasks the plain sandbox."""
    if task.source is not None:
        return None, None
    profile = SandboxProfile(writable_paths=params.writable_paths, writable_mb=params.writable_mb)
    return profile, ImagePolicy(pull=params.pull_images, manage=True, budget_gb=params.image_budget_gb)


def swe_task_to_task(swe: SWETask, params: SWEParams) -> Task:
    """The `Task` row of a SWE task: the prompt, and the record itself as hidden data."""
    user = (
        f"{swe.problem_statement}\n\nThe shell starts in the repository's root folder and file paths "
        f"are relative to it. You have {params.max_turns} turns and {params.token_budget} tokens."
    )
    return Task(
        id=swe.instance_id,
        prompt=[Message(role="system", content=SYSTEM_PROMPT), Message(role="user", content=user)],
        hidden={"swe": swe.model_dump(mode="json")},
        meta={"repo": swe.repo, "version": swe.version},
    )


def unavailable_message(task: SWETask, image: str, err: Exception) -> str:
    """Why a task's sandbox cannot start, naming what is missing."""
    if task.image_resident():
        return (
            f"{task.instance_id} needs the image {image}, which this node does not have and could not "
            f"get ({err}); pull it with `codeworld swe pull`, build a stand-in with `codeworld swe "
            "build-image`, "
            "or stand an sdist in for the repository with `codeworld swe from-sdist`."
        )
    return f"the sandbox for {task.instance_id} cannot start: {err}"


def clip(text: str, limit: int) -> str:
    """`text` cut to about `limit` characters, keeping its head and tail."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


@register_env("swe")
class SWEEnv(Environment):
    """Agentic SWE: bash / view / edit / create / submit in a sandbox, graded by hidden tests."""

    Params = SWEParams
    max_turns: ClassVar[int] = MAX_TURNS

    def __init__(self, params: SWEParams) -> None:
        super().__init__(params)
        self.params: SWEParams = params
        self._stack = contextlib.AsyncExitStack()
        """The episode's lease of its pool (released last) and its sandbox session."""
        self._session = contextlib.AsyncExitStack()
        """The episode's sandbox session (released before grading)."""
        self._workspace: Workspace | None = None
        self._broken = ""
        self.isolation: Isolation | None = None
        """What isolates this episode's sandbox (set by `reset`)."""
        self.turns = self.tokens = 0

    @classmethod
    def load_tasks(cls, params: SWEParams, data: Path | None, split: str) -> Sequence[Task]:
        path = resolve(data, "swebench_lite/test.json" if split == "test" else "swebench_lite/dev.json")
        return [swe_task_to_task(t, params) for t in load_swe_tasks(path, params.dataset)]

    async def reset(self, task: Task) -> Observation:
        self.swe = SWETask.model_validate(task.hidden["swe"])
        try:
            profile, images = task_pool_options(self.swe, self.params)
            self.pool = await shared_pool(
                self.params.backend,
                task_image(self.swe, self.params),
                self.params.pool_size,
                self.params.local_isolation,
                profile,
                images,
                lease=True,
                service=self.params.service,
            )
            self._stack.callback(release_pool, self.pool)
            self._stack.push_async_exit(self._session)
            self.isolation = require_isolation(self.pool, self.params.allow_unisolated, "params.allow_unisolated")
            box = await self._session.enter_async_context(self.pool.session())
            self._workspace = Workspace(box, self.swe, self.params.memory_mb)
            await self._workspace.prepare()
            await self._workspace.snapshot()
        except SandboxUnavailable as err:
            # Reported by the first step as a dropped sample (reward None), per the contract.
            self._broken = unavailable_message(self.swe, task_image(self.swe, self.params), err)
        except (SandboxFailure, SandboxError, ValueError) as err:
            self._broken = f"the episode's sandbox could not be prepared: {err}"
        return Observation(messages=task.prompt)

    async def step(self, action: Action) -> StepResult:
        self.turns += 1
        self.tokens += len(action.token_ids)
        if self._broken:
            return StepResult(done=True, reward=None, info={"error": self._broken})
        try:
            call = parse_tool_call(action.text)
        except ToolFormatError as err:
            output = f"Error: {err}"
        else:
            if call.name == "submit":
                return await self._finish("submitted")
            try:
                output = await self._run_tool(call)
            except PolicyFault as err:
                info = {"error": f"{call.name}: {err}", "turns": self.turns, "isolation": self._isolated_by()}
                return StepResult(done=True, reward=0.0, info=info)
            except (SandboxFailure, SandboxError) as err:
                return StepResult(done=True, reward=None, info={"error": f"sandbox failed during {call.name}: {err}"})
        if self.turns >= self.params.max_turns or self.tokens >= self.params.token_budget:
            return await self._finish("out of turns" if self.turns >= self.params.max_turns else "out of tokens")
        text = clip(output, self.params.max_observation_chars)
        footer = (
            f"[{self.params.max_turns - self.turns} turns and {self.params.token_budget - self.tokens} tokens left]"
        )
        return StepResult(
            observation=Observation(messages=[Message(role="user", content=f"{text}\n{footer}")]), done=False
        )

    async def _finish(self, reason: str) -> StepResult:
        """Take the diff, release the episode's sandbox, grade in a fresh one."""
        assert self._workspace is not None
        info: dict[str, Any] = {
            "reason": reason,
            "turns": self.turns,
            "tokens": self.tokens,
            "isolation": self._isolated_by(),
        }
        try:
            diff, skipped = await self._workspace.diff()
        except (PolicyFault, SandboxFailure, SandboxError) as err:
            # The policy's doing scores 0; the sandbox's own failure gives no reward.
            reward = 0.0 if isinstance(err, PolicyFault) else None
            info["error"] = f"could not read the diff: {err}"
            return StepResult(done=True, reward=reward, info=info)
        await self._session.aclose()  # the episode's sandbox goes back; the pool stays leased for grading
        from reward.swe import grade_swe  # swebench takes seconds to import; only grading needs it

        grade = await grade_swe(
            self.swe, diff, self.pool, timeout_s=self.params.test_timeout_s, memory_mb=self.params.memory_mb
        )
        info.update(diff=diff, skipped_files=skipped, grade=grade.model_dump())
        if grade.reward is None:
            info["error"] = grade.error
        return StepResult(done=True, reward=grade.reward, info=info)

    async def close(self) -> None:
        await self._stack.aclose()

    def _isolated_by(self) -> str | None:
        return self.isolation.value if self.isolation is not None else None

    async def _run_tool(self, call: ToolCall) -> str:
        assert self._workspace is not None
        # From the first tool that can change the sandbox on, its tree is the policy's doing.
        self._workspace.policy_acted |= call.name != "view"
        if call.name == "bash":
            return await self._bash(call.arg)
        files = await self._workspace.read_files([call.arg])
        current = files[call.arg]
        if call.name == "create":
            errors = await self._workspace.write_files({call.arg: call.text.encode()})
            if errors:
                return f"Error: could not write {call.arg}: {errors[call.arg]}"
            return f"{'Overwrote' if current is not None else 'Created'} {call.arg} ({call.text.count(chr(10))} lines)."
        if current is None:
            return f"Error: {call.arg} does not exist (paths are relative to the repository root)."
        text = current.decode("utf-8", errors="replace")
        if call.name == "view":
            return number_lines(text, call.start or 1, call.end if call.end is not None else -1)
        return await self._edit(call, text)

    async def _bash(self, command: str) -> str:
        assert self._workspace is not None
        out = await self._workspace.shell(command, self.params.command_timeout_s)
        if out.timed_out:
            status = (
                f"[timed out after {self.params.command_timeout_s:g} s and killed; the shell's directory "
                "and exports from this command were not kept]"
            )
        elif out.exit_code is None:
            status = (
                "[exit status unknown: the command replaced the shell's EXIT trap; its directory and "
                "exports were not kept]"
            )
        else:
            status = f"[exit code {out.exit_code}]"
        cut = " (output cut at 1 MiB)" if out.total_bytes > len(out.text.encode()) + 1 else ""
        return f"{out.text.rstrip()}\n{status}{cut}"

    async def _edit(self, call: ToolCall, text: str) -> str:
        assert self._workspace is not None
        count = text.count(call.search)
        if count != 1:
            where = "does not occur" if count == 0 else f"occurs {count} times"
            return f"Error: the SEARCH text {where} in {call.arg}; it must match exactly once."
        start_line = text[: text.index(call.search)].count("\n") + 1
        new_text = text.replace(call.search, call.text, 1)
        errors = await self._workspace.write_files({call.arg: new_text.encode()})
        if errors:
            return f"Error: could not write {call.arg}: {errors[call.arg]}"
        end_line = start_line + call.text.count("\n")
        return f"Edited {call.arg}. Lines {max(1, start_line - 2)}-{end_line + 2} now read:\n" + number_lines(
            new_text, max(1, start_line - 2), end_line + 2
        )


def number_lines(text: str, start: int, end: int) -> str:
    """Lines `start`..`end` (1-based, -1 = last) of `text`, each prefixed with its number."""
    lines = text.splitlines()
    last = len(lines) if end == -1 else min(end, len(lines))
    if start > max(len(lines), 1):
        return f"Error: the file has {len(lines)} lines; line {start} does not exist."
    return "\n".join(f"{i:6d}\t{lines[i - 1]}" for i in range(start, last + 1))
