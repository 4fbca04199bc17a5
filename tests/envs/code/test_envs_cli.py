"""`codeworld envs ...` run as a user runs it: one JSON line on stdout, details in --out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from envs.data import data_root

REPO = Path(__file__).resolve().parents[3]
CODEWORLD = str(Path(sys.executable).parent / "codeworld")
DOCKER = json.dumps({"sandbox": {"backend": "docker"}})


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CODEWORLD, "envs", *args], capture_output=True, text=True, cwd=REPO, timeout=600)


def summary(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # exactly one JSON line
    return json.loads(lines[0])


def test_list_and_show() -> None:
    listed = cli("list")
    names = {line.split()[0] for line in listed.stdout.splitlines()}
    assert {"math", "humaneval", "mbpp", "mbpp_plus", "leetcode", "apps", "self_debug", "exec_trace"} <= names
    shown = cli("show", "self_debug")
    assert shown.returncode == 0 and "turns = 3" in shown.stdout and "Model turns at most" in shown.stdout
    missing = cli("show", "no_such_env")
    assert missing.returncode != 0 and "Unknown environment 'no_such_env'" in missing.stderr


def test_validate_humaneval_prints_counts_and_per_sample_lines(tmp_path: Path) -> None:
    out = tmp_path / "he.jsonl"
    counts = summary(cli("validate", "humaneval", "--limit", "5", "--params", DOCKER, "--out", str(out)))
    assert counts == {"env": "humaneval", "n": 5, "passed": 5, "failed": 0, "errors": 0}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [f"HumanEval/{i}" for i in range(5)]
    assert all(r["reward"] == 1.0 and r["info"]["total"] > 0 for r in rows)


def test_grade_counts_pass_fail_and_errors(tmp_path: Path) -> None:
    preds = tmp_path / "preds.jsonl"
    gold = next(json.loads(line) for line in (data_root() / "mbpp" / "mbpp.jsonl").open())["code"]
    preds.write_text(
        "\n".join(
            json.dumps(p)
            for p in [
                {"task_id": "mbpp/1", "output": f"```python\n{gold}\n```"},
                {"task_id": "mbpp/2", "output": "```python\ndef similar_elements(a, b):\n    return ()\n```"},
                {"task_id": "mbpp/99999", "output": "x"},
            ]
        )
        + "\n"
    )
    out = tmp_path / "graded.jsonl"
    counts = summary(cli("grade", "mbpp", "--predictions", str(preds), "--params", DOCKER, "--out", str(out)))
    assert counts == {"env": "mbpp", "n": 3, "passed": 1, "failed": 1, "errors": 1}
    by_id = {r["task_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert by_id["mbpp/99999"]["error"] == "unknown task_id"
    assert by_id["mbpp/2"]["info"]["passed"] == 0


def test_grade_math_answers(tmp_path: Path) -> None:
    preds = tmp_path / "preds.jsonl"
    preds.write_text(
        json.dumps({"task_id": "gsm8k-0", "output": "She makes \\boxed{18} dollars."})
        + "\n"
        + json.dumps({"task_id": "gsm8k-1", "output": "#### 3"})
        + "\n"
    )
    counts = summary(
        cli("grade", "math", "--data", str(data_root() / "gsm8k" / "test.jsonl"), "--predictions", str(preds))
    )
    assert counts == {"env": "math", "n": 2, "passed": 1, "failed": 1, "errors": 0}


def test_user_errors_name_the_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "mbpp/1"}\n')
    proc = cli("grade", "mbpp", "--predictions", str(bad))
    assert proc.returncode == 2 and "line 1" in proc.stderr and "string output" in proc.stderr
    proc = cli("validate", "mbpp", "--data", str(tmp_path / "absent.jsonl"))
    assert proc.returncode == 2 and "absent.jsonl" in proc.stderr
    proc = cli("validate", "mbpp", "--params", '{"reward_mode": "most"}')
    assert proc.returncode == 2 and "--params" in proc.stderr
