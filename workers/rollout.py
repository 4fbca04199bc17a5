"""`RolloutWorker`: a Ray actor owning one vLLM `AsyncLLM` engine.

Token in, token out: `generate` takes prompt token ids and returns, for each sample, the sampled
token ids, the sampler's logprob of each sampled token and the policy version that produced each
token. A weight swap happens while requests are in flight: pause (mode "keep") → load → reset
the prefix cache (cached prefixes hold old-weight KV; running requests are preempted and recompute
theirs) → label the engine's weight version → resume. Each token carries the version the engine
held when it sampled it (vLLM's weight-version spans), so tokens sampled after the swap carry the
new version, and are sampled from KV computed entirely by the new weights. The load comes from a
pushed file (`update_weights`, one node) or from the learner's broadcast (`start_weight_update` →
`receive_bucket`... → `finish_weight_update`, any node; see `workers.weight_transfer`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from workers.weight_transfer import (
    GLOO_BACKEND,
    NCCL_BACKEND,
    Endpoint,
    WeightPush,
    WeightTransferRefused,
    verify_push,
)


class EngineConfig(BaseModel):
    """How one vLLM engine is started."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model_path: str
    """Hugging Face checkpoint directory the engine starts from (version 0)."""
    dtype: str = "float32"
    """Engine dtype; fp32 makes sampler logprobs match the learner's to ~1e-6."""
    max_model_len: int = 1024
    """Longest sequence accepted."""
    enforce_eager: bool = True
    """Skip torch.compile and CUDA graphs."""
    kv_cache_gib: float = 1.0
    """CPU KV-cache size (VLLM_CPU_KVCACHE_SPACE)."""
    cpu_cores: str | None = None
    """CPU cores the engine's OpenMP threads bind to (VLLM_CPU_OMP_THREADS_BIND, e.g. "1" or
    "0-3"); None: all cores, unless that variable is already set."""
    gpu_memory_utilization: float = 0.5
    """Share of GPU memory for the engine (GPU only)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs the engine shards the model over (worker processes of its own, on one node)."""
    seed: int = 0
    """Engine seed."""


class Sampling(BaseModel):
    """Sampling parameters of one `generate` call."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    n: int = Field(1, ge=1)
    """Samples of the same prompt."""
    max_tokens: int = Field(32, ge=1)
    """Token limit per sample."""
    temperature: float = Field(1.0, ge=0)
    """0 means greedy."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling."""
    seed: int | None = None
    """Per-request seed for reproducible samples (sample i uses seed + i). Not with weight updates
    in flight on CPU: a preempted seeded request kills vLLM's CPU engine."""
    stop_token_ids: list[int] = Field(default_factory=list)
    """Extra tokens that end a turn (the tokenizer's EOS always does)."""


class Generation(BaseModel):
    """One sample."""

    model_config = ConfigDict(extra="forbid")

    token_ids: list[int]
    """Sampled token ids (the stop token included when one ended the sample)."""
    logprobs: list[float]
    """The sampler's logprob of each sampled token, after temperature scaling."""
    versions: list[int]
    """The policy version that sampled each token."""
    finish_reason: str
    """"stop" (end-of-turn token) or "length" (token limit)."""


def _engine_env(config: EngineConfig) -> dict[str, str]:
    """Environment for the engine's processes; set before vLLM spawns them."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(config.kv_cache_gib))),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if config.cpu_cores is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = config.cpu_cores
    elif not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{max(0, (os.cpu_count() or 1) - 1)}"
    return env


class RolloutWorker:
    """Owns one vLLM AsyncLLM engine. Create it as a Ray actor with `RolloutWorker.remote_actor`."""

    def __init__(self, config: EngineConfig) -> None:
        os.environ.update(_engine_env(config))
        import torch
        from vllm import AsyncEngineArgs
        from vllm.config import WeightTransferConfig
        from vllm.v1.engine.async_llm import AsyncLLM

        import workers.vllm_extension  # noqa: F401  (registers the broadcast backends)

        args = AsyncEngineArgs(
            model=config.model_path,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            enforce_eager=config.enforce_eager,
            seed=config.seed,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
            gpu_memory_utilization=config.gpu_memory_utilization,
            tensor_parallel_size=config.tensor_parallel_size,
            # Worker processes of this actor, on the GPUs Ray gave it; the "ray" executor would
            # place them itself, outside the run's placement group.
            distributed_executor_backend="mp" if config.tensor_parallel_size > 1 else None,
            worker_extension_cls="workers.vllm_extension.WeightSyncExtension",
            weight_transfer_config=WeightTransferConfig(
                backend=NCCL_BACKEND if torch.cuda.is_available() else GLOO_BACKEND
            ),
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.version = 0
        self.tensor_parallel_size = config.tensor_parallel_size
        self._ids = itertools.count()
        self._receiving = False

    def get_version(self) -> int:
        return self.version

    def errored(self) -> bool:
        """Whether the vLLM engine is dead (its core process exited). A call already waiting in
        vLLM when the core dies may never return (the weight push was seen to), so the engine
        supervisor polls this instead of waiting for the call's deadline."""
        return bool(self.engine.errored)

    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> list[Generation]:
        """Sample `sampling.n` completions of `prompt_ids` as one vLLM request (its parallel
        sampling: one prefill, and sample i seeded with seed + i when a seed is given)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=sampling.n,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            logprobs=0,
            stop_token_ids=sampling.stop_token_ids,
            output_kind=RequestOutputKind.DELTA,
        )
        samples = [
            Generation(token_ids=[], logprobs=[], versions=[], finish_reason="length") for _ in range(sampling.n)
        ]
        request_id = f"r{next(self._ids)}"
        async for out in self.engine.generate({"prompt_token_ids": prompt_ids}, params, request_id):
            for delta in out.outputs:
                sample = samples[delta.index]
                for tok, lp in zip(delta.token_ids, delta.logprobs or [], strict=True):
                    sample.token_ids.append(tok)
                    sample.logprobs.append(lp[tok].logprob)
                if delta.finish_reason is not None:
                    sample.finish_reason = delta.finish_reason
                    sample.versions = _token_versions(delta.weight_versions, len(sample.token_ids), request_id)
        return samples

    async def update_weights(self, push: WeightPush) -> float:
        """File transport: verify the push's checksum, then swap weights without dropping in-flight
        requests. Returns the seconds generation was paused."""
        await asyncio.to_thread(verify_push, push)
        start = time.perf_counter()
        await self.engine.pause_generation(mode="keep", clear_cache=False)
        try:
            await self.engine.collective_rpc("load_pushed_weights", args=(str(push.path),))
            await self._after_load(push.version)
        finally:
            await self.engine.resume_generation()
        return time.perf_counter() - start

    async def _after_load(self, version: int) -> None:
        # Paused requests still hold KV blocks, and a plain reset refuses (returns False) while
        # any block is in use, silently leaving old-weight KV for every cached prompt prefix.
        # Preempting them frees their blocks; on resume they recompute under the new weights.
        if not await self.engine.reset_prefix_cache(reset_running_requests=True):
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update.")
        # The engine labels each step's outputs with this version as it produces them, so tokens
        # sampled before the pause keep the old label however late they are read.
        await self.engine.update_weight_version(str(version))
        self.version = version

    # --------------------------------------------------------------- broadcast transport
    # The learner drives these through `rl.weights.EngineFleet` (vLLM's weight-sync client
    # protocol): init once, then per push start → one receive_bucket per bucket → finish, or abort.
    async def init_weight_transfer(self, endpoint: Endpoint) -> None:
        """Join the learner's transfer group (blocks until every member has joined)."""
        import ray
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        endpoint = endpoint.model_copy(update={"local_address": ray.util.get_node_ip_address()})
        request = WeightTransferInitRequest(init_info=endpoint.model_dump())
        await self.engine.init_weight_transfer_engine(request)

    async def start_weight_update(self) -> None:
        """Pause generation (in-flight requests wait, keeping their KV) and start staging a push."""
        await self.engine.pause_generation(mode="keep", clear_cache=False)
        self._receiving = True
        try:
            await self.engine.start_weight_update()
        except BaseException:
            await self._end_receiving()
            raise

    async def receive_bucket(self, bucket: dict[str, Any]) -> None:
        """Receive, verify and stage one bucket; a refused bucket ends the push with the previous
        weights still loaded and generation resumed."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        try:
            await self.engine.update_weights(WeightTransferUpdateRequest(update_info=bucket))
        except Exception as err:
            # vLLM has ended its update session and the engine dropped what it had staged.
            await self._end_receiving()
            raise WeightTransferRefused(f"engine at v{self.version} refused the push: {_reason(err)}") from None

    async def finish_weight_update(self, version: int) -> float:
        """Load the staged push as `version` if it is whole, reset the prefix cache and resume.
        Returns the seconds the load took (generation was paused for the whole push)."""
        start = time.perf_counter()
        problem = await self.engine.collective_rpc("staged_update_problem", args=(version,))
        if any(problem):
            await self.abort_weight_update()
            reason = next(p for p in problem if p)
            raise WeightTransferRefused(f"engine at v{self.version} refused the push: {reason}")
        try:
            await self.engine.finish_weight_update()
            await self._after_load(version)
        finally:
            await self._end_receiving()
        return time.perf_counter() - start

    async def abort_weight_update(self) -> None:
        """End a push that will not complete: drop what was staged, keep serving the old weights."""
        if not self._receiving:
            return
        try:
            await self.engine.collective_rpc("discard_staged_update")
            await self.engine.finish_weight_update()  # ends vLLM's session; loads nothing
        finally:
            await self._end_receiving()

    async def _end_receiving(self) -> None:
        self._receiving = False
        await self.engine.resume_generation()

    def shutdown(self) -> None:
        """Stop the engine and its processes."""
        self.engine.shutdown()

    @classmethod
    def remote_actor(cls, config: EngineConfig, **options: Any):  # -> ray.actor.ActorHandle
        """Start the worker as a Ray actor. On CPU it claims no Ray CPU: vLLM binds its own
        threads, and a CPU claim would starve the learner on small machines."""
        import ray

        env = _engine_env(config)
        if config.cpu_cores is None:  # "all cores" means the engine's node's cores, not this one's
            env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        defaults: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 1000, "runtime_env": {"env_vars": env}}
        return ray.remote(cls).options(**(defaults | options)).remote(config)


def _reason(err: BaseException) -> str:
    """The engine worker's own sentence, without the RPC layers' wrapping ("Call to collective_rpc
    method failed: Worker failed with error '...', please check the stack trace above ...")."""
    text = " ".join(str(err).split())
    inner = re.search(r"Worker failed with error '(.*)', please check", text)
    return inner.group(1) if inner else text or type(err).__name__


def _token_versions(spans: list[Any] | None, num_tokens: int, request_id: str) -> list[int]:
    """Per-token policy versions from vLLM's weight-version spans (`CompletionOutput.weight_versions`).

    The engine core stamps every step's outputs with the version it held while producing them
    (versions change only while generation is paused), so a token produced under the old weights
    but read after a swap keeps the old version. Tagging tokens with the worker's version as they
    are *read* got this wrong whenever the reader lagged: vLLM merges unread deltas, and old and
    new tokens arrived in one delta."""
    if num_tokens == 0:
        return []
    if not spans or spans[0].start != 0 or spans[-1].end != num_tokens:
        raise RuntimeError(
            f"vLLM returned weight-version spans {spans} that do not cover the {num_tokens} tokens "
            f"of request {request_id}; the rollout worker needs vLLM's per-token weight versions."
        )
    # An engine never updated holds vLLM's initial label "default": the checkpoint it started from.
    return [
        0 if span.version == "default" else int(span.version) for span in spans for _ in range(span.end - span.start)
    ]


def checkpoint_dir(path: str | Path) -> Path:
    """Validate an engine's model directory early, with a clear message."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path {str(p)!r} is not a Hugging Face checkpoint directory "
            "(no config.json); build one with `codeworld model init-tiny`."
        )
    return p
