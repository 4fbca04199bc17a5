"""A real Ray cluster on this machine: three containers that share nothing but a Docker network
(own IP, own /dev/shm, own /tmp; the code, its venv and the test's model mounted read-only),
started by deploy/local/cluster.sh with an external Redis that wants a password. Everything goes
in through `ray job submit`, as a user's run would.

* `--dry-run` against the live nodes prints which node gets which actor; impossible plans fail
  before any actor starts, naming the key.
* `codeworld train`: learner ranks on two nodes (`placement.learner: spread`), the vLLM engine on
  the third (`placement.engines: separate`), weights by broadcast, sandbox pools on every node;
  it trains to the weights of a plain synchronous loop within the staleness-0 test's tolerances.
* A push across nodes: engine and learner fp32 logprobs agree to 1e-4, and a bucket whose bytes
  are flipped in flight is refused while the engine keeps serving the previous version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rl.config import load_config
from rl.orchestrator import load_recorded

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "local" / "cluster.sh"
JOB_FILES = Path(__file__).resolve().parent / "cluster_job"
RAY = Path(sys.prefix) / "bin" / "ray"

TRAIN = """
run: {name: cluster, dir: /tmp/cw-run, steps: 3, record_batches: true}
model: {path: MODEL}
rollout: {max_tokens: 8, max_model_len: 128}
algorithm: {group_size: 4, batch_size: 4, max_staleness: 0}
learner: {world_size: 2, lr: 0.01}
placement: {learner: spread, engines: separate}
envs:
  - name: reply-length-sandboxed
    params: {sandbox: {backend: docker, size: 1, service: {kind: ray}}}
logging: {trackers: [], progress: false, plot: false, dashboard: {enabled: false}}
"""


@pytest.fixture(scope="module")
def cluster(tiny_model: str) -> Iterator[dict[str, str]]:
    """Head + 2 workers + Redis, removed again (sandboxes of its nodes too) however the tests end."""
    name = f"cwtest{os.getpid()}"
    env = {**os.environ, "CODEWORLD_CODE": str(REPO), "CODEWORLD_VENV": sys.prefix}
    try:
        up = subprocess.run(
            ["bash", str(SCRIPT), "up", "--name", name, "--workers", "2", "--sandboxes", "--mount", tiny_model],
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert up.returncode == 0, up.stderr[-3000:]
        info = dict(line.split("=", 1) for line in up.stdout.splitlines() if "=" in line)
        yield info | {"name": name}
    finally:
        subprocess.run(["bash", str(SCRIPT), "down", "--name", name], env=env, capture_output=True, timeout=300)
        left = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=codeworld.cluster={name}"], capture_output=True, text=True
        ).stdout.split()
        assert not left, f"containers of the test cluster are left: {left}"


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory: pytest.TempPathFactory, cluster: dict[str, str], tiny_model: str) -> Path:
    """What each job ships (its Ray working_dir): the environment plugin, the config, the check."""
    d = tmp_path_factory.mktemp("job")
    shutil.copytree(JOB_FILES, d, dirs_exist_ok=True)
    (d / "train.yaml").write_text(TRAIN.replace("MODEL", tiny_model))
    return d


def submit(cluster: dict[str, str], job_dir: Path, *entrypoint: str) -> tuple[bool, str]:
    """`ray job submit` from this machine; whether the job succeeded, and its output."""
    out = subprocess.run(
        [
            str(RAY),
            "job",
            "submit",
            "--address",
            cluster["RAY_ADDRESS"],
            "--working-dir",
            str(job_dir),
            "--",
            *entrypoint,
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    text = out.stdout + out.stderr
    return "succeeded" in text and out.returncode == 0, text


def actors(cluster: dict[str, str]) -> list[str]:
    """Classes of the actors jobs have ever started on the cluster (alive or dead), from its state
    API; Ray's own supervisor of each job aside."""
    from ray.util.state import list_actors

    found = list_actors(address=cluster["RAY_ADDRESS"], limit=10_000, raise_on_missing_output=False)
    return sorted(a.class_name for a in found if a.class_name != "JobSupervisor")


def test_dry_run_plans_on_the_live_nodes_and_refuses_impossible_plans(cluster, job_dir) -> None:
    bus = f"bus.redis_url={cluster['CODEWORLD_REDIS_URL']}"
    ok, out = submit(cluster, job_dir, "codeworld", "train", "train.yaml", bus, "--dry-run")
    assert ok, out[-4000:]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^(\d+\.\d+\.\d+\.\d+)\s+2\s+0\s+[\d.]+\s+(.*)$", out, re.M)}
    assert len(rows) == 3, out[-3000:]
    actors_of = sorted(rows.values())
    assert sum("learner rank" in a for a in actors_of) == 2 and sum("engine 0" in a for a in actors_of) == 1
    assert all("sandbox pool" in a for a in actors_of)
    assert not any("learner rank" in a and "engine" in a for a in actors_of), actors_of
    assert "weights: broadcast (weights.transport auto)" in out
    before = actors(cluster)
    for override, key in (
        ("learner.world_size=4", "placement.learner: spread puts each of learner.world_size (4)"),
        ("rollout.kv_cache_gib=200", "rollout.kv_cache_gib: an engine needs"),
    ):
        ok, out = submit(cluster, job_dir, "codeworld", "train", "train.yaml", bus, override, "--dry-run")
        assert not ok and f"codeworld: {key}" in out, out[-3000:]
    assert actors(cluster) == before, "an impossible plan must fail before any actor starts"


def test_training_across_nodes_matches_a_plain_synchronous_loop(
    cluster, job_dir, tiny_model: str, tmp_path: Path
) -> None:
    from test_train_loop import reference_loop  # the staleness-0 test's reference, same tolerances

    ok, out = submit(
        cluster, job_dir, "codeworld", "train", "train.yaml", f"bus.redis_url={cluster['CODEWORLD_REDIS_URL']}"
    )
    assert ok, out[-6000:]
    summary = json.loads(out[out.index("{\n") : out.index("\n}") + 2])
    assert summary["steps"] == 3 and summary["dropped"]["no_reward"] == 0
    run = tmp_path / "run"
    subprocess.run(["docker", "cp", f"{cluster['name']}-head:/tmp/cw-run", str(run)], check=True)
    cfg = load_config(job_dir / "train.yaml")
    batches = [load_recorded(run / "batches" / f"step_{s:06d}.msgpack") for s in range(1, 4)]
    for step, trajs in enumerate(batches, 1):  # on-policy: batch v sampled entirely by weights v
        assert {int(v) for t in trajs for v in t.policy_versions[t.loss_mask == 1]} == {step - 1}
    ref, ref_norms = reference_loop(tiny_model, batches, cfg)
    got = load_file(str(run / "model" / "model.safetensors"))
    initial = load_file(str(Path(tiny_model) / "model.safetensors"))
    moved = max(float((got[k] - initial[k]).abs().max()) for k in initial)
    numel = sum(v.numel() for v in initial.values())
    far = sum(int(((got[k] - ref[k]).abs() > 0.1 * cfg.learner.lr).sum()) for k in initial)
    mean = sum(float((got[k] - ref[k]).abs().sum()) for k in initial) / numel
    print(f"ranks on two nodes: {far} of {numel} elements over 0.1*lr, mean |diff| {mean:.1e} (moved {moved:.1e})")
    assert moved > 1e-3 and far <= 1e-3 * numel and mean <= 1e-3 * cfg.learner.lr
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    norms = [r["train/grad_norm"] for r in rows]
    assert norms[0] == pytest.approx(ref_norms[0], rel=1e-5) and norms[1:] == pytest.approx(ref_norms[1:], rel=1e-3)
    # Sandboxes ran on every node (the driver's node first, the overflow elsewhere), counted per node.
    nodes = {
        k.split("/")[1] for r in rows for k, v in r.items() if k.startswith("sandbox/") and k.endswith("/runs") and v
    }
    assert len(nodes) == 3, nodes
    assert max(r["train/mismatch_abs"] for r in rows) <= 1e-5  # learner vs sampler after cross-node pushes


def test_a_push_across_nodes_matches_and_a_corrupted_one_is_refused(cluster, job_dir, tiny_model: str) -> None:
    ok, out = submit(cluster, job_dir, "python", "check_push.py", tiny_model)
    assert ok, out[-6000:]
    result = json.loads(next(line for line in out.splitlines() if line.startswith('{"learner_node"')))
    print(result)
    assert result["learner_node"] != result["engine_node"] and result["transport"] == "broadcast"
    assert result["versions"] == [1] and result["max_logprob_diff"] <= 1e-4
    assert "bucket 1 of" in result["refused"] and "received bytes have checksum" in result["refused"]
    assert result["version_after_refusal"] == 1
    assert result["same_samples_after_refusal"] and result["same_logprobs_after_refusal"]
    assert result["accepted_after_refusal"] and result["version_at_end"] == 3
    assert result["push_bytes"] >= 4_000_000  # ~1 M fp32 parameters crossed the network
