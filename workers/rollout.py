"""`RolloutWorker`: a Ray actor owning one vLLM `AsyncLLM` engine.

Token in, token out: `generate` takes prompt token ids and returns, for each sample, the sampled
token ids, the sampler's logprob of each sampled token and the policy version that produced each
token. `update_weights` swaps weights while requests are in flight: pause (mode "keep") → reload
from the pushed checkpoint → reset the prefix cache (cached prefixes hold old-weight KV; running
requests are preempted and recompute theirs) → label the engine's weight version → resume. Each
token carries the version the engine held when it sampled it (vLLM's weight-version spans), so
tokens sampled after the swap carry the new version, and are sampled from KV computed entirely by
the new weights.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rl.weights import WeightPush, verify_push


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
    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(config.kv_cache_gib))),
           "TOKENIZERS_PARALLELISM": "false"}
    if config.cpu_cores is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = config.cpu_cores
    elif not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{max(0, (os.cpu_count() or 1) - 1)}"
    return env


class RolloutWorker:
    """Owns one vLLM AsyncLLM engine. Create it as a Ray actor with `RolloutWorker.remote_actor`."""

    def __init__(self, config: EngineConfig) -> None:
        os.environ.update(_engine_env(config))
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=config.model_path, dtype=config.dtype, max_model_len=config.max_model_len,
            enforce_eager=config.enforce_eager, seed=config.seed, enable_prefix_caching=True,
            logprobs_mode="processed_logprobs", gpu_memory_utilization=config.gpu_memory_utilization,
            worker_extension_cls="workers.vllm_extension.WeightSyncExtension",
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.version = 0
        self._ids = itertools.count()

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
            n=sampling.n, max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            seed=sampling.seed, logprobs=0, stop_token_ids=sampling.stop_token_ids,
            output_kind=RequestOutputKind.DELTA,
        )
        samples = [Generation(token_ids=[], logprobs=[], versions=[], finish_reason="length")
                   for _ in range(sampling.n)]
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
        """Verify the push's checksum, then swap weights without dropping in-flight requests.
        Returns the seconds generation was paused."""
        await asyncio.to_thread(verify_push, push)
        start = time.perf_counter()
        await self.engine.pause_generation(mode="keep", clear_cache=False)
        try:
            await self.engine.collective_rpc("load_pushed_weights", args=(str(push.path),))
            # Paused requests still hold KV blocks, and a plain reset refuses (returns False) while
            # any block is in use, silently leaving old-weight KV for every cached prompt prefix.
            # Preempting them frees their blocks; on resume they recompute under the new weights.
            if not await self.engine.reset_prefix_cache(reset_running_requests=True):
                raise RuntimeError("vLLM refused to reset its prefix cache after a weight update.")
            # The engine labels each step's outputs with this version as it produces them, so
            # tokens sampled before the pause keep the old label however late they are read.
            await self.engine.update_weight_version(str(push.version))
            self.version = push.version
        finally:
            await self.engine.resume_generation()
        return time.perf_counter() - start

    def shutdown(self) -> None:
        """Stop the engine and its processes."""
        self.engine.shutdown()

    @classmethod
    def remote_actor(cls, config: EngineConfig, **options: Any):  # -> ray.actor.ActorHandle
        """Start the worker as a Ray actor. On CPU it claims no Ray CPU: vLLM binds its own
        threads, and a CPU claim would starve the learner on small machines."""
        import ray

        defaults: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 1000,
                                    "runtime_env": {"env_vars": _engine_env(config)}}
        return ray.remote(cls).options(**(defaults | options)).remote(config)


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
        raise RuntimeError(f"vLLM returned weight-version spans {spans} that do not cover the {num_tokens} tokens "
                           f"of request {request_id}; the rollout worker needs vLLM's per-token weight versions.")
    # An engine never updated holds vLLM's initial label "default": the checkpoint it started from.
    return [0 if span.version == "default" else int(span.version)
            for span in spans for _ in range(span.end - span.start)]


def checkpoint_dir(path: str | Path) -> Path:
    """Validate an engine's model directory early, with a clear message."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.path {str(p)!r} is not a Hugging Face checkpoint directory "
                                "(no config.json); build one with `codeworld model init-tiny`.")
    return p
