"""The dashboard on a real run: a short training run (Ray, vLLM, Redis, the learner) serves its
dashboard while it trains; a real headless Chromium watches the page update live, then reads the
finished run's curves and samples from `codeworld dashboard`'s server, and saves a screenshot."""

import asyncio
import json
import socket
import sqlite3
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from chromium import Chromium, chromium_path

from rl.api.server import DashboardServer
from rl.config import load_config
from rl.orchestrator import run_training

STEPS = 8
EVAL_EVERY = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runs(port: int) -> list[dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=5) as res:
            return json.load(res)["runs"]
    except OSError:
        return []


def _chart(browser: Chromium, key: str) -> dict[str, Any] | None:
    return next((c for c in browser.js("cwDash.charts()") if c["key"] == key), None)


def _reward_points(browser: Chromium) -> int:
    chart = _chart(browser, "reward")
    return chart["points"].get("arithmetic", 0) if chart else 0


def _watch_live(browser: Chromium, port: int, run_dir: Path, seen: dict[str, Any]) -> None:
    """While the run trains: open the page once the run exists, then wait for a live update."""
    try:
        deadline_s = 600
        for _ in range(deadline_s * 2):
            if any(r["id"] == "dash" for r in _runs(port)):
                break
            threading.Event().wait(0.5)
        browser.open(f"http://127.0.0.1:{port}/?run=dash")
        browser.wait_for("document.body && document.body.dataset.ready === '1'", 60, "the page to load")
        browser.js("window.loadedOnce = true")  # gone if the page reloaded
        before = _reward_points(browser)
        events = browser.js("cwDash.liveEvents()")
        browser.wait_for(f"cwDash.liveEvents() > {events}", deadline_s, "a live update")
        browser.wait_for(f"(cwDash.charts().find(c => c.key === 'reward') || {{points: {{}}}})"
                         f".points.arithmetic > {before}", 60, "the reward chart to grow")
        seen.update(before=before, after=_reward_points(browser), reloaded=not browser.js("window.loadedOnce === true"),
                    still_training=not (run_dir / "summary.json").exists())
    except BaseException as err:  # noqa: BLE001 - reported by the main thread
        seen["error"] = err


def test_dashboard_follows_a_real_run(tmp_path: Path, tiny_model: str, redis_url: str, ray_session: None,
                                      capfd: pytest.CaptureFixture[str]) -> None:
    assert chromium_path() is not None, "Chromium is missing: `make test` installs it (apt-get install chromium)"
    port, run_dir = _free_port(), tmp_path / "runs" / "dash"
    cfg = load_config(None, [
        "run.name=dash", f"run.dir={run_dir}", f"run.steps={STEPS}", f"model.path={tiny_model}",
        "rollout.max_tokens=8", "rollout.max_model_len=128", "algorithm.group_size=4", "algorithm.batch_size=4",
        "algorithm.filter_zero_variance=false", "learner.world_size=1", "envs=[{name: arithmetic}]",
        f"eval.every={EVAL_EVERY}", "eval.sets=[{env: arithmetic, n: 8, pass_k: 2}]",
        "logging.samples.train_share=0.5", "logging.progress=false", "logging.trackers=[]",
        f"logging.dashboard.port={port}", f"bus.redis_url={redis_url}"])
    browser = Chromium(tmp_path / "chromium")
    try:
        seen: dict[str, Any] = {}
        watcher = threading.Thread(target=_watch_live, args=(browser, port, run_dir, seen))
        watcher.start()
        summary = asyncio.run(run_training(cfg))
        watcher.join(timeout=120)
        assert "error" not in seen, seen.get("error")
        assert seen["still_training"] and not seen["reloaded"] and seen["after"] > seen["before"], seen
        assert f"dashboard of this run: http://127.0.0.1:{port}/?run=dash" in capfd.readouterr().err
        assert summary.steps == STEPS
        _check_finished_run(browser, tmp_path / "runs", run_dir)
    finally:
        browser.close()


def _check_finished_run(browser: Chromium, runs: Path, run_dir: Path) -> None:
    """The finished run through `codeworld dashboard`'s server: every step on the reward chart,
    the evaluation curve, and a recorded completion in the sample browser."""
    server = DashboardServer(runs, "127.0.0.1", 0, token=None)
    server.start()
    try:
        browser.open(server.url("dash"))
        browser.wait_for("document.body && document.body.dataset.ready === '1'", 60, "the page to load")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert sorted(r["step"] for r in rows if "env/arithmetic/reward_mean" in r) == list(range(1, STEPS + 1))
        assert _reward_points(browser) == STEPS
        browser.screenshot(run_dir / "dashboard.png")

        browser.js("cwDash.showTab('evaluation')")
        browser.wait_for("cwDash.charts().some(c => c.key === 'eval-greedy' && c.points.arithmetic > 0)", 30)
        eval_steps = [0, *range(EVAL_EVERY, STEPS + 1, EVAL_EVERY), STEPS]
        assert _chart(browser, "eval-greedy")["points"]["arithmetic"] == len(set(eval_steps))
        assert _chart(browser, "eval-pass_at_2")["points"]["arithmetic"] == len(set(eval_steps))

        browser.js("document.querySelector('nav button[data-tab=samples]').click()")
        browser.wait_for("document.querySelectorAll('#sample-table tbody tr').length > 0", 30, "the sample list")
        browser.js("document.querySelector('#sample-table tbody tr').click()")
        shown_id = browser.wait_for("document.querySelector('#sample-detail dd') && "
                                    "document.querySelector('#sample-detail dd').textContent", 30)
        shown = browser.js("document.querySelector('#sample-detail pre.completion').textContent")
        with sqlite3.connect(run_dir / "samples.db") as db:
            body = json.loads(db.execute("SELECT body FROM samples WHERE id = ?", (shown_id,)).fetchone()[0])
            kinds = {k for (k,) in db.execute("SELECT DISTINCT kind FROM samples")}
        assert shown == next(t["text"] for t in body["turns"] if t["role"] == "model")
        assert kinds == {"train", "eval"}
    finally:
        server.stop()
