"""The bus across real connection faults: a reply cut on the wire (a loopback TCP proxy between the
bus and a real redis-server closes the connection after the server answered), a redis-server
SIGKILLed and restarted on its append-only file, and one that stays away. Nothing may be lost or
doubled across a reconnect."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from rl.bus import BusUnavailable, TrajectoryBus
from rl.faults import supervise_redis
from rl.redis_server import PrivateRedis
from rl.trajectory import Trajectory
from test_bus import drain, make_trajectory, traj_ids


class CuttingProxy:
    """Forwards loopback TCP to a Redis; `cut(marker)` makes it forward the next request holding
    `marker` and then close the connection instead of passing the server's reply back."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.marker: bytes | None = None
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cut(self, marker: bytes) -> None:
        self.marker = marker

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            state = {"cut": False}
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, state: dict) -> None:
        while data := _recv(client):
            if self.marker is not None and self.marker in data:
                self.marker, state["cut"] = None, True
            server.sendall(data)
        _close(client, server)

    def _down(self, server: socket.socket, client: socket.socket, state: dict) -> None:
        while data := _recv(server):
            if state["cut"]:  # the server did the work; its answer never reaches the client
                self.cuts += 1
                break
            client.sendall(data)
        _close(client, server)

    def close(self) -> None:
        self.listener.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


@pytest.fixture
def proxy(redis_url: str):
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    p = CuttingProxy(port)
    yield p
    p.close()


@pytest.fixture
def run_id() -> str:
    return f"faults-{uuid.uuid4().hex[:8]}"


def group(name: str, n: int) -> list[Trajectory]:
    return [
        make_trajectory(i).model_copy(update={"id": f"{name}.{i}", "group_id": name, "group_size": n}) for i in range(n)
    ]


def test_a_publish_whose_reply_is_lost_is_not_added_twice(proxy: CuttingProxy, redis_url: str, run_id: str) -> None:
    with TrajectoryBus(proxy.url, run_id) as bus:
        warm = bus.publish(group("warm", 1))  # Redis has the script now: the cut reply is a real one
        proxy.cut(b"EVALSHA")
        ids = bus.publish(group("g0", 4))
        assert proxy.cuts == 1 and bus.reconnects >= 1
        with TrajectoryBus(redis_url, run_id, consumer="other") as direct:
            assert direct.published_total() == 5 and [e.entry_id for e in direct.scan()] == warm + ids
            assert traj_ids(drain(direct)) == ["warm.0", "g0.0", "g0.1", "g0.2", "g0.3"]


def test_a_read_whose_reply_is_lost_hands_its_entries_out_once(proxy: CuttingProxy, run_id: str) -> None:
    with TrajectoryBus(proxy.url, run_id) as bus:
        bus.publish(group("g0", 3))
        assert traj_ids(bus.read(1, 100)) == ["g0.0"]  # past the restart phase, held
        proxy.cut(b"XREADGROUP")
        got = drain(bus)  # the cut reply delivered g0.1 and g0.2 to this consumer's pending list
        assert proxy.cuts == 1
        assert traj_ids(got) == ["g0.1", "g0.2"]
        bus.publish(group("g1", 1))
        assert traj_ids(drain(bus)) == ["g1.0"]
        assert bus.pending_count() == 4


def test_redis_killed_and_restarted_on_its_append_only_file(tmp_path: Path, run_id: str) -> None:
    """SIGKILL the server mid-run; a supervisor brings it back on the same port and file: the bus
    retries through the gap, and every entry is read exactly once."""
    server = PrivateRedis(appendonly=True, dir=tmp_path)

    async def scenario() -> list[str]:
        supervisor = asyncio.create_task(supervise_redis(server, interval_s=0.2))
        try:
            with TrajectoryBus(server.url, run_id, retry_s=30) as bus:
                await bus.apublish(group("g0", 3))
                first = await bus.aread(2, 100)
                os.kill(server.pid, signal.SIGKILL)
                reader = asyncio.ensure_future(bus.aread(10, 500))
                await bus.apublish(group("g1", 2))  # retried until the server is back
                got = first + await reader
                while more := await bus.aread(10, 200):
                    got += more
                await bus.aack([e for e, _ in got])
                assert bus.reconnects >= 1 and server.restarts == 1
                assert bus.pending_count() == 0 and bus.backlog() == 0 and bus.published_total() == 5
                return traj_ids(got)
        finally:
            supervisor.cancel()

    try:
        assert sorted(asyncio.run(scenario())) == ["g0.0", "g0.1", "g0.2", "g1.0", "g1.1"]
    finally:
        server.close()


def test_a_redis_that_stays_away_is_one_clear_error(tmp_path: Path, run_id: str) -> None:
    server = PrivateRedis()
    bus = TrajectoryBus(server.url, run_id, retry_s=1.0)
    server.close()
    start = time.monotonic()
    with pytest.raises(
        BusUnavailable,
        match=r"^the trajectory bus codeworld:faults-\w+:trajectories: Redis did not "
        r"answer for 1 s \(ConnectionError: ",
    ):
        bus.publish(group("g0", 1))
    assert time.monotonic() - start < 5
    bus.close()


def test_a_rewound_bus_hands_out_its_unacknowledged_entries_again(redis_url: str, run_id: str) -> None:
    with TrajectoryBus(redis_url, run_id) as bus:
        bus.publish(group("g0", 2) + group("g1", 2))
        first = drain(bus)
        bus.ack([first[0][0], first[1][0]])  # g0 trained and checkpointed
        assert drain(bus) == []
        bus.rewind()  # the learner went back to that checkpoint
        assert traj_ids(drain(bus)) == ["g1.0", "g1.1"]


def test_scan_names_entries_without_decoding_them(redis_url: str, run_id: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    with TrajectoryBus(redis_url, run_id) as bus:
        bus.publish(group("g7", 2))
        raw.xadd(bus.key, {b"t": b"garbage"})
        infos = bus.scan()
        assert [(i.trajectory_id, i.group_id, i.group_size) for i in infos] == [
            ("g7.0", "g7", 2),
            ("g7.1", "g7", 2),
            (None, None, None),
        ]
    raw.close()
