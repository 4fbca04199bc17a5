"""The dashboard on a real run: a short training run (Ray, vLLM, Redis, the learner) serves its
dashboard while it trains; a real headless Chromium watches the page update live, then reads the
finished run's curves and samples from `codeworld dashboard`'s server, and saves a screenshot."""

import asyncio
import json
import math
import socket
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from chromium import Chromium, chromium_path

from rl.api.server import DashboardServer
from rl.config import SamplesSection, load_config
from rl.metrics import MetricsWriter, step_metrics
from rl.orchestrator import run_training
from rl.samples import SampleStore
from rl.trajectory import Trajectory

STEPS = 8
EVAL_EVERY = 3
NO_CHROMIUM = "Chromium is missing: `make test` installs it (apt-get install chromium)"


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
        browser.wait_for(
            f"(cwDash.charts().find(c => c.key === 'reward') || {{points: {{}}}}).points.arithmetic > {before}",
            60,
            "the reward chart to grow",
        )
        seen.update(
            before=before,
            after=_reward_points(browser),
            reloaded=not browser.js("window.loadedOnce === true"),
            still_training=not (run_dir / "summary.json").exists(),
        )
    except BaseException as err:  # noqa: BLE001 - reported by the main thread
        seen["error"] = err


def test_dashboard_follows_a_real_run(
    tmp_path: Path, tiny_model: str, redis_url: str, ray_session: None, capfd: pytest.CaptureFixture[str]
) -> None:
    assert chromium_path() is not None, NO_CHROMIUM
    port, run_dir = _free_port(), tmp_path / "runs" / "dash"
    cfg = load_config(
        None,
        [
            "run.name=dash",
            f"run.dir={run_dir}",
            f"run.steps={STEPS}",
            f"model.path={tiny_model}",
            "rollout.max_tokens=8",
            "rollout.max_model_len=128",
            "algorithm.group_size=4",
            "algorithm.batch_size=4",
            "algorithm.filter_zero_variance=false",
            "learner.world_size=1",
            "envs=[{name: arithmetic}]",
            f"eval.every={EVAL_EVERY}",
            "eval.sets=[{env: arithmetic, n: 8, pass_k: 2}]",
            "logging.samples.train_share=0.5",
            "logging.progress=false",
            "logging.trackers=[]",
            f"logging.dashboard.port={port}",
            f"bus.redis_url={redis_url}",
        ],
    )
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
        trained = sorted(r["step"] for r in rows if "env/arithmetic/reward_mean" in r)
        assert trained == list(range(1, STEPS + 1))
        assert _reward_points(browser) == STEPS
        browser.screenshot(run_dir / "dashboard.png")

        # The held-out curves beside the train reward, one point per evaluation, the rest in their tab.
        evaluated = len({0, *range(EVAL_EVERY, STEPS + 1, EVAL_EVERY), STEPS})
        assert _chart(browser, "heldout")["points"] == {
            "arithmetic greedy": evaluated,
            "arithmetic pass_at_2": evaluated,
        }
        browser.js("cwDash.showTab('evaluation')")
        browser.wait_for("cwDash.charts().some(c => c.key === 'eval-sampled_mean')", 30, "the evaluation tab")
        assert _chart(browser, "eval-sampled_mean")["points"] == {"arithmetic": evaluated}

        browser.js("document.querySelector('nav button[data-tab=samples]').click()")
        browser.wait_for("document.querySelectorAll('#sample-table tbody tr').length > 0", 30, "the sample list")
        browser.js("document.querySelector('#sample-table tbody tr').click()")
        shown_id = browser.wait_for(
            "document.querySelector('#sample-detail dd') && document.querySelector('#sample-detail dd').textContent", 30
        )
        shown = browser.js("document.querySelector('#sample-detail pre.completion').textContent")
        with sqlite3.connect(run_dir / "samples.db") as db:
            body = json.loads(db.execute("SELECT body FROM samples WHERE id = ?", (shown_id,)).fetchone()[0])
            kinds = {k for (k,) in db.execute("SELECT DISTINCT kind FROM samples")}
        assert shown == next(t["text"] for t in body["turns"] if t["role"] == "model")
        assert kinds == {"train", "eval"}
    finally:
        server.stop()


def _long_run(run_dir: Path, steps: int) -> None:
    """A run of `steps` steps with the metric rows a real step writes (one row made by the real
    code, its values varied per step) and a full sample store."""
    trajs = [
        Trajectory(
            id=f"x{i}",
            run_id="long",
            env=("arithmetic", "math")[i % 2],
            task_id=f"t{i}",
            group_id="g",
            group_size=8,
            prompt_ids=np.arange(40),
            completion_ids=np.arange(60),
            loss_mask=np.ones(60),
            sampler_logprobs=np.zeros(60),
            policy_versions=np.zeros(60),
            reward=float(i % 3 == 0),
        )
        for i in range(8)
    ]
    learner = {"loss": 0.1, "entropy": 1.0, "clip_frac": 0.01, "mismatch_kl": 1e-4, "grad_norm": 0.5, "tokens": 1000}
    timing = {"train_s": 0.5, "sync_s": 0.1, "wait_s": 0.2, "step_s": 0.8, "elapsed_s": 1.0}
    template = step_metrics(
        trajs, learner, version=1, dropped={"stale": 0, "no_reward": 0}, tokens_per_s=1000.0, timing=timing
    )
    writer = MetricsWriter(run_dir, [])
    samples = SamplesSection(train_share=1.0, max_samples=20000)
    store = SampleStore(run_dir, samples, lambda ids: "7" * len(ids))
    for step in range(1, steps + 1):
        writer.log(step, {k: v * (1 + 0.2 * math.sin(step / 300)) for k, v in template.items()})
        if step % 4 == 0:
            group = [t.model_copy(update={"id": f"{step}-{t.id}"}) for t in trajs]
            store.record_train(step, [group], step - 1)
        if step % 500 == 0:
            writer.log(step, {"eval/arithmetic/greedy": step / steps})
    writer.close()
    store.close()


def test_a_ten_thousand_step_run_loads_quickly(tmp_path: Path) -> None:
    assert chromium_path() is not None, NO_CHROMIUM
    steps = 10_000
    _long_run(tmp_path / "runs" / "long", steps)
    server = DashboardServer(tmp_path / "runs", "127.0.0.1", 0, token=None)
    server.start()
    browser = Chromium(tmp_path / "chromium")
    try:
        start = time.perf_counter()
        browser.open(server.url("long"))
        browser.wait_for("document.body && document.body.dataset.ready === '1'", 60, "the page to load")
        loaded_s = time.perf_counter() - start
        reward = _chart(browser, "reward")["points"]
        # Every curve arrives downsampled to 1000 points; both environments are drawn.
        labels = ("arithmetic", "math", "all")
        assert reward == {f"{label}{raw}": 1000 for label in labels for raw in ("", " (raw)")}
        browser.js("document.querySelector('nav button[data-tab=samples]').click()")
        browser.wait_for("document.querySelectorAll('#sample-table tbody tr').length === 50", 30, "a page of samples")
        samples_s = time.perf_counter() - start - loaded_s
        print(
            f"10 000-step run: training tab drawn in {loaded_s:.2f} s, first page of 20 000 samples "
            f"in {samples_s:.2f} s"
        )
        assert loaded_s < 10 and samples_s < 5
    finally:
        browser.close()
        server.stop()
