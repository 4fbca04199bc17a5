"""Trackers: TensorBoard, W&B (offline) and MLflow (local file store) receive the same metrics under
the same names, read back from what each wrote; samples reach W&B as tables; a tracker that is
configured but not installed is one clear error."""

from __future__ import annotations

import glob
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rl.config import LoggingSection, SamplesSection
from rl.metrics import MetricsWriter, make_trackers, step_metrics
from rl.samples import SampleStore
from rl.trajectory import Trajectory

REPO = Path(__file__).resolve().parents[2]


def _trajectories(step: int) -> list[Trajectory]:
    out = []
    for i in range(4):
        n = 3 + i
        out.append(
            Trajectory(
                id=f"t{step}-{i}",
                run_id="trk",
                env=("arithmetic", "mbpp")[i % 2],
                task_id=f"task{i}",
                group_id=f"g{step}",
                group_size=4,
                prompt_ids=np.arange(5),
                completion_ids=np.arange(10, 10 + n),
                loss_mask=np.ones(n),
                sampler_logprobs=np.zeros(n),
                policy_versions=np.full(n, step - 1),
                reward=float(i % 2),
                reward_info={"status": "timeout"} if i == 3 else {},
                truncated=i == 0,
                timings={"generate": 0.1, "episode": 0.15},
            )
        )
    return out


def _read_tensorboard(run_dir: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def _wandb_records(path: str) -> list[bytes]:
    """Records of a .wandb file: W&B's transaction log, the LevelDB log format (a 7-byte file
    header, 32 KiB blocks of records with a 7-byte header: CRC, length, type) of protobufs."""
    data, block, pos, out, part = Path(path).read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the tail of a block too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part, pos = part + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST
            out.append(part)
            part = b""
        elif kind == 0:
            break
    return out


def _read_wandb(run_dir: Path) -> dict[tuple[str, int], float]:
    from wandb.proto import wandb_internal_pb2 as pb

    [path] = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    got: dict[tuple[str, int], float] = {}
    for raw in _wandb_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
        step = items.pop("_step")
        # samples/... are the tables' own entries (path, rows, columns), checked from the table files
        got.update({(k, step): v for k, v in items.items() if not k.startswith(("_", "samples/"))})
    return got


def _read_mlflow(run_dir: Path, run_id: str) -> dict[tuple[str, int], float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    names = client.get_run(run_id).data.metrics
    return {(name, m.step): m.value for name in names for m in client.get_metric_history(run_id, name)}


def test_every_tracker_gets_the_same_metrics_and_wandb_the_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    logging = LoggingSection(trackers=["tensorboard", "wandb", "mlflow"], wandb={"table_every": 2})
    trackers = make_trackers(tmp_path, "trk", logging, {"run": {"name": "trk"}})
    writer = MetricsWriter(tmp_path, trackers)
    store = SampleStore(tmp_path, SamplesSection(train_share=1.0), lambda ids: " ".join(map(str, ids)))
    expected: dict[tuple[str, int], float] = {}
    for step in range(1, 5):
        trajs = _trajectories(step)
        row = step_metrics(
            trajs,
            {"loss": 0.5 / step, "entropy": 2.0, "grad_norm": 1.5},
            version=step,
            dropped={"stale": step % 2},
            tokens_per_s=100.0 * step,
            timing={"train_s": 0.3, "sync_s": 0.1, "wait_s": 0.2, "step_s": 0.6, "elapsed_s": step},
        )
        expected.update({(k, step): v for k, v in writer.log(step, row).items()})
        writer.log_samples(step, "train", store.record_train(step, [trajs], trained_version=step - 1))
        if step % 2 == 0:
            logged = writer.log(step, {"eval/heldout/greedy": step / 10})
            expected.update({(k, step): v for k, v in logged.items()})
            writer.log_samples(step, "eval", store.record_eval(step, "heldout", trajs[:2]))
    mlflow_run = next(t for t in trackers if type(t).__name__ == "MlflowTracker").run_id
    writer.close()
    store.close()

    names = {name for name, _ in expected}
    assert {
        "train/reward_mean",
        "env/mbpp/reward_mean",
        "perf/tokens_per_s",
        "train/staleness/0",
        "train/dropped/stale",
        "eval/heldout/greedy",
    } <= names
    for label, got in (
        ("tensorboard", _read_tensorboard(tmp_path)),
        ("wandb", _read_wandb(tmp_path)),
        ("mlflow", _read_mlflow(tmp_path, mlflow_run)),
    ):
        assert set(got) == set(expected), (label, set(got) ^ set(expected))
        # TensorBoard stores float32; the others float64
        assert [got[k] for k in sorted(expected)] == pytest.approx([expected[k] for k in sorted(expected)], rel=1e-6), (
            label
        )
    tables = {
        Path(p).name.split("_")[0]: json.loads(Path(p).read_text())
        for p in glob.glob(
            str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "**" / "*.table.json"),
            recursive=True,
        )
    }
    assert set(tables) == {"train", "eval"}  # samples/train_<step>_…, samples/eval_<step>_…
    train = tables["train"]
    assert train["columns"][:5] == ["step", "kind", "eval_set", "env", "task_id"]
    completion = train["columns"].index("completion")
    assert "[model] 10 11 12" in [row[completion] for row in train["data"]]


def test_a_tracker_that_is_not_installed_is_one_clear_error(tmp_path: Path, tiny_model: str) -> None:
    """The package's absence is simulated by blocking its import in the child process (a second
    environment without it would be the only other way)."""
    code = (
        "import sys; sys.modules['mlflow'] = None\n"
        "from rl.cli import app\n"
        f"sys.argv = ['codeworld', 'train', {str(REPO / 'examples/demo.yaml')!r},"
        f" 'model.path={tiny_model}',"
        f" 'run.dir={tmp_path / 'run'}', 'logging.trackers=[tensorboard, mlflow]',"
        " 'logging.dashboard.enabled=false']\n"
        "app()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "codeworld: logging.trackers lists mlflow, but the 'mlflow' package is not installed: "
        "pip install 'codeworld[mlflow]'."
    )
