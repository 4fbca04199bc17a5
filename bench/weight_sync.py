"""Seconds per weight update for a ~350 M model, each transport measured in the same run:

    .venv/bin/python bench/weight_sync.py [--pushes 3] [--bucket-mb 256]

1. file, one node: the learner (FSDP2, one rank) writes safetensors into /dev/shm, the engine
   checks its SHA-256 and reloads from it (the transport before the broadcast; 6.3 s measured).
2. broadcast, one node: the learner streams its shards in buckets over gloo into the engine,
   which verifies each bucket and loads the push.
3. broadcast, across nodes: the same between two containers of a local cluster
   (deploy/local/cluster.sh) that share nothing but a Docker network; the learner on one node,
   the engine on the other (`placement.engines: separate`).

An update is timed from the learner's first gather to the engine serving the new version; the
median of `--pushes` updates after one warm-up. The last line reads `across nodes: X s per update`.
The model is built locally (`codeworld model init-tiny` sizes) and never downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rl.tiny_model import TinyModelSpec, init_tiny  # noqa: E402

LARGE = TinyModelSpec(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=3328)
"""The ~350 M model bench/pipeline.py measured the file transport with."""


def _config(model: str, bucket_mb: float, transport: str, *overrides: str):
    from rl.config import load_config

    return load_config(
        None,
        [
            f"model.path={model}",
            "rollout.max_model_len=256",
            f"weights.bucket_mb={bucket_mb}",
            f"weights.transport={transport}",
            "envs=[{name: arithmetic}]",
            *overrides,
        ],
    )


def measure(model: str, bucket_mb: float, transport: str, pushes: int, *overrides: str) -> dict[str, float]:
    """Place a learner rank and an engine as `overrides` say, then time `pushes` updates."""
    import ray

    from rl.learner import LearnerGroup
    from rl.placement import reserve
    from rl.weights import WeightSync, exchange_dir
    from workers.rollout import EngineConfig, RolloutWorker

    cfg = _config(model, bucket_mb, transport, *overrides)
    placement = reserve(cfg)
    try:
        engine = RolloutWorker.remote_actor(
            EngineConfig(model_path=model, max_model_len=256), **placement.options(placement.plan.engines[0])
        )
        learner = LearnerGroup(model, cfg.learner, cfg.algorithm, 1.0, 0, placement)
        ray.get(engine.get_version.remote())
        sync = WeightSync(cfg.weights, [1], transport, exchange_dir("bench-weight-sync"), "float32")
        seconds = []
        for version in range(1, pushes + 2):
            start = time.perf_counter()
            sync.push(learner, [engine], version)
            seconds.append(time.perf_counter() - start)
            assert ray.get(engine.get_version.remote()) == version
        sync.close()
        ray.get(engine.shutdown.remote())
        learner.shutdown()
        nbytes = sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))
        median = statistics.median(seconds[1:])  # the first push warms up (imports, allocations)
        return {
            "seconds": median,
            "bytes_per_s": nbytes / median,
            "bytes": nbytes,
            "learner": placement.plan.learner[0].node.address,
            "engine": placement.plan.engines[0].node.address,
        }
    finally:
        placement.remove()


def on_this_machine(model: str, bucket_mb: float, pushes: int) -> dict[str, dict[str, float]]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        return {transport: measure(model, bucket_mb, transport, pushes) for transport in ("file", "broadcast")}
    finally:
        ray.shutdown()


def across_nodes(model: Path, bucket_mb: float, pushes: int) -> dict[str, float]:
    """The broadcast between two containers: a local cluster, this script as its job."""
    script = REPO / "deploy" / "local" / "cluster.sh"
    name = f"cwbench{os.getpid()}"
    env = {**os.environ, "CODEWORLD_CODE": str(REPO), "CODEWORLD_VENV": sys.prefix}
    try:
        up = subprocess.run(
            ["bash", str(script), "up", "--name", name, "--workers", "1", "--mount", str(model)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        address = next(line.split("=", 1)[1] for line in up.stdout.splitlines() if line.startswith("RAY_ADDRESS="))
        job = subprocess.run(
            [
                str(Path(sys.prefix) / "bin" / "ray"),
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                str(REPO / "bench"),
                "--",
                "python",
                "weight_sync.py",
                "--job",
                str(model),
                "--pushes",
                str(pushes),
                "--bucket-mb",
                str(bucket_mb),
            ],
            capture_output=True,
            text=True,
        )
        lines = [line for line in job.stdout.splitlines() if line.startswith('{"seconds"')]
        if not lines:
            raise RuntimeError(f"the cluster job failed:\n{(job.stdout + job.stderr)[-4000:]}")
        return json.loads(lines[-1])
    finally:
        subprocess.run(["bash", str(script), "down", "--name", name], env=env, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pushes", type=int, default=3, help="timed updates per transport (after one warm-up)")
    ap.add_argument("--bucket-mb", type=float, default=256, help="weights.bucket_mb of the broadcast")
    ap.add_argument("--job", metavar="MODEL", help=argparse.SUPPRESS)  # inside the cluster: measure, print JSON
    args = ap.parse_args()
    if args.job:
        import ray

        ray.init(log_to_driver=False)
        print(json.dumps(measure(args.job, args.bucket_mb, "broadcast", args.pushes, "placement.engines=separate")))
        return
    work = Path(tempfile.mkdtemp(prefix="cw-bench-sync-"))
    model = work / "large"
    try:
        params = init_tiny(model, LARGE)
        one_node = on_this_machine(str(model), args.bucket_mb, args.pushes)
        cluster = across_nodes(model, args.bucket_mb, args.pushes)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # 1.4 GB
    assert cluster["learner"] != cluster["engine"], cluster
    gb = one_node["file"]["bytes"] / 1e9
    print(
        f"weight sync, {params / 1e6:.0f} M params ({gb:.2f} GB fp32), median of {args.pushes} updates, "
        f"buckets of {args.bucket_mb:g} MiB:"
    )
    for label, r in (
        ("file, one node", one_node["file"]),
        ("broadcast, one node", one_node["broadcast"]),
        (f"broadcast, {cluster['learner']} -> {cluster['engine']}", cluster),
    ):
        print(f"  {label:<40}: {r['seconds']:6.2f} s per update, {r['bytes_per_s'] / 1e9:5.2f} GB/s")
    print(f"across nodes: {cluster['seconds']:.2f} s per update")


if __name__ == "__main__":
    main()
