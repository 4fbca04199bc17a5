"""Config loading, overrides and the errors a user sees."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rl.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_reach_typed_fields(tmp_path: Path) -> None:
    p = write(tmp_path, "run: {steps: 7}\nenvs:\n  - name: arithmetic\n  - name: math\n    weight: 2\n")
    cfg = load_config(
        p, ["algorithm.max_staleness=0", "envs.1.weight=0.5", "learner.betas=[0.8, 0.9]", "envs.0.params.max_digits=3"]
    )
    assert cfg.run.steps == 7
    assert cfg.algorithm.max_staleness == 0 and cfg.algorithm.effective_max_age == 1
    assert [e.weight for e in cfg.envs] == [1.0, 0.5]
    assert cfg.learner.betas == (0.8, 0.9)
    assert cfg.envs[0].params == {"max_digits": 3}


def test_core_lists_read_as_text_whether_or_not_yaml_saw_a_number() -> None:
    assert load_config(None, ["rollout.cpu_cores=1"]).rollout.cpu_cores == "1"
    assert load_config(None, ["rollout.cpu_cores=0-3,6"]).rollout.cpu_cores == "0-3,6"


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("algorithm.group_sise=4", "algorithm.group_sise"),
        ("learner.lr=-1", "learner.lr"),
        ("rollout.temperature=hot", "rollout.temperature"),
        ("envs.0.weight=0", "envs.0.weight"),
        ("rollout.cpu_cores=first", "rollout.cpu_cores"),
        ("learner.warmup_steps=-1", "learner.warmup_steps"),
    ],
)
def test_bad_key_or_value_names_its_path(tmp_path: Path, override: str, path: str) -> None:
    p = write(tmp_path, "envs: [{name: arithmetic}]\n")
    with pytest.raises(ConfigError, match=re.escape(path + ":")):
        load_config(p, [override])


def test_override_errors_are_one_sentence(tmp_path: Path) -> None:
    p = write(tmp_path, "envs: [{name: arithmetic}]\n")
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(p, ["algorithm.max_staleness"])
    with pytest.raises(ConfigError, match="'envs.5'"):
        load_config(p, ["envs.5.weight=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="eval set names repeat: \\['arithmetic'\\]"):
        load_config(p, ["eval.sets=[{env: arithmetic}, {env: arithmetic, pass_k: 4}]"])
    with pytest.raises(ConfigError, match="would measure nothing"):
        load_config(p, ["eval.sets=[{env: arithmetic, greedy: false}]"])
    with pytest.raises(ConfigError, match="logging.trackers.0"):
        load_config(p, ["logging.trackers=[tensorbored]"])


def test_dry_run_prints_the_plan_without_starting_anything(tiny_model: str) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rl.cli",
            "train",
            str(REPO / "examples/demo.yaml"),
            f"model.path={tiny_model}",
            "learner.world_size=2",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert out.returncode == 0, out.stderr
    assert "1.04 M params" in out.stdout
    assert "learner: 2 rank(s)" in out.stdout
    assert "engines: 1 x (" in out.stdout
    assert "no Ray cluster (RAY_ADDRESS is unset)" in out.stdout  # per node: tests/e2e/test_cluster.py


def test_cli_rejects_unknown_key_with_its_path(tiny_model: str) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rl.cli",
            "train",
            str(REPO / "examples/demo.yaml"),
            "rollout.max_tokenz=3",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 2
    assert "rollout.max_tokenz: Extra inputs are not permitted" in out.stderr


def test_a_max_age_below_the_staleness_bound_is_refused(tmp_path: Path) -> None:
    """Issue #9: `max_age < max_staleness` used to be accepted, dropping groups the bound admits."""
    p = write(tmp_path, "envs: [{name: arithmetic}]\n")
    with pytest.raises(ConfigError, match=r"algorithm: .*max_age \(1\) is below max_staleness \(4\)"):
        load_config(p, ["algorithm.max_staleness=4", "algorithm.max_age=1"])
    assert load_config(p, ["algorithm.max_staleness=4", "algorithm.max_age=4"]).algorithm.effective_max_age == 4


def test_every_engine_gets_its_own_seed(tmp_path: Path) -> None:
    """Issue #9: all engines shared the run's seed, so they drew the same samples for a prompt."""
    from rl.orchestrator import engine_configs

    cfg = load_config(write(tmp_path, "envs: [{name: arithmetic}]\n"), ["rollout.num_workers=3", "run.seed=5"])
    assert [e.seed for e in engine_configs(cfg, tmp_path)] == [5, 6, 7]
