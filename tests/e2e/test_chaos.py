"""Chaos: real runs (Ray, vLLM, Redis, Docker, the tiny model) with one part killed mid-run by
SIGKILL — the vLLM engine process, a learner rank, the run's redis-server, dockerd, the driver
itself (then `--resume`) — plus an engine that stops answering (SIGSTOP), deliberately slow groups
for fifty steps, and resume exactness. Every run must reach its step count with a ledger that
trained no id twice and accounts for every id published on the bus.

Only processes these tests started are signalled: descendants of this test process (the session's
Ray and what the run started in it) or of the driver it launched, born after the run began —
except dockerd, which the suite shares and which is always brought back (as
tests/workers/sandbox/test_sandbox_faults.py does)."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
import pytest
import torch

from rl.config import Config, load_config
from rl.faults import StopResumable
from rl.ledger import read_ledger
from rl.metrics import read_rows
from rl.orchestrator import RunSummary, load_recorded, run_training

pytestmark = pytest.mark.chaos
REPO = Path(__file__).resolve().parents[2]
DOCKERD_LOG = "/var/log/codeworld-dockerd.log"


def chaos_config(tmp_path: Path, model: str, name: str, steps: int, *extra: str) -> Config:
    return load_config(
        None,
        [
            f"run.name={name}",
            f"run.dir={tmp_path / 'run'}",
            f"run.steps={steps}",
            f"model.path={model}",
            "rollout.max_tokens=8",
            "rollout.max_model_len=128",
            "algorithm.group_size=2",
            "algorithm.batch_size=2",
            "algorithm.max_staleness=1",
            "learner.lr=0.01",
            "logging.trackers=[]",
            "logging.progress=false",
            "logging.dashboard.enabled=false",
            "logging.plot=false",
            "envs=[{name: test-reply-length}]",
            "eval.sets=[]",
            "checkpoint.every=2",
            *extra,
        ],
    )


def our_processes(marker: str, since: float, root: int | None = None) -> list[psutil.Process]:
    """Descendants of `root` (this process) whose name or command line holds `marker`, started
    after `since`."""
    found = []
    for p in psutil.Process(root).children(recursive=True):
        try:
            text = p.name() + " " + " ".join(p.cmdline())
            if marker in text and p.create_time() >= since - 1:
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


async def step_reached(run_dir: Path, step: int, within_s: float = 900) -> None:
    deadline = time.monotonic() + within_s
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and any(r.get("step", 0) >= step and "train/version" in r for r in read_rows(path)):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the run never reached step {step}")


def run_with_fault(cfg: Config, fault: Callable[[], Awaitable[None]], resume: str | None = None) -> RunSummary:
    async def both() -> RunSummary:
        killer = asyncio.ensure_future(fault())
        try:
            summary = await run_training(cfg, resume)
        finally:
            if not killer.done():
                killer.cancel()
        await killer  # a fault that did not happen fails the test
        return summary

    return asyncio.run(both())


def print_recovery(fault: str, run_dir: Path, killed_at: float) -> None:
    """Seconds from the kill to the next learner step (bench/recovery.py measures the same)."""
    row = next(r for r in read_rows(run_dir / "metrics.jsonl") if "train/version" in r and r["time"] > killed_at)
    print(f"recovery [{fault}]: {row['time'] - killed_at:.1f} s from the kill to the next learner step ({row['step']})")


def check_accounts(run_dir: Path, summary: RunSummary, steps: int) -> dict[str, int]:
    """0 ids trained twice, every published id accounted for once, every step's metrics row once;
    returns the drops by reason."""
    assert summary.steps == steps and summary.stopped is None, summary
    lines = read_ledger(run_dir / "ledger.jsonl")
    ids = collections.Counter(line.id for line in lines)
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1][:5]  # one fate per id, so none trained twice
    entries = [line.entry for line in lines if line.entry is not None]
    assert len(entries) == len(set(entries)) == summary.bus_published, (len(entries), summary.bus_published)
    t = summary.ledger
    assert t.open == 0 and t.refused == 0 and t.generated == t.trained + t.dropped == len(lines), t
    assert t.trained == sum(1 for line in lines if line.fate == "trained") > 0
    rows = [r["step"] for r in read_rows(run_dir / "metrics.jsonl") if "train/version" in r]
    assert rows == list(range(1, steps + 1)), rows
    return t.by_reason


# ----------------------------------------------------------------------------------------- engines
async def kill_the_engine(run_dir: Path, began: float, killed: list[float]) -> None:
    await step_reached(run_dir, 2)
    [core] = our_processes("VLLM::EngineCore", began)
    core.send_signal(signal.SIGKILL)
    killed.append(time.time())


def test_engine_process_killed_mid_run_is_restarted(
    tmp_path: Path, tiny_model: str, redis_url: str, ray_session: None
) -> None:
    cfg = chaos_config(tmp_path, tiny_model, "chaos-engine", 6, f"bus.redis_url={redis_url}")
    began, killed = time.time(), []
    summary = run_with_fault(cfg, lambda: kill_the_engine(cfg.run.dir, began, killed))
    check_accounts(cfg.run.dir, summary, 6)
    print_recovery("vLLM engine", cfg.run.dir, killed[0])
    assert killed and summary.faults["engine_restarts"] >= 1, summary.faults


def test_engine_killed_under_the_broadcast_transport_is_restarted_and_rejoins_the_transfer_group(
    tmp_path: Path, tiny_model: str, redis_url: str, ray_session: None
) -> None:
    # There is no weights file to load a new engine from: it must join the transfer group afresh
    # and be pushed the served weights before it generates, without the learner waiting
    # `weights.timeout_s` for the dead one (it once did).
    cfg = chaos_config(
        tmp_path, tiny_model, "chaos-engine-broadcast", 6, f"bus.redis_url={redis_url}", "weights.transport=broadcast"
    )
    began, killed = time.time(), []
    summary = run_with_fault(cfg, lambda: kill_the_engine(cfg.run.dir, began, killed))
    check_accounts(cfg.run.dir, summary, 6)
    print_recovery("vLLM engine, broadcast", cfg.run.dir, killed[0])
    assert summary.faults["engine_restarts"] >= 1, summary.faults


def test_engine_that_stops_answering_is_named_dumped_and_restarted(
    tmp_path: Path, tiny_model: str, redis_url: str, ray_session: None
) -> None:
    """SIGSTOP: the engine lives on, holding its requests and answering nothing. Whichever wait
    meets it first (a generate call, or the weight push after a step) is named with a state dump
    within its deadline, the engine is restarted, and the run finishes."""
    deadline = 30  # a fresh engine's first calls took over 8 s on the loaded 2-core test machine
    cfg = chaos_config(
        tmp_path,
        tiny_model,
        "chaos-hang",
        5,
        f"bus.redis_url={redis_url}",
        f"faults.engine_call_s={deadline}",
        f"faults.weight_push_s={deadline}",
    )
    began = time.time()
    stopped: list[psutil.Process] = []
    stopped_at: list[float] = []

    async def freeze_engine() -> None:
        await step_reached(cfg.run.dir, 2)
        [core] = our_processes("VLLM::EngineCore", began)
        core.send_signal(signal.SIGSTOP)
        stopped.append(core)
        stopped_at.append(time.time())

    try:
        summary = run_with_fault(cfg, freeze_engine)
    finally:
        for core in stopped:  # the restart ends it; should it not, this test started it
            if core.is_running():
                core.send_signal(signal.SIGKILL)
    check_accounts(cfg.run.dir, summary, 5)
    print_recovery("vLLM engine stopped (SIGSTOP)", cfg.run.dir, stopped_at[0])
    dumps = sorted(cfg.run.dir.glob("hang-*.json"))
    assert dumps, "no state dump was written"
    dump = json.loads(dumps[0].read_text())
    assert dump["what"] == "engine 0: generate" or dump["what"].startswith("engine 0: weight push v"), dump["what"]
    assert dump["deadline_s"] == deadline
    waited = dump["time"] - stopped_at[0]
    assert waited <= deadline + 10, f"the hang was named {waited:.1f} s after the engine stopped"
    assert all({"age_s", "admitted_at_version", "engine"} <= g.keys() for g in dump["in_flight_groups"])
    assert "queue_depth" in dump["engines"][0] and "perf/step_s" in dump["last_step"]
    if dump["what"] == "engine 0: generate":  # the call that hung is counted in the engine's queue
        assert dump["engines"][0]["queue_depth"] >= 1
    assert summary.faults["engine_restarts"] >= 1


# ----------------------------------------------------------------------------------------- learner
def two_rank_run(tmp_path: Path, tiny_model: str, redis_url: str, name: str, *extra: str) -> Config:
    return chaos_config(
        tmp_path,
        tiny_model,
        name,
        6,
        f"bus.redis_url={redis_url}",
        "learner.world_size=2",
        "faults.learner_call_s=120",
        *extra,
    )


async def kill_a_rank(run_dir: Path, after_step: int, killed: list[float]) -> None:
    await step_reached(run_dir, after_step)
    # No birth-time filter: a rank may be a worker process Ray started with the session.
    ranks = our_processes("ray::LearnerRank", 0)
    assert len(ranks) == 2, ranks
    ranks[-1].send_signal(signal.SIGKILL)
    killed.append(time.time())


def test_learner_rank_killed_mid_run_is_rebuilt_from_the_last_checkpoint(
    tmp_path: Path, tiny_model: str, redis_url: str, ray_session: None
) -> None:
    cfg = two_rank_run(tmp_path, tiny_model, redis_url, "chaos-learner")
    killed: list[float] = []
    # One step past the checkpoint of step 2: it must be redone.
    summary = run_with_fault(cfg, lambda: kill_a_rank(cfg.run.dir, 3, killed))
    check_accounts(cfg.run.dir, summary, 6)
    print_recovery("learner rank", cfg.run.dir, killed[0])
    assert killed and summary.faults["learner_rebuilds"] == 1, summary.faults


def test_learner_rank_killed_before_any_checkpoint_stops_resumably_with_its_reason(
    tmp_path: Path, tiny_model: str, redis_url: str, ray_session: None
) -> None:
    # Failed before: stopping the run shut the learner down with a call to the dead rank, whose
    # ActorDiedError replaced the run's own message (bench/recovery.py met it).
    cfg = two_rank_run(tmp_path, tiny_model, redis_url, "chaos-learner-early", "checkpoint.every=4")
    with pytest.raises(StopResumable, match="no checkpoint to rebuild it from yet"):
        run_with_fault(cfg, lambda: kill_a_rank(cfg.run.dir, 1, []))


# ----------------------------------------------------------------------------------------- redis
def test_private_redis_server_killed_mid_run_comes_back_on_its_append_only_file(
    tmp_path: Path, tiny_model: str, ray_session: None
) -> None:
    cfg = chaos_config(tmp_path, tiny_model, "chaos-redis", 6)  # no bus.redis_url: the run's own server
    began = time.time()
    killed: list[float] = []

    async def kill_redis() -> None:
        await step_reached(cfg.run.dir, 2)
        # redis-server rewrites its command line; its working directory is its `--dir`.
        [server] = [
            p for p in our_processes("redis-server", began) if p.cwd() == os.path.realpath(cfg.run.dir / "redis")
        ]
        server.send_signal(signal.SIGKILL)
        killed.append(time.time())

    summary = run_with_fault(cfg, kill_redis)
    check_accounts(cfg.run.dir, summary, 6)
    print_recovery("redis-server", cfg.run.dir, killed[0])
    assert killed and summary.faults["redis_restarts"] == 1 and summary.faults["bus_reconnects"] >= 1, summary.faults


# ----------------------------------------------------------------------------------------- docker
def _dockerd_pid() -> int:
    return int(Path("/var/run/docker.pid").read_text())


def _docker_up() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def _restart_dockerd(old_pid: int) -> None:
    """dockerd removes its pid file last; a SIGKILLed one leaves it, and a new one starts anyway
    once the old process is gone."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and Path(f"/proc/{old_pid}").exists():
        time.sleep(0.2)
    with open(DOCKERD_LOG, "ab") as log:
        subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not _docker_up():
        time.sleep(0.5)
    if not _docker_up():
        raise TimeoutError(f"dockerd did not come back within 90 s; see {DOCKERD_LOG}")


def test_dockerd_killed_mid_run_gives_no_reward_not_zeros_and_the_pool_recovers(
    tmp_path: Path, tiny_model: str, redis_url: str, ray_session: None
) -> None:
    cfg = chaos_config(
        tmp_path,
        tiny_model,
        "chaos-docker",
        24,
        f"bus.redis_url={redis_url}",
        "rollout.max_tokens=24",
        "rollout.max_model_len=1024",
        "algorithm.filter_zero_variance=false",
        "envs=[{name: test-reply-length}, {name: mbpp, params: {sandbox: {backend: docker, size: 1}}}]",
    )
    outage: list[float] = []

    async def kill_dockerd() -> None:
        await step_reached(cfg.run.dir, 2)
        pid = _dockerd_pid()
        os.kill(pid, signal.SIGKILL)
        outage.append(time.time())
        try:
            await asyncio.sleep(8)  # code episodes meet the dead daemon meanwhile
        finally:  # whatever happens, the shared daemon comes back
            await asyncio.to_thread(_restart_dockerd, pid)
            outage.append(time.time())

    summary = run_with_fault(cfg, kill_dockerd)
    check_accounts(cfg.run.dir, summary, 24)
    print_recovery("dockerd", cfg.run.dir, outage[0])
    rows = [r for r in read_rows(cfg.run.dir / "metrics.jsonl") if "train/version" in r]
    assert sum(r.get("env/mbpp/sandbox_errors", 0) for r in rows) >= 1, "no episode met the outage"
    code = [line for line in read_ledger(cfg.run.dir / "ledger.jsonl") if line.env == "mbpp"]
    # During the outage code samples lost their reward (an infrastructure failure), never scored 0.
    assert any((line.reason or "").startswith("no_reward:") for line in code), collections.Counter(
        line.reason for line in code
    )
    # After it the same pool graded code again: samples admitted once dockerd was back were trained.
    back = max(r["step"] for r in rows if r["time"] <= outage[1])
    assert any(line.fate == "trained" and line.step > back + 2 for line in code), (back, len(code))


# ----------------------------------------------------------------------------------------- slow groups
def test_slow_groups_keep_the_in_flight_budget_for_fifty_steps(
    tmp_path: Path, tiny_model: str, redis_url: str, ray_session: None
) -> None:
    """Issue #11, defect 1, on a real run: groups that finish too late to be trained are dropped as
    stale; each must free its admission slot, or the budget shrinks until the loop waits forever."""
    staleness, batch = 1, 2
    cfg = chaos_config(
        tmp_path,
        tiny_model,
        "chaos-slow",
        50,
        f"bus.redis_url={redis_url}",
        "envs=[{name: test-slow-reply, params: {slow_s: 4.0}}]",
        "algorithm.max_age=1",
        f"algorithm.max_staleness={staleness}",
        f"algorithm.batch_size={batch}",
        "checkpoint.every=0",
        "faults.batch_wait_s=60",
    )
    summary = asyncio.run(run_training(cfg))
    reasons = check_accounts(cfg.run.dir, summary, 50)
    assert reasons.get("stale", 0) >= 2 * 5, reasons  # slow groups did go stale, again and again
    budget = [r["buffer/outstanding_max"] for r in read_rows(cfg.run.dir / "metrics.jsonl") if "train/version" in r]
    assert budget == [(staleness + 1) * batch] * 50, budget


# ----------------------------------------------------------------------------------------- the driver
# `codeworld` with this folder's test environments registered (conftest defines them).
CODEWORLD = [
    "-c",
    "import sys; sys.path.insert(0, 'tests/e2e'); import conftest; from rl.cli import app; app()",
]


def _driver(cfg_args: list[str], log: Path, *extra: str) -> subprocess.Popen:
    """`codeworld train` in its own process, its output in `log` (a pipe nobody reads would fill)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, *CODEWORLD, "train", str(REPO / "examples/demo.yaml"), *cfg_args, *extra],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, within_s: float = 900) -> None:
    deadline = time.monotonic() + within_s
    while not path.exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def _reap(proc: subprocess.Popen, tree: list[psutil.Process]) -> None:
    """After the driver's SIGKILL, whatever it started and did not die with it (this test started it)."""
    proc.wait(30)
    time.sleep(3)
    for p in tree:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
        except psutil.NoSuchProcess:
            pass


def test_driver_sigterm_then_sigkill_then_resume_trains_each_id_once_and_exactly(
    tmp_path: Path, tiny_model: str, ray_session: None
) -> None:
    """Launch 1 gets SIGTERM (checkpoint, exit 0), launch 2 (`--resume`) is SIGKILLed after a later
    checkpoint, launch 3 resumes and finishes. With max_staleness 0 and one rank, the final
    weights and optimizer state equal, bit for bit, a learner that trained the same batches
    without a stop; a learner that resumes the same checkpoint on two ranks lands within fp32
    tolerance of it."""
    steps = 6
    args = [
        f"model.path={tiny_model}",
        f"run.dir={tmp_path / 'run'}",
        "run.name=chaos-driver",
        f"run.steps={steps}",
        "eval.sets=[]",
        "algorithm.batch_size=2",
        "algorithm.group_size=2",
        "algorithm.max_staleness=0",
        "rollout.max_tokens=8",
        "rollout.max_model_len=128",
        "envs=[{name: test-reply-length}]",
        "learner.lr=0.01",
        "learner.warmup_steps=0",
        "learner.decay_steps=0",
        "checkpoint.every=1",
        "run.record_batches=true",
        "logging.progress=false",
        "logging.trackers=[]",
        "logging.dashboard.enabled=false",
        "logging.plot=false",
        "run.max_wall_s=null",
        "rollout.cpu_cores=null",
    ]
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    # Launch 1: SIGTERM once step 2 is checkpointed.
    logs = [tmp_path / f"launch{i}.log" for i in (1, 2)]
    first = _driver(args, logs[0])
    _wait_for(ckpt / "step_000002" / "meta.json", first, logs[0])
    first.send_signal(signal.SIGTERM)
    first.wait(300)
    out = logs[0].read_text()
    assert first.returncode == 0, out[-3000:]
    assert "preempted (SIGTERM)" in out and "--resume" in out, out[-2000:]
    stopped_at = json.loads((run_dir / "summary.json").read_text())["steps"]
    assert (ckpt / f"step_{stopped_at:06d}" / "meta.json").exists()
    # Launch 2: --resume, SIGKILLed once a later step is checkpointed.
    second = _driver(args, logs[1], "--resume")
    _wait_for(ckpt / f"step_{stopped_at + 2:06d}" / "meta.json", second, logs[1])
    tree = psutil.Process(second.pid).children(recursive=True)
    second.send_signal(signal.SIGKILL)
    killed_at = time.time()
    _reap(second, tree)
    # Launch 3: resumes from the newest complete checkpoint and finishes.
    cfg = load_config(REPO / "examples/demo.yaml", args)
    summary = asyncio.run(run_training(cfg, "latest"))
    check_accounts(run_dir, summary, steps)
    print_recovery("driver, then --resume", run_dir, killed_at)
    assert summary.launch.resumed_from is not None and summary.launch.resumed_from >= stopped_at + 2
    _compare_with_an_uninterrupted_learner(cfg, tiny_model, run_dir, steps)


def _uninterrupted(
    cfg: Config,
    model: str,
    batches: list[list],
    world_size: int,
    start: Path | None,
    first_step: int,
    out: Path,
) -> None:
    """A learner (Ray ranks, as the run uses) that trains `batches` one after the other, from the
    model or from checkpoint `start`, then saves a checkpoint to `out`."""
    from rl.learner import LearnerGroup
    from rl.orchestrator import Orchestrator

    cfg = cfg.model_copy(deep=True)
    cfg.learner.world_size = world_size
    orc = Orchestrator(cfg)  # its `to_samples` turns groups into samples as the run did
    learner = LearnerGroup(
        model, cfg.learner, cfg.algorithm, cfg.rollout.temperature, cfg.run.seed, cfg.rollout.max_tokens
    )
    try:
        if start is not None:
            learner.load_checkpoint(start)
        for step, flat in enumerate(batches, first_step):
            groups: dict[str, list] = collections.defaultdict(list)
            for t in flat:
                groups[t.group_id].append(t)
            orc.buffer.version = step - 1
            samples, _ = orc.to_samples(list(groups.values()))
            if samples:
                learner.train_step([samples])
        learner.save_checkpoint(out)
    finally:
        learner.shutdown()


def _state(path: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat_file = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(path, flat_file)
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, torch.Tensor):
            out[prefix] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(f"{prefix}/{i}", v)
        elif isinstance(node, (int, float)):
            out[prefix] = torch.tensor(node)

    walk("", torch.load(flat_file, weights_only=False))
    return out


def _compare_with_an_uninterrupted_learner(cfg: Config, model: str, run_dir: Path, steps: int) -> None:
    batches = [load_recorded(run_dir / "batches" / f"step_{s:06d}.msgpack") for s in range(1, steps + 1)]
    for step, trajs in enumerate(batches, 1):  # on-policy across the launches too
        assert {int(v) for t in trajs for v in t.policy_versions[t.loss_mask == 1]} == {step - 1}
    ref = run_dir.parent / "reference"
    _uninterrupted(cfg, model, batches, 1, None, 1, ref)
    got, want = _state(run_dir / "checkpoints" / f"step_{steps:06d}"), _state(ref)
    model_keys = [k for k in want if k.startswith("/model/")]
    assert model_keys and any(k.startswith("/optim/state/") for k in want)
    assert got.keys() == want.keys()
    differing = [k for k in want if not torch.equal(got[k], want[k])]
    assert differing == [], differing[:5]  # weights, Adam moments, step counts, scheduler: bit for bit
    resharded = run_dir.parent / "resharded"
    _uninterrupted(cfg, model, batches[2:], 2, run_dir / "checkpoints" / "step_000002", 3, resharded)
    two = _state(resharded)
    worst = max(float((two[k] - want[k]).abs().max()) for k in model_keys)
    moved = max(float((want[k] - _initial(model)[k.removeprefix("/model/")]).abs().max()) for k in model_keys)
    print(f"resume on 2 ranks vs 1: max |weight diff| {worst:.2e} (weights moved up to {moved:.2e})")
    assert moved > 1e-3 and worst <= 0.1 * cfg.learner.lr


def _initial(model: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(str(Path(model) / "model.safetensors"))
    if "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights
