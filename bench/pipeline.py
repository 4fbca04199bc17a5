"""Pipeline throughput against the bare engine, and weight-push time, measured in one run.

    .venv/bin/python bench/pipeline.py [--groups 32] [--group-size 8] [--max-tokens 48] [--skip-large]

1. Pipeline: the orchestrator's real path — admission → EpisodeRunner → RolloutWorker (Ray actor,
   vLLM) → arithmetic reward (math-verify pool) → Redis stream — for `groups` × `group-size`
   episodes; tokens/s = model tokens that reached the bus / wall time from first admission.
2. Bare engine: one vLLM AsyncLLM in this process, the same prompts, samples and sampling limits,
   all submitted at once (one n = group-size request per prompt); tokens/s = generated tokens /
   wall time.
3. Weight push: learner (FSDP2, 1 rank) → safetensors in /dev/shm → checksum → every engine's
   pause/reload/resume, for the ~1 M tiny model and a ~350 M model built by `init-tiny`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.config import load_config  # noqa: E402
from rl.tiny_model import TinyModelSpec, init_tiny  # noqa: E402

LARGE = TinyModelSpec(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=3328)


async def pipeline_tokens_per_s(
    model: str, groups: int, group_size: int, max_tokens: int
) -> tuple[float, list[list[int]]]:
    """Run the generation side of the orchestrator until `groups` groups are on the bus."""
    from rl.orchestrator import Orchestrator

    cfg = load_config(
        None,
        [
            "run.name=bench-pipeline",
            f"run.dir={tempfile.mkdtemp()}",
            f"model.path={model}",
            f"rollout.max_tokens={max_tokens}",
            "rollout.max_model_len=256",
            f"algorithm.group_size={group_size}",
            f"algorithm.batch_size={groups}",
            "algorithm.max_staleness=0",
            "logging.trackers=[]",
            "envs=[{name: arithmetic}]",
        ],
    )
    orc = Orchestrator(cfg)
    try:
        await orc.start()
        await asyncio.gather(*(w.generate.remote([1, 2, 3], _sampling(1, 4)) for w in orc.workers))  # warm-up
        start = time.perf_counter()
        orc._spawn(orc.produce())
        got: list = []
        while len(got) < groups * group_size:
            got += [t for _, t in await orc.bus.aread(count=4096, block_ms=200)]
        wall = time.perf_counter() - start
        prompts = [list(map(int, t.prompt_ids)) for t in got[::group_size]]
        return sum(t.num_model_tokens for t in got) / wall, prompts
    finally:
        await orc.stop()


def _sampling(n: int, max_tokens: int):
    from workers.rollout import Sampling

    return Sampling(n=n, max_tokens=max_tokens, temperature=1.0, seed=0)


async def bare_tokens_per_s(model: str, prompts: list[list[int]], group_size: int, max_tokens: int) -> float:
    """The same prompts straight into one AsyncLLM, all at once."""
    os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(model=model, dtype="float32", max_model_len=256, enforce_eager=True, enable_prefix_caching=True)
    )
    # One request of n = group_size samples per prompt: how a group is best asked of a bare engine.
    params = SamplingParams(n=group_size, max_tokens=max_tokens, temperature=1.0, logprobs=0)

    async def one(i: int, prompt: list[int]) -> int:
        last = None
        # `engine` is a closure cell that the `del` below empties after the last call.
        async for out in engine.generate({"prompt_token_ids": prompt}, params, f"b{i}"):  # noqa: F821
            last = out
        return sum(len(o.token_ids) for o in last.outputs)

    try:
        await one(-1, [1, 2, 3])
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return sum(counts) / (time.perf_counter() - start)
    finally:
        engine.shutdown()
        # Its __del__ shuts down again: let that happen now, not at interpreter exit when vLLM's
        # module globals are already gone (a TypeError printed after the figures).
        del engine


def push_seconds(model: str, pushes: int = 3) -> dict[str, float]:
    """Seconds per weight push: publish (gather + safetensors + checksum) and engine reload."""
    import ray

    from rl.config import AlgorithmSection, LearnerSection
    from rl.learner import LearnerGroup
    from rl.weights import exchange_dir
    from workers.rollout import EngineConfig, RolloutWorker

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        worker = RolloutWorker.remote_actor(EngineConfig(model_path=model, max_model_len=256))
        learner = LearnerGroup(model, LearnerSection(), AlgorithmSection(), 1.0, 0)
        ray.get(worker.get_version.remote())
        root = exchange_dir("bench-push")
        publish_s, reload_s, total_s = [], [], []
        for v in range(1, pushes + 1):
            t0 = time.perf_counter()
            push = learner.publish(root, v)
            t1 = time.perf_counter()
            paused = ray.get(worker.update_weights.remote(push))
            publish_s.append(t1 - t0)
            reload_s.append(paused)
            total_s.append(time.perf_counter() - t0)
        size = push.num_bytes / 1e9
        ray.get(worker.shutdown.remote())
        learner.shutdown()
        return {
            "GB": size,
            "publish_s": statistics.median(publish_s),
            "engine_paused_s": statistics.median(reload_s),
            "total_s": statistics.median(total_s),
        }
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--skip-large", action="store_true", help="skip the ~350 M push measurement")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cw-bench-"))
    tiny = work / "tiny"
    init_tiny(tiny, TinyModelSpec())
    pipe, prompts = asyncio.run(pipeline_tokens_per_s(str(tiny), args.groups, args.group_size, args.max_tokens))
    bare = asyncio.run(bare_tokens_per_s(str(tiny), prompts, args.group_size, args.max_tokens))
    print(f"throughput, {args.groups} groups x {args.group_size} samples, <= {args.max_tokens} tokens, tiny model:")
    print(f"  bare vLLM engine : {bare:8.0f} tokens/s")
    print(f"  whole pipeline   : {pipe:8.0f} tokens/s")
    print(f"  ratio pipeline/bare = {pipe / bare:.2f}  (goal >= 0.9)")
    sizes = [("tiny (~1 M)", tiny)]
    if not args.skip_large:
        large = work / "large"
        n = init_tiny(large, LARGE)
        sizes.append((f"large ({n / 1e6:.0f} M)", large))
    for label, path in sizes:
        r = push_seconds(str(path))
        print(
            f"weight push {label}: {r['GB']:.3f} GB, publish {r['publish_s']:.2f} s, engine paused "
            f"{r['engine_paused_s']:.2f} s, total {r['total_s']:.2f} s per update (median of 3)"
        )


if __name__ == "__main__":
    main()
