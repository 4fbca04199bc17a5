"""Run metrics: one set of names for every place a metric goes.

A metric is a flat name and a float. Names are grouped by their first part:

    train/...          the learner step: reward, pass rate, lengths, entropy, clip fraction, mismatch
                       KL, grad norm, staleness/<age> (samples per age), dropped/<reason> (per step)
    eval/<set>/...     held-out evaluation: greedy, pass_at_<k>, sampled_mean, response_len
    env/<name>/...     per environment: the train-batch figures and its verifier/sandbox health
    sandbox/<node>/<pool>/...  the sandbox pools' counters (warm, busy, executions/s, errors)
    perf/...           throughput and where a step's time went

`MetricsWriter` writes each step as one JSON line of `metrics.jsonl` (`{"step", "time", name: value}`,
which the dashboard reads) and hands the same names to the configured trackers (TensorBoard,
Weights & Biases, MLflow) behind the one `Tracker` interface.
"""

from __future__ import annotations

import collections
import importlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from rl.config import ConfigError, LoggingSection

if TYPE_CHECKING:
    from rl.samples import SampleRecord
    from rl.trajectory import Trajectory

FILE_NAME = "metrics.jsonl"
"""The metrics file inside a run directory."""

log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\- ]")


def metric_name(*parts: str) -> str:
    """`a/b/c` from parts, each made safe for every tracker (MLflow allows the fewest characters)."""
    return "/".join(_UNSAFE.sub("_", str(p)) or "_" for p in parts)


def batch_metrics(trajs: Sequence[Trajectory], prefix: tuple[str, ...] = ("train",)) -> dict[str, float]:
    """Reward, pass rate (share with full reward), response length and truncation rate of a set of
    trajectories: under `prefix` for all of them, and under `env/<name>` for each environment."""
    if not trajs:
        return {}
    by_env: dict[str, list[Trajectory]] = collections.defaultdict(list)
    for t in trajs:
        by_env[t.env].append(t)
    out = _figures(trajs, prefix)
    for env, items in sorted(by_env.items()):
        out.update(_figures(items, ("env", env)))
    return out


def _figures(trajs: Sequence[Trajectory], prefix: tuple[str, ...]) -> dict[str, float]:
    rewards = np.array([t.reward for t in trajs])
    return {
        metric_name(*prefix, "reward_mean"): float(rewards.mean()),
        metric_name(*prefix, "pass_rate"): float((rewards >= 1.0).mean()),
        metric_name(*prefix, "response_len"): float(np.mean([t.num_model_tokens for t in trajs])),
        metric_name(*prefix, "truncation_rate"): float(np.mean([t.truncated for t in trajs])),
        metric_name(*prefix, "samples"): float(len(trajs)),
    }


def step_metrics(
    trajs: Sequence[Trajectory],
    learner: Mapping[str, Any],
    *,
    version: int,
    dropped: Mapping[str, int],
    timing: Mapping[str, float],
    tokens_per_s: float,
) -> dict[str, float]:
    """One learner step's train/ and perf/ metrics (plus env/ batch figures). `learner` is the
    step's `StepStats` as a dict (empty when the step trained nothing), `dropped` the drops of
    this step by reason, `timing` seconds: train_s, sync_s, wait_s, step_s, elapsed_s."""
    out = batch_metrics(trajs)
    for key in ("loss", "entropy", "clip_frac", "mismatch_kl", "mismatch_abs", "grad_norm", "float8_drift"):
        if learner.get(key) is not None:
            out[metric_name("train", key)] = float(learner[key])
    out[metric_name("train", "version")] = float(version)
    ages = collections.Counter(version - 1 - t.min_version for t in trajs)
    out.update({metric_name("train", "staleness", str(age)): float(n) for age, n in sorted(ages.items())})
    for age in ages:  # what each staleness brings: old samples of a worse policy score lower
        rewards = [t.reward for t in trajs if version - 1 - t.min_version == age]
        out[metric_name("train", "by_age", str(age), "reward_mean")] = float(np.mean(rewards))
    out.update({metric_name("train", "dropped", reason): float(n) for reason, n in sorted(dropped.items())})
    step_s = max(timing["step_s"], 1e-9)
    out.update({metric_name("perf", key): float(value) for key, value in timing.items()})
    out[metric_name("perf", "tokens_per_s")] = float(tokens_per_s)
    out[metric_name("perf", "steps_per_min")] = 60.0 / step_s
    out[metric_name("perf", "learner_idle")] = timing["wait_s"] / step_s
    if learner.get("tokens") is not None:
        out[metric_name("perf", "train_tokens")] = float(learner["tokens"])
    if learner.get("kl") is not None:
        out[metric_name("train", "kl_ref")] = float(learner["kl"])
    out.update(importance_metrics(learner.get("importance") or {}))
    return out


def importance_metrics(by_age: Mapping[int, Any]) -> dict[str, float]:
    """The behaviour weights w = exp(prox − sampler) of a step: quantiles, the share beyond the cap
    (truncated or masked), the sampler→learner KL, overall and per staleness (`train/is/...`)."""
    from rl.loss import ImportanceStats

    parts = {int(age): ImportanceStats.model_validate(v) for age, v in by_age.items()}
    total = ImportanceStats()
    for part in parts.values():
        total.add(part)
    if not total.tokens:
        return {}
    out = {metric_name("train", "is", f"p{q}"): total.quantile(q / 100) for q in (1, 10, 50, 90, 99)}
    for label, stats in [("all", total)] + [(f"age{age}", p) for age, p in sorted(parts.items())]:
        n = max(stats.tokens, 1.0)
        out[metric_name("train", "is", label, "kl")] = stats.kl_sum / n
        out[metric_name("train", "is", label, "above_cap")] = stats.above / n
        out[metric_name("train", "is", label, "below_inverse_cap")] = stats.below / n
        out[metric_name("train", "is", label, "mean_log_w")] = stats.log_w_sum / n
        out[metric_name("train", "is", label, "tokens")] = stats.tokens
    return out


class Tracker(Protocol):
    """An experiment tracker: receives every metric under its metrics.jsonl name."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record one row of metrics at `step` (steps never decrease between calls)."""

    def log_samples(self, step: int, kind: str, records: Sequence[SampleRecord]) -> None:
        """Record samples (trackers without a place for them ignore them)."""

    def rewind(self, step: int) -> None:
        """The run went back to step `step` (a resume, a learner rebuilt from a checkpoint): the
        points after it are gone from the run's lineage; the next `log` is step + 1."""

    def close(self) -> None:
        """Flush and release."""


def _require(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ConfigError(
            f"logging.trackers lists {extra}, but the {package!r} package is not installed: "
            f"pip install 'codeworld[{extra}]'."
        ) from None


class TensorBoardTracker:
    """Event files under <run dir>/tb."""

    def __init__(self, run_dir: Path) -> None:
        self._dir = run_dir / "tb"
        self._writer = self._open(None)

    def _open(self, purge_step: int | None) -> Any:
        from torch.utils.tensorboard import SummaryWriter  # tensorboard is a core dependency

        return SummaryWriter(str(self._dir), purge_step=purge_step)

    def rewind(self, step: int) -> None:
        # TensorBoard hides every event at or after `purge_step` that an earlier writer left.
        self._writer.close()
        self._writer = self._open(step + 1)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)

    def log_samples(self, step: int, kind: str, records: Sequence[SampleRecord]) -> None:
        pass  # TensorBoard has no table view; the dashboard's sample browser shows them

    def close(self) -> None:
        self._writer.close()


SAMPLE_COLUMNS = ["step", "kind", "eval_set", "env", "task_id", "reward", "staleness", "prompt", "completion"]
"""Columns of the W&B sample tables."""

_TABLE_ROWS = 1000
"""Most rows in one W&B sample table (W&B renders larger tables slowly)."""


class WandbTracker:
    """A W&B run (offline by default: files under <run dir>/wandb for a later `wandb sync`);
    samples as tables: train samples every `table_every` steps, evaluation samples at each evaluation."""

    def __init__(self, run_dir: Path, run_name: str, logging: LoggingSection, config: Mapping[str, Any]) -> None:
        wandb = _require("wandb", "wandb")
        self._wandb, self._every = wandb, logging.wandb.table_every
        self._run = wandb.init(
            project=logging.wandb.project,
            entity=logging.wandb.entity,
            name=run_name,
            mode=logging.wandb.mode,
            dir=str(run_dir),
            config=dict(config),
            settings=wandb.Settings(silent=True, console="off"),
        )
        self._train_rows: list[list[Any]] = []

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(dict(metrics), step=step)

    def log_samples(self, step: int, kind: str, records: Sequence[SampleRecord]) -> None:
        rows = [
            [
                r.step,
                r.kind,
                r.eval_set,
                r.env,
                r.task_id,
                r.reward,
                r.staleness,
                r.prompt,
                "\n".join(f"[{t.role}] {t.text}" for t in r.turns),
            ]
            for r in records
        ]
        if kind == "eval":
            self._table(step, "samples/eval", rows)
            return
        self._train_rows = (self._train_rows + rows)[-_TABLE_ROWS:]
        if step % self._every == 0:
            self._table(step, "samples/train", self._train_rows)
            self._train_rows = []

    def rewind(self, step: int) -> None:
        # W&B keeps the points it has; steps it has seen already are refused with a warning, so
        # the curve goes on from its last step (the metrics.jsonl and TensorBoard curves rewind).
        log.warning("W&B cannot take back the points after step %d; its curve shows them", step)

    def _table(self, step: int, key: str, rows: list[list[Any]]) -> None:
        if rows:
            table = self._wandb.Table(columns=SAMPLE_COLUMNS, data=rows[:_TABLE_ROWS])
            self._run.log({key: table}, step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    """An MLflow run, in a file store under <run dir>/mlruns unless a tracking URI is given."""

    def __init__(self, run_dir: Path, run_name: str, logging: LoggingSection, config: Mapping[str, Any]) -> None:
        uri = logging.mlflow.tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked: it is in maintenance mode, but it is the
            # one backend that needs no server or database, which offline clusters often lack.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        tracking = _require("mlflow.tracking", "mlflow")
        self._entities = _require("mlflow.entities", "mlflow")
        self._client = tracking.MlflowClient(uri)
        experiment = self._client.get_experiment_by_name(logging.mlflow.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self._client.create_experiment(logging.mlflow.experiment)
        )
        self.run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
        self._client.log_dict(self.run_id, dict(config), "config.json")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        stamp = int(time.time() * 1000)
        items = [self._entities.Metric(name, value, stamp, step) for name, value in metrics.items()]
        for i in range(0, len(items), 1000):  # MLflow's limit per batch
            self._client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_samples(self, step: int, kind: str, records: Sequence[SampleRecord]) -> None:
        pass  # MLflow tables need pandas; the dashboard's sample browser shows them

    def rewind(self, step: int) -> None:
        # MLflow keeps every point; those after `step` and their successors share step numbers.
        log.warning("MLflow cannot take back the points after step %d; its curve shows both", step)

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


def make_trackers(run_dir: Path, run_name: str, logging: LoggingSection, config: Mapping[str, Any]) -> list[Tracker]:
    """The configured trackers; a tracker whose package is missing is a ConfigError naming it."""
    made: list[Tracker] = []
    for name in dict.fromkeys(logging.trackers):
        if name == "tensorboard":
            made.append(TensorBoardTracker(run_dir))
        elif name == "wandb":
            made.append(WandbTracker(run_dir, run_name, logging, config))
        else:
            made.append(MlflowTracker(run_dir, run_name, logging, config))
    return made


class MetricsWriter:
    """Writes `metrics.jsonl` in the run directory and feeds the trackers the same names.

    A fresh run starts the file empty (a re-run into the same directory must not mix its curve
    with the old one's); a resumed run keeps the rows up to its checkpoint's step and goes on from
    there, so each step has one row, whatever happened between launches.
    """

    def __init__(self, run_dir: Path, trackers: Sequence[Tracker], resume_step: int | None = None) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / FILE_NAME
        self.trackers = list(trackers)
        if resume_step is None:
            # A new file, not one cut in place: a reader holding an offset into the old one (the
            # dashboard's live stream) sees a different file, even once this one has grown past it.
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("")
            os.replace(tmp, self.path)
            self._file = self.path.open("a")
        else:
            self._file = self.path.open("a")
            self.rewind(resume_step)

    def rewind(self, step: int) -> None:
        """Forget the rows after `step` (atomically) and tell the trackers; the next row is step + 1."""
        self._file.close()
        rows = []
        for raw in self.path.read_text().splitlines() if self.path.exists() else []:
            try:
                if json.loads(raw)["step"] <= step:
                    rows.append(raw)
            except (ValueError, KeyError, TypeError):
                break  # a row torn by the crash: nothing after it was written whole
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{r}\n" for r in rows))
        os.replace(tmp, self.path)
        self._file = self.path.open("a")
        for tracker in self.trackers:
            tracker.rewind(step)

    def log(self, step: int, metrics: Mapping[str, float | None]) -> dict[str, float]:
        """Record one row at `step` (values that are None or not finite are left out); returns it."""
        row = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        self._file.write(json.dumps({"step": step, "time": time.time(), **row}) + "\n")
        self._file.flush()
        for tracker in self.trackers:
            tracker.log(step, row)
        return row

    def log_samples(self, step: int, kind: str, records: Sequence[SampleRecord]) -> None:
        for tracker in self.trackers:
            tracker.log_samples(step, kind, records)

    def close(self) -> None:
        self._file.close()
        for tracker in self.trackers:
            tracker.close()


def read_rows(path: Path) -> list[dict[str, float]]:
    """The rows of a metrics.jsonl file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_reward_curve(metrics_path: Path, out: Path) -> None:
    """Train reward per environment against step (raw and smoothed) and the evaluation curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(metrics_path)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    curves = ((r"^env/(.+)/reward_mean$", "train"), (r"^eval/(.+)/(greedy|pass_at_\d+)$", "eval"))
    for pattern, style in curves:
        names = sorted({k for r in rows for k in r if re.match(pattern, k)})
        for name in names:
            steps, values = zip(*[(r["step"], r[name]) for r in rows if name in r])
            label = re.match(pattern, name).group(1)
            if style == "train":
                (line,) = ax.plot(steps, values, alpha=0.3)
                ax.plot(steps, _ema(values, 0.9), color=line.get_color(), label=f"{label} train reward (EMA)")
            else:
                ax.plot(steps, values, marker="o", linestyle="--", label=f"{label} held-out {name.split('/')[-1]}")
    ax.set_xlabel("learner step")
    ax.set_ylabel("mean reward")
    ax.set_title(metrics_path.parent.name)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _ema(values: Sequence[float], decay: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else decay * acc + (1 - decay) * v
        out.append(acc)
    return out
