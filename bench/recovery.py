"""How long a run takes to recover from a killed part: seconds from each SIGKILL to the next learner step.

    .venv/bin/python bench/recovery.py [--faults engine,learner,redis,dockerd,driver] [--steps 8]
                                       [--work runs/bench-recovery]

Each fault is one real `codeworld train` run in its own process, one after another (the machine has
two cores): a freshly built tiny model (under --work), the dense-reward environment of tests/e2e
(`test-reply-length`: a random model earns varied rewards on it), the run's own Redis, and one part
SIGKILLed once step 3 is logged (one past the checkpoint of step 2):
* engine: the vLLM engine core process (the run restarts the engine);
* learner: one of two learner ranks (the run rebuilds the learner from its last checkpoint);
* redis: the run's private redis-server (restarted on its append-only file);
* dockerd: the Docker daemon, with an mbpp environment on Docker sandboxes beside the dense one
  (the daemon is brought back 8 s later, always, as tests/workers/sandbox/test_sandbox_faults.py does);
* driver: the `codeworld train` process itself, followed by `codeworld train --resume`.
Recovery is the time of the first metrics row written after the kill minus the kill's time (for the
driver this includes starting the new process). Every run must then reach its step count. Prints a
markdown table (the README's, beside the figures tests/e2e/test_chaos.py prints).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
# `codeworld` with tests/e2e's environments registered (its conftest defines them).
CODEWORLD = [
    sys.executable,
    "-c",
    "import sys; sys.path.insert(0, 'tests/e2e'); import conftest; from rl.cli import app; app()",
]
COMMON = [
    "rollout.max_tokens=8",
    "rollout.max_model_len=128",
    "algorithm.group_size=2",
    "algorithm.batch_size=2",
    "algorithm.max_staleness=1",
    "learner.lr=0.01",
    "eval.sets=[]",
    "checkpoint.every=2",
    "run.max_wall_s=null",
    "logging.trackers=[]",
    "logging.progress=false",
    "logging.dashboard.enabled=false",
    "logging.plot=false",
    "envs=[{name: test-reply-length}]",
]
DOCKERD_LOG = "/var/log/codeworld-dockerd.log"


def launch(model: Path, run_dir: Path, steps: int, extra: list[str], log: Path, *flags: str) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                *CODEWORLD,
                "train",
                "examples/demo.yaml",
                f"model.path={model}",
                f"run.dir={run_dir}",
                f"run.name=recovery-{run_dir.name}",
                f"run.steps={steps}",
                *COMMON,
                *extra,
                *flags,
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )


def step_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "train/version" in r]


def wait_row(
    run_dir: Path, proc: subprocess.Popen, log: Path, ok: Callable[[dict], bool], within_s: float = 900
) -> dict:
    """The first learner-step row for which `ok` holds, waiting while the run lives."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        found = [r for r in step_rows(run_dir) if ok(r)]
        if found:
            return found[0]
        if proc.poll() is not None:
            sys.exit(
                f"bench/recovery.py: the run ended (exit {proc.returncode}) first; see {log}:\n"
                + "\n".join(log.read_text().splitlines()[-15:])
            )
        time.sleep(0.1)
    sys.exit(f"bench/recovery.py: no such step within {within_s:.0f} s; see {log}")


def ours(root: int, marker: str) -> list[psutil.Process]:
    """Processes under `root` (the run this benchmark launched) whose command line holds `marker`."""
    found = []
    for p in psutil.Process(root).children(recursive=True):
        try:
            if marker in p.name() + " " + " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def kill_one(root: int, marker: str) -> None:
    victims = ours(root, marker)
    if not victims:
        sys.exit(f"bench/recovery.py: no process {marker!r} under the run to kill")
    victims[-1].send_signal(signal.SIGKILL)


def kill_dockerd() -> None:
    """SIGKILL the daemon and bring it back 8 s later in the background, whatever happens."""
    pid = int(Path("/var/run/docker.pid").read_text())
    os.kill(pid, signal.SIGKILL)

    def restart() -> None:
        time.sleep(8)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.2)
        with open(DOCKERD_LOG, "ab") as log:
            subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)

    threading.Thread(target=restart).start()


FAULTS: dict[str, tuple[list[str], str | None]] = {
    # name: (extra overrides, marker of the process killed under the run; None: special)
    "engine": ([], "VLLM::EngineCore"),
    "learner": (["learner.world_size=2"], "ray::LearnerRank"),
    "redis": ([], "redis-server"),
    "dockerd": (
        [
            "rollout.max_tokens=24",
            "rollout.max_model_len=1024",
            "algorithm.filter_zero_variance=false",
            "envs=[{name: test-reply-length}, {name: mbpp, params: {sandbox: {backend: docker, size: 1}}}]",
        ],
        None,
    ),
    "driver": ([], None),
}


def one_fault(name: str, model: Path, work: Path, steps: int) -> dict:
    extra, marker = FAULTS[name]
    run_dir, log = work / "runs" / name, work / "logs" / f"{name}.log"
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier invocation's rows would pass for this run's
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    proc = launch(model, run_dir, steps, extra, log)
    try:
        # One step past the checkpoint of step 2 (`checkpoint.every=2`): there is one to go back to.
        wait_row(run_dir, proc, log, lambda r: r["step"] >= 3)
        killed_at, killed_step = time.time(), step_rows(run_dir)[-1]["step"]
        if name == "driver":
            tree = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            time.sleep(3)
            for p in tree:  # what the killed driver started and did not take with it
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()
            proc = launch(model, run_dir, steps, extra, log, "--resume")
        elif name == "dockerd":
            kill_dockerd()
        else:
            kill_one(proc.pid, marker)
        row = wait_row(run_dir, proc, log, lambda r: r["time"] > killed_at)
        code = proc.wait(1800)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(300)
    if code != 0:
        sys.exit(f"bench/recovery.py: the {name} run exited {code}; see {log}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "fault": name,
        "killed_after_step": killed_step,
        "next_step": row["step"],
        "recovery_s": row["time"] - killed_at,
        "steps": summary["steps"],
        "faults": summary["faults"],
        "ledger": summary["ledger"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-recovery")
    args = ap.parse_args()
    faults = args.faults.split(",")
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        sys.exit(f"bench/recovery.py: unknown --faults {unknown}; known: {', '.join(FAULTS)}")
    model = args.work / "tiny"
    if not (model / "config.json").is_file():
        subprocess.run([*CODEWORLD, "model", "init-tiny", str(model), "--seed", "0"], cwd=REPO, check=True)
    results = []
    for name in faults:
        r = one_fault(name, model, args.work, args.steps)
        results.append(r)
        print(
            f"  {name}: killed after step {r['killed_after_step']}, next learner step ({r['next_step']}) "
            f"{r['recovery_s']:.1f} s later; {r['steps']}/{args.steps} steps, faults {r['faults']}, "
            f"ledger {r['ledger']['trained']} trained + {r['ledger']['dropped']} dropped of "
            f"{r['ledger']['generated']}",
            flush=True,
        )
    print("\n| fault (SIGKILL) | killed after step | next learner step | seconds to it | run finished |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['fault']} | {r['killed_after_step']} | {r['next_step']} | {r['recovery_s']:.1f} | "
            f"{r['steps']}/{args.steps} steps |"
        )


if __name__ == "__main__":
    main()
