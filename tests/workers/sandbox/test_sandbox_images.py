"""Images per node, for real: a Docker registry (Debian's `docker-registry`) on a loopback port
with its storage in a temporary folder, images pushed to it, and pools that pull them on demand,
record their use and evict the least recently used beyond a disk budget."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
from sandbox_testkit import TEST_LIMITS

from envs.data import data_root
from workers.sandbox import DEFAULT_IMAGE, ExecRequest, ImagePolicy, SandboxPool, SandboxUnavailable, Status
from workers.sandbox.images import ImageStore, ImageUnavailable, ensure_pristine

session_loop = pytest.mark.asyncio(loop_scope="session")
REGISTRY = shutil.which("docker-registry")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`127.0.0.1:PORT` of a registry serving from a temporary folder (Docker trusts loopback
    registries over plain HTTP)."""
    assert REGISTRY, "docker-registry is not installed (make test installs it: deploy/setup/services.sh registry)"
    folder = tmp_path_factory.mktemp("registry")
    port = _free_port()
    config = folder / "config.yml"
    config.write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {folder / 'data'}\n"
        f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _pushed(registry: str, name: str, payload_mb: int) -> str:
    """An image `registry/codeworld-test/NAME:1` (the sandbox image plus a file of `payload_mb`),
    pushed, and then removed from this node."""
    client = docker.from_env()
    ref = f"{registry}/codeworld-test/{name}:1"
    container = client.containers.run(
        DEFAULT_IMAGE,
        ["sh", "-c", f"head -c {payload_mb}M /dev/urandom > /payload"],
        detach=True,
        network_mode="none",
    )
    try:
        container.wait()
        container.commit(f"{registry}/codeworld-test/{name}", "1")
    finally:
        container.remove(force=True)
    for line in client.images.push(f"{registry}/codeworld-test/{name}", tag="1", stream=True, decode=True):
        assert "error" not in line, line
    client.images.remove(ref)
    client.close()
    return ref


def _present(ref: str) -> bool:
    client = docker.from_env()
    try:
        client.images.get(ref)
        return True
    except docker.errors.ImageNotFound:
        return False
    finally:
        client.close()


@session_loop
async def test_a_pool_pulls_its_image_on_demand(registry: str, tmp_path: Path) -> None:
    ref = _pushed(registry, "on-demand", 1)
    assert not _present(ref)
    policy = ImagePolicy(pull=True, manage=True, state_dir=str(tmp_path))
    async with SandboxPool("docker", image=ref, size=1, limits=TEST_LIMITS, images=policy) as pool:
        result = await pool.run(ExecRequest(command=["sh", "-c", "wc -c < /payload"]))
    assert result.status is Status.OK and result.stdout == b"1048576\n"
    client = docker.from_env()
    assert _present(ref) and ref in ImageStore(client, policy).last_used()
    client.images.remove(ref)  # the registry's port is this module's: nothing else will use the name
    client.close()


@session_loop
async def test_a_missing_image_is_named_and_never_pulled_unasked(registry: str, tmp_path: Path) -> None:
    absent = f"{registry}/codeworld-test/never-pushed:1"
    for policy in (
        ImagePolicy(pull=True, state_dir=str(tmp_path)),
        ImagePolicy(pull=False, state_dir=str(tmp_path)),
    ):
        pool = SandboxPool("docker", image=absent, size=1, limits=TEST_LIMITS, images=policy)
        with pytest.raises(SandboxUnavailable, match=absent.replace(".", r"\.")):
            await pool.start()
    ref = _pushed(registry, "not-asked", 1)
    with pytest.raises(SandboxUnavailable, match="pulling is off"):
        await SandboxPool("docker", image=ref, size=1, images=ImagePolicy(state_dir=str(tmp_path))).start()
    assert not _present(ref)


def test_the_least_recently_used_image_goes_beyond_the_budget_but_never_one_in_use(registry, tmp_path) -> None:
    refs = [_pushed(registry, f"lru-{i}", 20) for i in range(3)]
    client = docker.from_env()
    size_gb = client.images.get(DEFAULT_IMAGE).attrs["Size"] / (1 << 30)
    # Room for two of these images (each the sandbox image and 20 MB), not three.
    policy = ImagePolicy(pull=True, manage=True, budget_gb=2 * size_gb + 0.06, state_dir=str(tmp_path))
    store = ImageStore(client, policy)
    store.ensure(refs[0])
    store.ensure(refs[1])
    store.ensure(refs[0])  # refs[1] is now the least recently used
    store.ensure(refs[2])
    assert [_present(r) for r in refs] == [True, False, True]
    # An image a container was made from stays, even when it is the least recently used.
    holder = client.containers.create(refs[0], ["true"], network_mode="none")
    try:
        store.ensure(refs[2])
        store.ensure(refs[1])
        assert [_present(r) for r in refs] == [True, True, False]
    finally:
        holder.remove(force=True)
    # Images the store does not manage (the sandbox image) are never counted nor removed.
    assert _present(DEFAULT_IMAGE) and set(store.last_used()) == set(refs) - {refs[2]}
    for ref in refs:
        if _present(ref):
            client.images.remove(ref)
    client.close()


def test_an_unreachable_registry_is_an_error_naming_the_image(tmp_path: Path) -> None:
    ref = f"127.0.0.1:{_free_port()}/codeworld-test/nowhere:1"
    store = ImageStore(docker.from_env(), ImagePolicy(pull=True, state_dir=str(tmp_path)))
    with pytest.raises(ImageUnavailable, match=f"image '{ref}' is not on this node and could not be pulled"):
        store.ensure(ref)


def test_content_volumes_of_removed_images_are_pruned(registry: str, tmp_path: Path) -> None:
    ref = _pushed(registry, "pruned", 1)
    client = docker.from_env()
    store = ImageStore(client, ImagePolicy(pull=True, manage=True, budget_gb=100, state_dir=str(tmp_path)))
    image_id = store.ensure(ref)
    (name,) = ensure_pristine(client, ref, image_id, ("/work",), tmp_path / "locks")
    client.images.remove(ref)  # by someone else: the store never saw it go
    assert client.volumes.get(name)
    store.ensure(DEFAULT_IMAGE)
    with pytest.raises(docker.errors.NotFound):
        client.volumes.get(name)
    client.close()


def test_codeworld_swe_pull_fetches_a_task_files_images(registry: str, tmp_path: Path) -> None:
    """`codeworld swe pull` with a template naming the loopback registry: the first run pulls, the
    second finds the image present, an instance whose image the registry lacks fails by name."""
    rows = json.loads((data_root() / "swebench_lite" / "dev.json").read_text())
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows if r["instance_id"] == "pydicom__pydicom-1256"))
    ref = _pushed(registry, "pydicom_1776_pydicom-1256", 1)
    env = {**os.environ, "CODEWORLD_CACHE": str(tmp_path / "cache")}

    def pull(tag: str) -> subprocess.CompletedProcess[str]:
        template = f"{registry}/codeworld-test/{{docker_id}}:{tag}"
        argv = [
            str(Path(sys.executable).parent / "codeworld"),
            "swe",
            "pull",
            "--data",
            str(data),
            "--image-template",
            template,
        ]
        return subprocess.run(argv, capture_output=True, text=True, env=env)

    first, second, missing = pull("1"), pull("1"), pull("2")
    assert first.stdout.splitlines()[-1] == '{"images": 1, "present": 0, "pulled": 1, "failed": 0}', first.stderr
    assert second.stdout.splitlines()[-1] == '{"images": 1, "present": 1, "pulled": 0, "failed": 0}'
    assert missing.returncode == 1
    assert f"{registry}/codeworld-test/pydicom_1776_pydicom-1256:2" in missing.stderr
    docker.from_env().images.remove(ref)
