"""Does the loop learn, does the learning come from the reward, and does asynchrony cost any?

    .venv/bin/python bench/learning.py                     # demo gain over 3 seeds + shuffled-reward control
    .venv/bin/python bench/learning.py --staleness 0,1,2,4,8 [--steps 80] [--seeds 3 --seeded-bounds 1,4]
    .venv/bin/python bench/learning.py --dynamic           # time to the demo's accuracy, dynamic sampling on/off

Every run is a real `codeworld train` of the `make demo` config (examples/demo.yaml) in a fresh
process, one after another (the machine has two cores). SFT warm starts are built once per seed
under --work (default runs/bench-learning) and reused by later invocations.

* default: for each seed, the whole demo (init-tiny → SFT → RL), then RL again from the same SFT
  checkpoint with rewards shuffled across the batch's samples (`algorithm.shuffle_rewards`): a
  wiring check that must lose the gain. Last line: `median gain G, shuffled-reward gain S`.
* --staleness: from seed 0's SFT checkpoint, `--steps` RL steps at each bound (several seeds at the
  bounds in --seeded-bounds), printing seconds per step, the staleness actually seen and the gain.
  Last line: `staleness 4 vs 1: gain G4 vs G1` (medians).
* --dynamic: the demo without `algorithm.dynamic_sampling`, and with it at the demo's batch_size and
  at the informative groups per step the run without it trained; the wall-clock seconds each needs
  to reach the held-out accuracy of the slowest (from `eval.every` evaluations), as ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CODEWORLD = [sys.executable, "-m", "rl.cli"]
QUIET = ["logging.dashboard.enabled=false", "logging.progress=false", "logging.trackers=[]", "logging.plot=false"]


def run(argv: list[str], log: Path) -> None:
    """One codeworld command, its output in `log`; a failure stops the benchmark with its tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.run([*CODEWORLD, *argv], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(
            f"bench/learning.py: `codeworld {' '.join(argv[:2])}` failed; see {log}:\n"
            + "\n".join(log.read_text().splitlines()[-15:])
        )


def sft_checkpoint(work: Path, seed: int) -> Path:
    """The demo's warm start for `seed` (built once)."""
    out = work / f"sft-seed{seed}"
    if not (out / "config.json").is_file():
        init = work / f"init-seed{seed}"
        print(f"  building the SFT warm start for seed {seed} ...", flush=True)
        run(["model", "init-tiny", str(init), "--seed", str(seed)], work / "logs" / f"init-{seed}.log")
        log = work / "logs" / f"sft-{seed}.log"
        run(["sft", "examples/demo_sft.yaml", "--model", str(init), "--out", str(out), f"seed={seed}"], log)
        # The SFT stops at its target accuracy or at its wall-clock cap; on a loaded machine the cap
        # comes first and RL starts from a weaker model: say so beside the seed's figures.
        result = json.loads(log.read_text().splitlines()[-1])
        target = yaml.safe_load((REPO / "examples" / "demo_sft.yaml").read_text())["target_acc"]
        if result["stop_acc"] < target:
            print(
                f"  warning: seed {seed}'s SFT stopped at {result['stop_acc']:.3f} on its stopping set, "
                f"short of its target {target} (wall-clock cap after {result['wall_s']:.0f} s)",
                flush=True,
            )
    return out


def train(work: Path, name: str, sft: Path, seed: int, overrides: list[str]) -> dict:
    """One RL run of the demo config; its summary plus figures read from its metrics."""
    run_dir = work / "runs" / name
    started = time.perf_counter()
    run(
        [
            "train",
            "examples/demo.yaml",
            f"model.path={sft}",
            f"run.dir={run_dir}",
            f"run.name=bl-{name}",
            f"run.seed={seed}",
            *QUIET,
            *overrides,
        ],
        work / "logs" / f"{name}.log",
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "perf/step_s" in r]
    ages = [(int(k.rsplit("/", 1)[1]), v) for r in steps for k, v in r.items() if k.startswith("train/staleness/")]
    seen = sum(a * n for a, n in ages) / max(sum(n for _, n in ages), 1)
    gain = summary["heldout_acc_after"] - summary["heldout_acc_before"]
    return {
        "name": name,
        "gain": gain,
        "before": summary["heldout_acc_before"],
        "after": summary["heldout_acc_after"],
        "steps": summary["steps"],
        "s_per_step": statistics.median(r["perf/step_s"] for r in steps),
        "staleness_seen": seen,
        "max_staleness_seen": max((a for a, _ in ages), default=0),
        "learner_idle": statistics.median(r.get("perf/learner_idle", 0.0) for r in steps),
        "reward_last20": statistics.mean(r["train/reward_mean"] for r in steps[-20:]),
        "wall_s": time.perf_counter() - started,
        "rows": rows,
    }


def demo_gain(work: Path, seeds: int) -> None:
    gains, shuffled = [], []
    for seed in range(seeds):
        sft = sft_checkpoint(work, seed)
        real = train(work, f"demo-seed{seed}", sft, seed, [])
        control = train(work, f"shuffled-seed{seed}", sft, seed, ["algorithm.shuffle_rewards=true"])
        gains.append(real["gain"])
        shuffled.append(control["gain"])
        print(
            f"seed {seed}: held-out {real['before']:.3f} -> {real['after']:.3f} (gain {real['gain']:+.3f}); "
            f"shuffled rewards: {control['before']:.3f} -> {control['after']:.3f} (gain {control['gain']:+.3f})",
            flush=True,
        )
    print(f"median gain {statistics.median(gains):.3f}, shuffled-reward gain {statistics.median(shuffled):.3f}")


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def staleness_table(work: Path, bounds: list[int], steps: int, seeds: int, seeded: set[int]) -> None:
    sft = sft_checkpoint(work, 0)
    common = [f"run.steps={steps}", "run.max_wall_s=3600", "eval.every=0"]
    results: dict[int, list[dict]] = {}
    for bound in bounds:
        for seed in range(seeds if bound in seeded else 1):
            r = train(work, f"staleness{bound}-seed{seed}", sft, seed, [*common, f"algorithm.max_staleness={bound}"])
            results.setdefault(bound, []).append(r)
            print(
                f"  bound {bound}, seed {seed}: gain {r['gain']:+.3f} ({r['before']:.3f} -> {r['after']:.3f}), "
                f"{r['s_per_step']:.2f} s/step, learner idle {r['learner_idle']:.0%}, "
                f"staleness seen {r['staleness_seen']:.2f} (max {r['max_staleness_seen']}), "
                f"train reward last 20 steps {r['reward_last20']:.3f}",
                flush=True,
            )
    print(
        f"\n| max_staleness | runs | s/step | learner idle | staleness seen (mean, max) "
        f"| train reward, last 20 steps | held-out gain after {steps} steps (median; each run) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for bound, rs in results.items():
        gains = ", ".join(f"{r['gain']:+.3f}" for r in rs)
        print(
            f"| {bound} | {len(rs)} | {_median(rs, 's_per_step'):.2f} | {_median(rs, 'learner_idle'):.0%} | "
            f"{_median(rs, 'staleness_seen'):.2f}, {max(r['max_staleness_seen'] for r in rs)} | "
            f"{_median(rs, 'reward_last20'):.3f} | "
            f"{_median(rs, 'gain'):+.3f} ({gains}) |"
        )
    if 4 in results and 1 in results:
        g4, g1 = (_median(results[b], "gain") for b in (4, 1))
        print(f"staleness 4 vs 1: gain {g4:.3f} vs {g1:.3f}")


def time_to_accuracy(rows: list[dict], target: float, label: str) -> float | None:
    """Seconds of training at the first evaluation whose greedy accuracy reaches `target`. An
    evaluation has a row of its own; the clock is on the training row of the same step."""
    elapsed = {r["step"]: r["perf/elapsed_s"] for r in rows if "perf/elapsed_s" in r}
    for r in rows:
        value = r.get(label)
        if value is not None and value >= target and r["step"] in elapsed:
            return elapsed[r["step"]]
    return None


def informative_groups_per_step(run: dict, group_size: int) -> float:
    """Mean groups per step that carried a gradient in a run without dynamic sampling."""
    steps = [r for r in run["rows"] if "perf/step_s" in r]
    filtered = statistics.mean(r.get("train/dropped/zero_variance_groups", 0.0) for r in steps)
    return statistics.mean(r["train/samples"] for r in steps) / group_size - filtered


def dynamic(work: Path) -> None:
    """Dynamic sampling off; on at the demo's batch_size (each step trains that many informative
    groups, so it draws about twice as many); on at the number of informative groups the run
    without it trained per step (about the same draws per step)."""
    sft = sft_checkpoint(work, 0)
    demo = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())["algorithm"]
    common = ["eval.every=10", "eval.sets.0.n=500"]
    label = "eval/arithmetic/greedy"
    off = train(work, "dynamic-off", sft, 0, [*common, "algorithm.dynamic_sampling=false"])
    batches = [demo["batch_size"], round(informative_groups_per_step(off, demo["group_size"]))]
    on = {
        b: train(
            work, f"dynamic-on-b{b}", sft, 0, [*common, "algorithm.dynamic_sampling=true", f"algorithm.batch_size={b}"]
        )
        for b in batches
    }
    target = min(r["after"] for r in [off, *on.values()])
    t_off = time_to_accuracy(off["rows"], target, label)
    for name, r in [("without dynamic sampling", off)] + [(f"with, batch_size {b}", r) for b, r in on.items()]:
        t = time_to_accuracy(r["rows"], target, label)
        print(
            f"{name + ':':36} {r['before']:.3f} -> {r['after']:.3f}, {r['s_per_step']:.2f} s/step, "
            f"reached {target:.3f} " + (f"after {t:.0f} s" if t is not None else "never"),
            flush=True,
        )
    for b, r in on.items():
        t_on = time_to_accuracy(r["rows"], target, label)
        if t_off and t_on:
            print(
                f"dynamic sampling (batch_size {b}) reaches {target:.3f} in {t_on / t_off:.2f}x the wall-clock seconds"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-learning")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--staleness", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument(
        "--seeded-bounds",
        type=lambda s: {int(x) for x in s.split(",")},
        default={1, 4},
        help="bounds run with --seeds seeds (the others with one)",
    )
    parser.add_argument("--steps", type=int, default=80, help="RL steps per run of --staleness")
    parser.add_argument("--dynamic", action="store_true")
    args = parser.parse_args()
    if args.staleness:
        staleness_table(args.work, args.staleness, args.steps, args.seeds, args.seeded_bounds)
    elif args.dynamic:
        dynamic(args.work)
    else:
        demo_gain(args.work, args.seeds)


if __name__ == "__main__":
    main()
