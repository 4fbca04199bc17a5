"""Trajectory bus and private redis-server, against a real redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from rl.bus import GROUP, TrajectoryBus, stream_key
from rl.config import ConfigError, load_config
from rl.redis_server import PrivateRedis, RedisUnavailable, connect_or_start, redact
from rl.trajectory import Trajectory

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_id() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def make_trajectory(i: int, n: int = 7) -> Trajectory:
    rng = np.random.default_rng(i)
    mask = rng.integers(0, 2, n)
    return Trajectory(
        id=f"traj-{i}",
        run_id="r",
        env="math",
        task_id=f"task-{i // 4}",
        group_id=f"g-{i // 4}",
        group_size=4,
        prompt_ids=rng.integers(0, 50_000, 5),
        completion_ids=rng.integers(0, 50_000, n),
        loss_mask=mask,
        sampler_logprobs=np.where(mask, -rng.random(n), 0.0),
        policy_versions=np.where(mask, i % 3, -1),
        reward=float(i) / 2,
        reward_info={"answer": str(i), "ok": True},
        timings={"generate": 0.25},
        truncated=i % 2 == 1,
    )


def traj_ids(got: list[tuple[str, Trajectory]]) -> list[str]:
    return [t.id for _, t in got]


def drain(bus: TrajectoryBus, block_ms: int = 50) -> list[tuple[str, Trajectory]]:
    out: list[tuple[str, Trajectory]] = []
    while batch := bus.read(100, block_ms):
        out += batch
    return out


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, left to a non-reaping init, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_gone(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_round_trip_keeps_arrays_and_dtypes(redis_url: str, run_id: str) -> None:
    sent = make_trajectory(3, n=1000)
    with TrajectoryBus(redis_url, run_id) as bus:
        [entry_id] = bus.publish([sent])
        [(got_id, got)] = bus.read(10, 100)
    assert got_id == entry_id
    for name in ("prompt_ids", "completion_ids", "loss_mask", "sampler_logprobs", "policy_versions"):
        want, have = getattr(sent, name), getattr(got, name)
        assert have.dtype == want.dtype, name
        np.testing.assert_array_equal(have, want, err_msg=name)
    assert got.model_dump(
        exclude={"prompt_ids", "completion_ids", "loss_mask", "sampler_logprobs", "policy_versions"}
    ) == sent.model_dump(exclude={"prompt_ids", "completion_ids", "loss_mask", "sampler_logprobs", "policy_versions"})
    assert got.sampler_logprobs.dtype == np.float32 and got.completion_ids.dtype == np.int32


def test_publish_order_is_read_order(redis_url: str, run_id: str) -> None:
    with TrajectoryBus(redis_url, run_id) as bus:
        sent = [make_trajectory(i) for i in range(30)]
        ids = bus.publish(sent[:10]) + bus.publish(sent[10:25]) + bus.publish(sent[25:])
        got = []
        while len(got) < 30:
            got += bus.read(7, 100)
        assert [entry_id for entry_id, _ in got] == ids
        assert traj_ids(got) == [t.id for t in sent]
        assert bus.published_total() == 30


def test_unacked_redelivered_to_same_consumer_after_restart(redis_url: str, run_id: str) -> None:
    sent = [make_trajectory(i) for i in range(4)]
    with TrajectoryBus(redis_url, run_id) as learner:
        learner.publish(sent)
        first = learner.read(10, 100)
        assert traj_ids(first) == ["traj-0", "traj-1", "traj-2", "traj-3"]
        assert learner.ack([first[0][0], first[2][0]]) == 2
    # A restart: a new bus object under the same name, long before any idle threshold.
    with TrajectoryBus(redis_url, run_id, claim_idle_ms=3_600_000) as restarted:
        again = restarted.read(1, 100) + restarted.read(1, 100)
        assert traj_ids(again) == ["traj-1", "traj-3"]
        assert restarted.redelivered == 2
        assert restarted.read(10, 100) == []  # acknowledged ones never come back
        restarted.ack([entry_id for entry_id, _ in again])
        assert restarted.pending_count() == 0
    with TrajectoryBus(redis_url, run_id) as once_more:
        assert drain(once_more) == []


def test_unacked_claimed_by_new_consumer_after_idle_threshold(redis_url: str, run_id: str) -> None:
    with TrajectoryBus(redis_url, run_id, consumer="learner-a") as learner:
        learner.publish([make_trajectory(i) for i in range(3)])
        got = learner.read(10, 100)
        learner.ack([got[1][0]])
    # Before the threshold the old consumer counts as alive: its entries stay with it.
    with TrajectoryBus(redis_url, run_id, consumer="learner-b", claim_idle_ms=400) as early:
        assert drain(early) == []
        assert early.pending_count() == 2
    time.sleep(0.5)
    with TrajectoryBus(redis_url, run_id, consumer="learner-c", claim_idle_ms=400) as late:
        claimed = drain(late)
        assert traj_ids(claimed) == ["traj-0", "traj-2"]
        late.ack([entry_id for entry_id, _ in claimed])
    time.sleep(0.5)
    with TrajectoryBus(redis_url, run_id, consumer="learner-d", claim_idle_ms=400) as after:
        assert drain(after) == []
        assert after.pending_count() == 0 and after.backlog() == 0


def test_ack_deletes_and_counts_follow(redis_url: str, run_id: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    with TrajectoryBus(redis_url, run_id) as bus:
        bus.publish([make_trajectory(i) for i in range(5)])
        assert (bus.backlog(), bus.pending_count()) == (5, 0)
        got = bus.read(2, 100)
        assert (bus.backlog(), bus.pending_count()) == (3, 2)
        assert bus.ack([entry_id for entry_id, _ in got]) == 2
        assert (bus.backlog(), bus.pending_count()) == (3, 0)
        assert raw.xlen(stream_key(run_id)) == 3
        assert bus.ack([entry_id for entry_id, _ in got]) == 0  # acking twice is harmless
    raw.close()


def test_bad_entries_are_dropped_and_counted(redis_url: str, run_id: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    key = stream_key(run_id)
    with TrajectoryBus(redis_url, run_id) as bus:
        bus.publish([make_trajectory(0)])
        raw.xadd(key, {b"t": b"\xc1 not msgpack"})
        raw.xadd(key, {b"other": b"no t field"})
        raw.xadd(key, {b"t": make_trajectory(1).encode()[:-3]})  # truncated
        bus.publish([make_trajectory(2)])
        got = drain(bus)
        assert traj_ids(got) == ["traj-0", "traj-2"]
        assert bus.decode_errors == 3
        bus.ack([entry_id for entry_id, _ in got])
        assert bus.pending_count() == 0 and raw.xlen(key) == 0
    raw.close()


def test_bad_pending_entry_after_restart_does_not_hide_good_ones(redis_url: str, run_id: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    with TrajectoryBus(redis_url, run_id) as bus:
        raw.xadd(stream_key(run_id), {b"t": b"garbage"})
        bus.publish([make_trajectory(5)])
        raw.xreadgroup(GROUP, "learner-0", {stream_key(run_id): ">"}, count=10)  # deliver, no ack
    with TrajectoryBus(redis_url, run_id) as restarted:
        assert traj_ids(restarted.read(1, 100)) == ["traj-5"]
        assert restarted.decode_errors == 1
    raw.close()


async def test_async_methods_and_cancelled_read_keeps_its_entries(redis_url: str, run_id: str) -> None:
    with TrajectoryBus(redis_url, run_id) as bus:
        assert await bus.aread(10, 50) == []  # leaves the restart phase: the next read blocks
        reader = asyncio.ensure_future(bus.aread(10, 1500))
        await asyncio.sleep(0.2)
        reader.cancel()
        await asyncio.to_thread(TrajectoryBus(redis_url, run_id).publish, [make_trajectory(9)])
        with pytest.raises(asyncio.CancelledError):
            await reader
        # The cancelled read's thread still received the entry; it must not be lost until restart.
        got = await bus.aread(10, 3000)
        assert traj_ids(got) == ["traj-9"]
        assert await bus.aack([got[0][0]]) == 1
        assert await bus.apublish([make_trajectory(10)]) and bus.backlog() == 1


def test_import_is_light() -> None:
    code = "import sys, rl.bus; assert 'torch' not in sys.modules and 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_private_redis_leaves_no_process_after_close() -> None:
    server = PrivateRedis()
    pid, data_dir = server.pid, server.dir
    assert redis.Redis.from_url(server.url).ping()
    server.close()
    assert wait_gone(pid, 0.5)
    assert not data_dir.exists()
    server.close()  # idempotent


def test_private_redis_dies_with_sigkilled_parent() -> None:
    code = (
        "import time; from rl.redis_server import PrivateRedis; s = PrivateRedis(); "
        "print(s.pid, s.url, flush=True); time.sleep(120)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        pid_text, url = parent.stdout.readline().split()
        pid = int(pid_text)
        assert redis.Redis.from_url(url).ping()
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(5)
        assert wait_gone(pid, 5.0), f"redis-server {pid} outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait()


def test_private_redis_started_on_a_short_lived_thread_outlives_it() -> None:
    # PR_SET_PDEATHSIG follows the forking *thread*; the server must not die with it.
    holder: list[PrivateRedis] = []
    starter = threading.Thread(target=lambda: holder.append(PrivateRedis()))
    starter.start()
    starter.join()
    with holder[0] as server:
        time.sleep(0.3)
        assert alive(server.pid)
        assert redis.Redis.from_url(server.url).ping()


def test_private_redis_appendonly_keeps_unacked_entries(tmp_path: Path) -> None:
    with PrivateRedis(appendonly=True, dir=tmp_path) as first:
        with TrajectoryBus(first.url, "durable") as bus:
            bus.publish([make_trajectory(1), make_trajectory(2)])
            bus.ack([bus.read(1, 100)[0][0]])
            assert traj_ids(bus.read(10, 100)) == ["traj-2"]
    assert tmp_path.exists()
    with PrivateRedis(appendonly=True, dir=tmp_path) as second:
        with TrajectoryBus(second.url, "durable") as bus:
            assert traj_ids(drain(bus)) == ["traj-2"]


def test_missing_binary_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="redis-server not found: install the redis-server"):
        PrivateRedis(binary="/nonexistent/redis-server")


def test_connect_or_start(redis_url: str) -> None:
    assert connect_or_start(redis_url) == (redis_url, None)
    url, server = connect_or_start(None)
    try:
        assert server is not None and url == server.url
        assert redis.Redis.from_url(url).ping()
    finally:
        server.close()
    with pytest.raises(
        RedisUnavailable,
        match=r"^bus.redis_url redis://127.0.0.1:\d+/0: no Redis answers at "
        r"127.0.0.1:\d+: Error 111 connecting",
    ):
        connect_or_start(url)  # now stopped


PASSWORD = "s3cret/+:@word"  # characters a URL must escape


def test_a_password_comes_from_the_url_or_the_environment_and_is_never_shown(
    run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CODEWORLD_REDIS_PASSWORD", raising=False)
    with PrivateRedis(password=PASSWORD) as server:
        bare = f"redis://127.0.0.1:{server.port}/0"
        with pytest.raises(RedisUnavailable) as missing:
            connect_or_start(bare)
        assert (
            "requires a password; put it in the URL (redis://:PASSWORD@host:port/0) or in "
            "$CODEWORLD_REDIS_PASSWORD" in str(missing.value)
        )
        url, private = connect_or_start(server.url)  # in the URL
        assert private is None and url == server.url
        monkeypatch.setenv("CODEWORLD_REDIS_PASSWORD", PASSWORD)
        url, _ = connect_or_start(bare)  # from the environment
        with TrajectoryBus(url, run_id) as bus:
            bus.publish([make_trajectory(1)])
            assert traj_ids(bus.read(10, 0)) == ["traj-1"]
        wrong = f"redis://:s3cret-but-wrong@127.0.0.1:{server.port}/0"
        with pytest.raises(RedisUnavailable, match="refused the password") as refused:
            connect_or_start(wrong)
        for err in (missing, refused):
            assert "s3cret" not in str(err.value) and "\n" not in str(err.value)
        assert isinstance(refused.value, ConfigError)  # the CLI prints it as one line and exits 2


def test_redacted_urls_hide_only_the_password() -> None:
    assert (
        redact("rediss://user:pw@host:6380/1?ssl_ca_certs=/ca.pem")
        == "rediss://user:***@host:6380/1?ssl_ca_certs=/ca.pem"
    )
    assert redact("redis://:pw@host/0") == "redis://:***@host/0"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA), made with openssl."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(d / "key.pem"),
            "-out",
            str(d / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"


def test_rediss_with_a_private_ca_works_and_tls_mistakes_are_one_clear_error(
    run_id: str, certificate: tuple[Path, Path]
) -> None:
    with PrivateRedis(tls=certificate, password=PASSWORD) as server:
        assert server.url.startswith("rediss://")
        url, _ = connect_or_start(server.url)
        with TrajectoryBus(url, run_id) as bus:
            bus.publish([make_trajectory(2)])
            assert traj_ids(bus.read(10, 0)) == ["traj-2"]
        untrusted = server.url.split("?")[0]  # without ssl_ca_certs: the certificate is not trusted
        with pytest.raises(
            RedisUnavailable,
            match=r"TLS: is it a TLS port, and does ssl_ca_certs name the CA.*"
            r"certificate verify failed",
        ):
            connect_or_start(untrusted)
        with pytest.raises(RedisUnavailable, match="no Redis answers at"):
            connect_or_start(untrusted.replace("rediss://", "redis://"))  # plain text to a TLS port


def test_the_bus_url_must_be_a_redis_url() -> None:
    with pytest.raises(ConfigError, match="bus.redis_url: String should match pattern"):
        load_config(None, ["bus.redis_url=http://127.0.0.1:6379", "envs=[{name: arithmetic}]"])
