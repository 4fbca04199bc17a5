"""The whole loop with the real parts: Ray actors, vLLM, Redis Streams, FSDP2 learner ranks."""

import asyncio
import collections
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from rl.config import load_config
from rl.loss import LossInputs, group_advantages, policy_loss, token_logprobs
from rl.orchestrator import load_recorded, run_training

REPO = Path(__file__).resolve().parents[2]


def sync_config(tmp_path: Path, model: str, redis_url: str, steps: int, *overrides: str):
    return load_config(
        None,
        [
            "run.name=sync0",
            f"run.dir={tmp_path / 'run'}",
            f"run.steps={steps}",
            "run.record_batches=true",
            f"model.path={model}",
            "rollout.max_tokens=8",
            "rollout.max_model_len=128",
            "algorithm.group_size=4",
            "algorithm.batch_size=4",
            "algorithm.max_staleness=0",
            "learner.world_size=2",
            "learner.lr=0.01",
            "logging.trackers=[]",
            "logging.progress=false",
            "envs=[{name: test-reply-length}]",
            f"bus.redis_url={redis_url}",
            *overrides,
        ],
    )


def reference_loop(model_dir: str, batches: list[list], cfg) -> tuple[dict[str, torch.Tensor], list[float]]:
    """A plain synchronous loop over the same trajectories: one process, no FSDP, no Ray, no bus.
    Samples are packed into the learner's micro-batches so that float sums run in the same order
    (AdamW turns reordering noise on near-zero gradients into visible weight differences)."""
    from rl.batching import TrainSample, micro_batches
    from rl.parallelize import load_model

    model = load_model(model_dir, cfg.learner.attention)
    norms = []
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr, betas=cfg.learner.betas, weight_decay=0.0)
    for trajs in batches:
        groups = collections.defaultdict(list)
        for t in trajs:
            groups[t.group_id].append(t)
        samples = [
            TrainSample(
                input_ids=np.concatenate([t.prompt_ids, t.completion_ids]),
                prompt_len=len(t.prompt_ids),
                loss_mask=t.loss_mask,
                sampler_logprobs=t.sampler_logprobs,
                advantage=a,
            )
            for g in groups.values()
            if len({t.reward for t in g}) > 1
            for t, a in zip(g, group_advantages([t.reward for t in g], True))
        ]
        total = sum(int(s.loss_mask.sum()) for s in samples)
        if not samples:  # the learner skips a step whose groups all had equal rewards
            norms.append(None)
            continue
        opt.zero_grad()
        for mb in micro_batches(samples, cfg.learner.micro_batch_tokens):
            logp, _ = token_logprobs(model(**mb.model_inputs()).logits[0], mb.targets, 1.0)
            inputs = LossInputs(
                logp=logp,
                prox=logp.detach(),
                sampler=mb.sampler,
                advantages=mb.advantages,
                mask=mb.mask,
                weights=torch.full_like(mb.mask, 1 / total),
                seq=mb.seq,
                ages=mb.ages,
            )
            policy_loss(inputs, cfg.algorithm).loss_sum.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.learner.grad_clip)))
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}, norms


@pytest.mark.parametrize("world_size", [1, 2])
def test_staleness_zero_matches_a_plain_synchronous_loop(
    tmp_path: Path, tiny_model: str, redis_url: str, ray_session: None, world_size: int
) -> None:
    steps = 3
    cfg = sync_config(tmp_path, tiny_model, redis_url, steps)
    cfg.learner.world_size = world_size
    summary = asyncio.run(run_training(cfg))
    assert summary.steps == steps
    batches = [load_recorded(cfg.run.dir / "batches" / f"step_{s:06d}.msgpack") for s in range(1, steps + 1)]
    for step, trajs in enumerate(batches, 1):
        assert len(trajs) == cfg.algorithm.batch_size * cfg.algorithm.group_size
        # on-policy: every token of batch v was sampled by weights v
        assert {int(v) for t in trajs for v in t.policy_versions[t.loss_mask == 1]} == {step - 1}
    ref, ref_norms = reference_loop(tiny_model, batches, cfg)
    got = load_file(str(cfg.run.dir / "model" / "model.safetensors"))
    initial = load_file(str(Path(tiny_model) / "model.safetensors"))
    moved = max(float((got[k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-3, "training must have changed the weights for the comparison to mean anything"
    diff = max(float((got[k] - ref[k]).abs().max()) for k in initial)
    off = sum(int(((got[k] - ref[k]).abs() > 1e-6).sum()) for k in initial)
    far = sum(int(((got[k] - ref[k]).abs() > 0.1 * cfg.learner.lr).sum()) for k in initial)
    numel = sum(v.numel() for v in initial.values())
    mean = sum(float((got[k] - ref[k]).abs().sum()) for k in initial) / numel
    print(
        f"world_size {world_size}: max |weight diff| vs plain loop = {diff:.2e}, {off} of {numel} elements "
        f"over 1e-6, {far} over 0.1*lr, mean {mean:.1e} (weights moved up to {moved:.2e})"
    )
    rows = (cfg.run.dir / "metrics.jsonl").read_text().splitlines()
    # AdamW is blind to a gradient's scale: the pre-clip gradient norm catches scaling errors.
    # Step 1 starts from identical weights; later steps start from weights that two ranks already
    # moved by reduction-order noise (below), which shifts their norms by ~1e-5 relative, while a
    # lost or doubled shard moves a norm by tens of percent.
    norms = [json.loads(r).get("train/grad_norm") for r in rows]
    assert norms[0] == pytest.approx(ref_norms[0], rel=1e-5)
    assert norms[1:] == pytest.approx(ref_norms[1:], rel=1e-5 if world_size == 1 else 1e-3)
    if world_size == 1:
        assert diff <= 1e-6
    else:
        # Two ranks sum gradients in another order (~1e-7 relative). AdamW's m/sqrt(v) turns that
        # into steps of up to ~lr where a gradient is ~0 (so the max is no signal), and later
        # steps spread it thinly; a lost or doubled shard instead moves the gradient norm and a
        # large share of the weights by ~lr.
        assert far <= 1e-3 * numel and mean <= 1e-3 * cfg.learner.lr
    assert len(rows) == steps and (cfg.run.dir / "reward_curve.png").stat().st_size > 1000
    first = json.loads(rows[0])
    assert "train/mismatch_kl" in first and first["train/staleness/0"] == 16


def test_dynamic_sampling_replaces_groups_without_signal_in_the_loop(
    tmp_path: Path, tiny_model: str, redis_url: str, ray_session: None
) -> None:
    """Half the tasks reward every reply alike. Under dynamic sampling their groups are replaced,
    counted and written to the ledger, and each step trains `batch_size` groups that all carry a
    signal, sampled within the staleness bound."""
    steps = 3
    overrides = ["envs=[{name: test-half-flat}]", "algorithm.dynamic_sampling=true", "algorithm.max_staleness=1"]
    cfg = sync_config(tmp_path, tiny_model, redis_url, steps, *overrides, "learner.world_size=1")
    assert asyncio.run(run_training(cfg)).steps == steps
    for step in range(1, steps + 1):
        groups = collections.defaultdict(list)
        for t in load_recorded(cfg.run.dir / "batches" / f"step_{step:06d}.msgpack"):
            groups[t.group_id].append(t)
            assert step - 1 - int(t.policy_versions[t.loss_mask == 1].min()) <= cfg.algorithm.effective_max_age
        assert len(groups) == cfg.algorithm.batch_size
        assert all(len({t.reward for t in g}) > 1 for g in groups.values())
    rows = [json.loads(r) for r in (cfg.run.dir / "metrics.jsonl").read_text().splitlines()]
    replaced = sum(r.get("train/dropped/zero_variance_replaced", 0) for r in rows)
    ledger = [json.loads(r) for r in (cfg.run.dir / "ledger.jsonl").read_text().splitlines()]
    in_ledger = sum(1 for r in ledger if r.get("reason") == "zero_variance")
    assert replaced >= cfg.algorithm.group_size and in_ledger >= replaced


def _service_pids() -> set[int]:
    names = ("raylet", "gcs_server", "redis-server", "EngineCore", "ray::", "VLLM")
    found = set()
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        text = (p.info["name"] or "") + " " + " ".join(p.info["cmdline"] or [])
        if any(n in text for n in names):
            found.add(p.info["pid"])
    return found


def test_ctrl_c_stops_everything_it_started(tmp_path: Path, tiny_model: str) -> None:
    before = _service_pids()
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rl.cli",
            "train",
            str(REPO / "examples/demo.yaml"),
            f"model.path={tiny_model}",
            f"run.dir={run_dir}",
            "run.name=ctrlc",
            "run.steps=1000",
            "eval.sets=[]",
            "algorithm.batch_size=4",
            "logging.progress=false",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=False,
    )
    deadline = time.time() + 600
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "the run never finished a step"
        time.sleep(1)
    # The test runner's own Ray instance (the session fixture) may start workers meanwhile: only
    # processes outside the runner's tree, or inside the run's, count as the run's.
    run_tree = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
    runner_own = {c.pid for c in psutil.Process().children(recursive=True)} - run_tree - {proc.pid}
    started = _service_pids() - before - runner_own
    assert started, "the run should have started Ray, vLLM and Redis processes"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out.decode()[-3000:]
    time.sleep(3)
    leaked = {p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
    assert not leaked, [psutil.Process(p).cmdline() for p in leaked]
