"""The dashboard API on a real uvicorn server over a runs directory written by the real writers
(MetricsWriter, SampleStore with the tiny model's tokenizer): curves, downloads, samples, the live
stream, fuzzing from its own OpenAPI schema, path traversal, the token and read-only methods."""

from __future__ import annotations

import csv
import io
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from rl.api.app import create_app
from rl.api.server import DashboardServer
from rl.config import SamplesSection
from rl.metrics import MetricsWriter, step_metrics
from rl.samples import SampleStore
from rl.trajectory import Trajectory

STEPS = 10_000
SPIKE_STEP = 4321


def trajectory(tok, step: int, i: int, reward: float, env: str = "arithmetic") -> Trajectory:
    """A two-turn episode: model tokens, environment feedback, model tokens."""
    prompt = tok.encode(f"{i}+{step}=?")
    first, feedback, second = tok.encode(f"\\boxed{{{i}}}"), tok.encode("try again"), tok.encode(f"{step}")
    mask = [1] * len(first) + [0] * len(feedback) + [1] * len(second)
    versions = [v if m else -1 for v, m in zip([max(step - 2, 0)] * len(mask), mask)]
    return Trajectory(
        id=f"{env}-{step}-{i}",
        run_id="demo",
        env=env,
        task_id=f"task-{i % 5}",
        group_id=f"g{step}",
        group_size=4,
        prompt_ids=np.array(prompt),
        completion_ids=np.array(first + feedback + second),
        loss_mask=np.array(mask),
        sampler_logprobs=np.zeros(len(mask)),
        policy_versions=np.array(versions),
        reward=reward,
        reward_info={"extracted": str(i), "note": "<script>alert(1)</script>"},
        timings={"generate": 0.1, "episode": 0.2},
    )


def write_run(run_dir: Path, tok, steps: int, sample_every: int = 1, max_samples: int = 20000) -> None:
    writer = MetricsWriter(run_dir, [])
    store = SampleStore(run_dir, SamplesSection(train_share=1.0, max_samples=max_samples), tok.decode)
    for step in range(1, steps + 1):
        trajs = [
            trajectory(tok, step, i, float((i + step) % 3 == 0), env=("arithmetic", "math")[i % 2]) for i in range(4)
        ]
        row = step_metrics(
            trajs,
            {"loss": 0.1, "entropy": 1.0 - step / steps, "grad_norm": 0.5},
            version=step,
            dropped={"stale": 0},
            tokens_per_s=100.0,
            timing={"train_s": 0.5, "sync_s": 0.1, "wait_s": 0.2, "step_s": 0.8, "elapsed_s": step},
        )
        row["sandbox/node-1/docker-img/ready"] = 3.0
        if step == SPIKE_STEP:
            row["env/arithmetic/reward_mean"] = 50.0
        writer.log(step, row)
        if step % sample_every == 0:
            store.record_train(step, [trajs], trained_version=step - 1)
    writer.log(steps, {"eval/heldout/greedy": 0.25})
    store.record_eval(steps, "heldout", [trajectory(tok, steps, 9, 1.0)])
    writer.close()
    store.close()


def raw_status(port: int, target: bytes) -> int:
    """The status of a GET whose request target is sent byte for byte (clients normalise paths)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        head = sock.recv(64)
    return int(head.split(b" ")[1])


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: str) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    root = tmp_path_factory.mktemp("runs")
    write_run(root / "demo", tok, STEPS, sample_every=5, max_samples=2000)
    write_run(root / "sweep" / "lr-1", tok, 30)
    outside = root.parent / f"{root.name}-outside"
    write_run(outside / "secret", tok, 3)
    (root / "link_out").symlink_to(outside / "secret", target_is_directory=True)
    planted = root / "planted"
    planted.mkdir()
    (planted / "metrics.jsonl").symlink_to(outside / "secret" / "metrics.jsonl")
    half = root / "half"  # a real run whose sample store is a link to another run's
    half.mkdir()
    (half / "metrics.jsonl").write_text('{"step": 1, "train/reward_mean": 0.5}\n')
    (half / "samples.db").symlink_to(outside / "secret" / "samples.db")
    return root


@pytest.fixture(scope="module")
def server(runs_dir: Path) -> Iterator[DashboardServer]:
    srv = DashboardServer(runs_dir, "127.0.0.1", 0, token=None)
    srv.start()
    base = f"http://127.0.0.1:{srv.port}"
    deadline = time.time() + 30
    while True:
        try:
            httpx.get(base + "/api/runs", timeout=2)
            break
        except httpx.TransportError:
            assert time.time() < deadline, "the dashboard did not start"
            time.sleep(0.1)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: DashboardServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as c:
        yield c


def test_runs_are_found_two_levels_down_never_through_links(client: httpx.Client) -> None:
    runs = {r["id"]: r for r in client.get("/api/runs").json()["runs"]}
    assert set(runs) == {"demo", "sweep/lr-1", "half"}
    assert runs["demo"]["steps"] == STEPS and runs["demo"]["has_samples"]
    assert not runs["half"]["has_samples"]


def test_a_long_run_is_downsampled_on_the_server_keeping_its_ends_and_peaks(client: httpx.Client) -> None:
    start = time.perf_counter()
    names = ["env/arithmetic/reward_mean", "train/loss"]
    got = client.get("/api/series", params={"run": "demo", "name": names, "points": 1000}).json()["series"]
    first_s = time.perf_counter() - start
    reward = next(s for s in got if s["name"] == "env/arithmetic/reward_mean")
    assert reward["total"] == STEPS and len(reward["steps"]) == 1000
    assert reward["steps"][0] == 1 and reward["steps"][-1] == STEPS
    assert reward["steps"] == sorted(reward["steps"])
    assert SPIKE_STEP in reward["steps"] and max(reward["values"]) == 50.0
    start = time.perf_counter()
    client.get("/api/series", params={"run": "demo", "name": "env/arithmetic/reward_mean"})
    again_s = time.perf_counter() - start
    print(f"10k-step run: first curve request {first_s:.2f} s (reads the file), next {again_s * 1000:.0f} ms")
    assert first_s < 10 and again_s < 1.0


def test_curves_download_whole_as_csv_and_json(client: httpx.Client) -> None:
    names = ["train/reward_mean", "eval/heldout/greedy"]
    res = client.get("/api/series", params={"run": ["demo", "sweep/lr-1"], "name": names, "points": 0, "format": "csv"})
    assert res.headers["content-type"].startswith("text/csv")
    assert "attachment" in res.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(res.text)))
    assert len([r for r in rows if r["run"] == "demo" and r["name"] == "train/reward_mean"]) == STEPS
    assert [r for r in rows if r["name"] == "eval/heldout/greedy" and r["run"] == "sweep/lr-1"] == [
        {"run": "sweep/lr-1", "name": "eval/heldout/greedy", "step": "30", "value": "0.25"}
    ]
    as_json = client.get("/api/series", params={"run": "sweep/lr-1", "name": names, "points": 0}).json()
    assert {s["name"]: len(s["steps"]) for s in as_json["series"]} == {
        "train/reward_mean": 30,
        "eval/heldout/greedy": 1,
    }


def test_samples_filter_page_and_read_turn_by_turn(client: httpx.Client, tiny_model: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    run = "sweep/lr-1"
    facets = client.get("/api/samples/facets", params={"run": run}).json()
    assert facets["envs"] == ["arithmetic", "math"] and facets["eval_sets"] == ["heldout"]
    assert (facets["min_step"], facets["max_step"], facets["count"]) == (1, 30, 30 * 4 + 1)
    page = client.get(
        "/api/samples", params={"run": run, "env": "math", "min_step": 10, "max_step": 19, "min_reward": 1, "limit": 3}
    ).json()
    expected = [(s, i) for s in range(10, 20) for i in (1, 3) if (i + s) % 3 == 0]
    assert page["total"] == len(expected) and len(page["items"]) == 3
    assert all(it["env"] == "math" and it["reward"] == 1.0 and 10 <= it["step"] <= 19 for it in page["items"])
    assert [it["step"] for it in page["items"]] == sorted((s for s, _ in expected), reverse=True)[:3]
    rest = client.get(
        "/api/samples",
        params={"run": run, "env": "math", "min_step": 10, "max_step": 19, "min_reward": 1, "limit": 3, "offset": 3},
    ).json()
    assert len(rest["items"]) == page["total"] - 3
    evals = client.get("/api/samples", params={"run": run, "kind": "eval"}).json()
    assert [it["eval_set"] for it in evals["items"]] == ["heldout"]
    one = client.get("/api/sample", params={"run": run, "id": "arithmetic-7-0"}).json()
    assert [t["role"] for t in one["turns"]] == ["model", "env", "model"]
    assert one["turns"][0]["text"] == tok.decode(tok.encode("\\boxed{0}"))
    assert one["turns"][1]["text"] == tok.decode(tok.encode("try again")) and one["staleness"] == 1
    assert one["prompt"] == tok.decode(tok.encode("0+7=?"))
    assert (one["policy_min"], one["policy_max"]) == (5, 5)
    across = client.get("/api/task", params={"run": run, "task_id": "task-0"}).json()["items"]
    assert [s["step"] for s in across] == sorted(s["step"] for s in across) and len(across) > 5
    assert {s["task_id"] for s in across} == {"task-0"}


def test_the_store_keeps_only_the_newest_samples(runs_dir: Path, client: httpx.Client) -> None:
    facets = client.get("/api/samples/facets", params={"run": "demo"}).json()
    written = [step for step in range(5, STEPS + 1, 5) for _ in range(4)] + [STEPS]  # + the evaluation one
    assert facets["count"] == 2000 and facets["max_step"] == STEPS
    assert facets["min_step"] == min(written[-2000:]) > 5
    size_mb = (runs_dir / "demo" / "samples.db").stat().st_size / 2**20
    print(f"{len(written)} samples written, 2000 kept in {size_mb:.1f} MB")
    assert size_mb < 8


@pytest.mark.parametrize(
    "run",
    [
        "..",
        "../secret",
        "/",
        "/etc",
        "demo/..",
        "demo/../..",
        "./demo",
        "link_out",
        "planted",
        "sweep/../../secret",
        "%2e%2e%2fsecret",
        "\\..\\secret",
        "demo\x00",
    ],
)
def test_paths_outside_the_runs_are_404(client: httpx.Client, runs_dir: Path, run: str) -> None:
    for path in ("/api/metrics", "/api/samples", "/api/samples/facets"):
        assert client.get(path, params={"run": run}).status_code == 404, (path, run)
    absolute = runs_dir.parent / f"{runs_dir.name}-outside" / "secret"
    assert (absolute / "metrics.jsonl").is_file()
    assert client.get("/api/metrics", params={"run": str(absolute)}).status_code == 404


def test_encoded_and_symlinked_paths_are_404(client: httpx.Client, server: DashboardServer) -> None:
    assert client.get("/api/samples/facets", params={"run": "half"}).status_code == 404  # linked store
    raw = [
        b"/api/metrics?run=%2E%2E%2Fsecret",
        b"/api/metrics?run=..%2F..%2Fetc",
        b"/static/..%2Fapp.py",
        b"/static/%2e%2e/%2e%2e/config.py",
        b"/static/..%2F..%2F..%2Fpyproject.toml",
        b"/static/%2fetc%2fpasswd",
    ]
    for target in raw:
        assert raw_status(server.port, target) == 404, target
    assert client.get("/static/vendor/uplot/LICENSE").status_code == 200


@pytest.mark.parametrize(
    "query",
    [
        {"min_step": 2**70},
        {"offset": 2**64},
        {"min_reward": "nan"},
        {"max_reward": "inf"},
        {"limit": 0},
        {"kind": "both"},
    ],
)
def test_out_of_range_filters_are_refused_not_crashed_on(client: httpx.Client, query: dict) -> None:
    # The first was found by the schema fuzzer: a step beyond SQLite's 64-bit integers was a 500.
    assert client.get("/api/samples", params={"run": "demo", **query}).status_code == 422


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_read_only(client: httpx.Client, method: str) -> None:
    assert client.request(method, "/api/runs").status_code == 405


def test_foreign_host_names_are_refused_without_a_token(client: httpx.Client) -> None:
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example.
    assert client.get("/api/runs", headers={"Host": "evil.example:8700"}).status_code == 403
    assert client.get("/api/runs", headers={"Host": "localhost:1"}).status_code == 200


def test_a_token_is_required_on_every_request_once_set(runs_dir: Path) -> None:
    srv = DashboardServer(runs_dir, "127.0.0.1", 0, token="s3cret-token")
    srv.start()
    try:
        base = f"http://127.0.0.1:{srv.port}"
        assert httpx.get(base + "/api/runs").status_code == 401
        assert httpx.get(base + "/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        bearer = {"Authorization": "Bearer s3cret-token"}
        assert httpx.get(base + "/api/runs", headers=bearer).status_code == 200
        page = httpx.get(base + "/", params={"token": "s3cret-token"})
        assert page.status_code == 200 and "codeworld_token=s3cret-token" in page.headers["set-cookie"]
        assert "httponly" in page.headers["set-cookie"].lower()
        assert httpx.get(base + "/api/runs", cookies={"codeworld_token": "s3cret-token"}).status_code == 200
        assert srv.url("demo").endswith("?run=demo&token=s3cret-token")
    finally:
        srv.stop()


def test_a_request_from_another_machine_needs_the_token(runs_dir: Path) -> None:
    """A real non-local request: a container on Docker's bridge network asks a dashboard that listens
    on the bridge address."""
    import docker

    from workers.sandbox import DEFAULT_IMAGE

    bridge = docker.from_env().networks.get("bridge").attrs["IPAM"]["Config"]
    gateway = next((c.get("Gateway") for c in bridge if c.get("Gateway")), None) or "172.17.0.1"
    srv = DashboardServer(runs_dir, gateway, 0, token=None)
    assert srv.token, "listening beyond loopback must make a token"
    srv.start()
    try:
        probe = (
            "import sys, urllib.request, urllib.error\n"
            "def get(url):\n"
            "    try:\n        return urllib.request.urlopen(url, timeout=10).status\n"
            "    except urllib.error.HTTPError as e:\n        return e.code\n"
            f"print(get('http://{gateway}:{srv.port}/api/runs'),"
            f" get('http://{gateway}:{srv.port}/api/runs?token={srv.token}'))\n"
        )
        out = docker.from_env().containers.run(
            DEFAULT_IMAGE, ["python3", "-c", probe], remove=True, network_mode="bridge"
        )
        assert out.decode().split() == ["401", "200"]
    finally:
        srv.stop()


def _read_events(lines, events: list[tuple[str, dict]], done) -> None:
    """Reads server-sent events into `events` until `done(events)`; 30 s at most."""
    kind, deadline = None, time.time() + 30
    for line in lines:  # a keep-alive comment arrives every 15 s at the latest
        assert time.time() < deadline, f"not the events awaited within 30 s: {events}"
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: ") and kind:
            events.append((kind, json.loads(line.removeprefix("data: "))))
        if done(events):
            return


def test_the_live_stream_sends_new_rows_and_samples(runs_dir: Path, server: DashboardServer, tiny_model: str) -> None:
    """A run resumed into the watched directory rewrites its metrics file: the stream says so
    (`rewound`, with the whole file) and then sends the rows appended after it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    run_dir = runs_dir / "growing"
    write_run(run_dir, tok, 2)
    time.sleep(2.1)  # the run list is cached for two seconds
    events: list[tuple[str, dict]] = []
    with httpx.stream(
        "GET", f"http://127.0.0.1:{server.port}/api/events", params={"run": "growing"}, timeout=30
    ) as res:
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
        lines = res.iter_lines()
        writer = MetricsWriter(run_dir, [], resume_step=1)
        writer.log(2, {"train/reward_mean": 0.75})
        store = SampleStore(run_dir, SamplesSection(train_share=1.0), tok.decode)
        store.record_train(3, [[trajectory(tok, 3, 0, 1.0)]], trained_version=2)
        _read_events(lines, events, lambda got: {k for k, _ in got} == {"metrics", "samples"})
        writer.log(3, {"train/reward_mean": 0.5})
        _read_events(lines, events, lambda got: sum(k == "metrics" for k, _ in got) == 2)
        writer.close()
        store.close()
    rewound, appended = [d for k, d in events if k == "metrics"]
    assert rewound["rewound"] and [r["step"] for r in rewound["rows"]] == [1, 2]
    assert rewound["rows"][1] == {"step": 2, "train/reward_mean": 0.75}
    assert not appended["rewound"] and appended["rows"] == [{"step": 3, "train/reward_mean": 0.5}]


# The app's own schema; the app object is built over no runs directory only to produce it, and the
# generated requests go to the real server of the `server` fixture.
api_schema = schemathesis.openapi.from_dict(create_app(Path(".")).openapi())


@api_schema.parametrize()
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzzed_from_its_schema_no_server_errors(case, server: DashboardServer) -> None:
    """Generated requests, as generated and again with a real run id (to reach past the lookup)."""
    base = f"http://127.0.0.1:{server.port}"
    case.call_and_validate(base_url=base, checks=[not_a_server_error])
    if case.query and "run" in case.query:
        case.query = {**case.query, "run": ["demo"] if isinstance(case.query["run"], list) else "demo"}
        case.call_and_validate(base_url=base, checks=[not_a_server_error])


def test_openapi_lists_every_route_with_its_parameters(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {
        "/api/runs",
        "/api/metrics",
        "/api/series",
        "/api/samples",
        "/api/samples/facets",
        "/api/sample",
        "/api/task",
    }
