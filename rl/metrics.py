"""Run metrics: one JSON line per step, TensorBoard scalars, and the reward-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Writes `metrics.jsonl` (and TensorBoard events under `tb/`) in the run directory."""

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one step's metrics (nested dicts become `a/b` names in TensorBoard)."""
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in _flatten(metrics):
                self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _flatten(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _flatten(value, name + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((name, float(value)))
    return out


def plot_reward_curve(metrics_path: Path, out: Path, heldout: dict[str, float] | None = None) -> None:
    """Reward per environment against step (raw and smoothed), with held-out accuracy marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    envs = sorted({e for r in rows for e in r.get("reward", {})})
    for env in envs:
        pts = [(r["step"], r["reward"][env]) for r in rows if env in r.get("reward", {})]
        steps, values = zip(*pts) if pts else ((), ())
        line, = ax.plot(steps, values, alpha=0.3)
        ax.plot(steps, _ema(values, 0.9), color=line.get_color(), label=f"{env} train reward (EMA)")
    for label, value in (heldout or {}).items():
        ax.axhline(value, linestyle="--", color="gray")
        ax.annotate(f"{label}: {value:.3f}", (0, value), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.set_xlabel("learner step")
    ax.set_ylabel("mean reward")
    ax.set_title(metrics_path.parent.name)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _ema(values: tuple[float, ...], decay: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else decay * acc + (1 - decay) * v
        out.append(acc)
    return out
