"""Images on one node: pulled on demand, their use recorded, the least recently used removed
beyond a disk budget; and the read-only volumes that hold an image's content for its writable
paths (see `SandboxProfile`).

Only images a pool asked to manage (`ImagePolicy.manage`, e.g. SWE instance images) count
against the budget or are ever removed; an image a container (any container) was made from is
never removed, nor the one being made ready. The record of use lives in one JSON file per node,
changed under a file lock, so pools in several processes of a node share it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import docker.errors
import requests.exceptions

from workers.sandbox.config import ImagePolicy

log = logging.getLogger(__name__)
PRISTINE_LABEL = "codeworld.pristine"
PRISTINE_ROOT = "/.codeworld/pristine"
"""Where a sandbox sees the image's content of its writable paths (read-only), one folder each."""
_DOCKER_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)


class ImageUnavailable(RuntimeError):
    """The image is not on this node and could not be had; the message names it."""


def _state_dir(policy: ImagePolicy) -> Path:
    if policy.state_dir:
        return Path(policy.state_dir)
    return Path(os.environ.get("CODEWORLD_CACHE", Path.home() / ".cache" / "codeworld")) / "images"


def split_reference(image: str) -> tuple[str, str]:
    """`registry:5000/name:tag` -> (`registry:5000/name`, `tag`); `latest` when no tag is given."""
    if "@" in image:
        repository, digest = image.split("@", 1)
        return repository, digest
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        repository, tag = image.rsplit(":", 1)
        return repository, tag
    return image, "latest"


class ImageStore:
    """One node's images for pools: `ensure(image)` makes it present (pulling if allowed),
    records its use and keeps the managed images within the budget."""

    def __init__(
        self, client: docker.DockerClient, policy: ImagePolicy, pull: Callable[[str, str], None] | None = None
    ) -> None:
        self.client, self.policy = client, policy
        self._pull = pull or (lambda repository, tag: self.client.images.pull(repository, tag=tag))
        self.folder = _state_dir(policy)

    def ensure(self, image: str) -> str:
        """The id of `image` on this node, pulled first if it is missing and pulling is allowed;
        ImageUnavailable naming the image otherwise."""
        try:
            found = self.client.images.get(image)
        except docker.errors.ImageNotFound:
            found = self._fetch(image)
        with self._state() as state:
            entry = state.setdefault(image, {"managed": self.policy.manage})
            entry["last_used"] = time.time()
            entry["managed"] = bool(entry.get("managed")) or self.policy.manage
            if self.policy.budget_gb is not None:
                self._evict(state, keep=image)
        if self.policy.budget_gb is not None:
            prune_pristine(self.client)  # images others removed leave their volumes behind
        return found.id

    def _fetch(self, image: str) -> docker.models.images.Image:
        if not self.policy.pull:
            raise ImageUnavailable(f"image {image!r} is not on this node (pulling is off for this pool).")
        repository, tag = split_reference(image)
        log.info("pulling %s", image)
        try:
            self._pull(repository, tag)
            return self.client.images.get(image)
        except _DOCKER_ERRORS as exc:
            raise ImageUnavailable(
                f"image {image!r} is not on this node and could not be pulled: {str(exc)[:300]}"
            ) from exc

    def held(self, images: list[str]) -> list[str]:
        """Those of `images` this node holds now."""
        out = []
        for image in images:
            try:
                self.client.images.get(image)
                out.append(image)
            except docker.errors.ImageNotFound:
                pass
        return out

    def _evict(self, state: dict, keep: str) -> None:
        sizes = {}
        for ref, entry in list(state.items()):
            if not entry.get("managed"):
                continue
            try:
                sizes[ref] = self.client.images.get(ref).attrs["Size"]
            except docker.errors.ImageNotFound:
                state.pop(ref)  # removed by someone else: forget it
        total, budget = sum(sizes.values()), int(self.policy.budget_gb * (1 << 30))
        by_age = sorted(sizes, key=lambda ref: state[ref].get("last_used", 0.0))
        for ref in by_age:
            if total <= budget:
                break
            if ref == keep or self._in_use(ref):
                continue
            if self._remove(ref):
                total -= sizes[ref]
                state.pop(ref)

    def _in_use(self, ref: str) -> bool:
        return bool(self.client.api.containers(all=True, filters={"ancestor": ref}, quiet=True))

    def _remove(self, ref: str) -> bool:
        try:
            image_id = self.client.images.get(ref).id
            self.client.images.remove(ref)
        except docker.errors.ImageNotFound:
            return True
        except _DOCKER_ERRORS as exc:  # in use after all (a container made since), or daemon trouble
            log.warning("could not remove image %s: %s", ref, exc)
            return False
        log.info("removed image %s (least recently used beyond the node's budget)", ref)
        try:
            self.client.images.get(image_id)
        except docker.errors.ImageNotFound:
            remove_pristine(self.client, image_id)
        return True

    def last_used(self) -> dict[str, float]:
        """Image -> when a pool last made it ready on this node (seconds since the epoch)."""
        with self._state() as state:
            return {ref: entry.get("last_used", 0.0) for ref, entry in state.items()}

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict]:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "images.json"
        with open(self.folder / "images.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = json.loads(path.read_text()) if path.is_file() else {}
            except ValueError:
                state = {}  # a record cut short by a crash: start again, nothing is lost but ages
            yield state
            partial = path.with_suffix(".partial")
            partial.write_text(json.dumps(state))
            partial.replace(path)


def pristine_name(image_id: str, path: str) -> str:
    """The volume holding `image_id`'s content at `path`."""
    path_hash = hashlib.sha256(path.encode()).hexdigest()[:8]
    return f"codeworld-pristine-{image_id.removeprefix('sha256:')[:16]}-{path_hash}"


def ensure_pristine(
    client: docker.DockerClient, image: str, image_id: str, paths: tuple[str, ...], lock_dir: Path
) -> list[str]:
    """Volumes holding the image's content at each of `paths`, made once per image and node:
    Docker fills an empty volume from the image when a container mounts it where the image has
    files. Made under a lock, so two pools never see a half-filled one."""
    names = []
    lock_dir.mkdir(parents=True, exist_ok=True)
    for path in paths:
        name = pristine_name(image_id, path)
        with open(lock_dir / f"{name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                client.volumes.get(name)
            except docker.errors.NotFound:
                _fill_pristine(client, image, image_id, path, name)
        names.append(name)
    return names


def _fill_pristine(client: docker.DockerClient, image: str, image_id: str, path: str, name: str) -> None:
    client.volumes.create(
        name,
        labels={PRISTINE_LABEL: "1", f"{PRISTINE_LABEL}.image": image_id, f"{PRISTINE_LABEL}.path": path},
    )
    try:
        # Never started: Docker copies the image's files into the empty volume when the
        # container is made.
        container = client.containers.create(
            image_id,
            command=["true"],
            network_mode="none",
            volumes={name: {"bind": path, "mode": "rw"}},
            labels={PRISTINE_LABEL: "filler"},
        )
        container.remove(force=True)
    except BaseException:
        with contextlib.suppress(*_DOCKER_ERRORS):
            client.volumes.get(name).remove(force=True)
        raise
    log.info("filled volume %s with %s of %s", name, path, image)


def remove_pristine(client: docker.DockerClient, image_id: str) -> None:
    """Removes the content volumes of an image that is gone."""
    for volume in client.volumes.list(filters={"label": f"{PRISTINE_LABEL}.image={image_id}"}):
        with contextlib.suppress(*_DOCKER_ERRORS):
            volume.remove(force=True)


def prune_pristine(client: docker.DockerClient) -> int:
    """Removes the content volumes of images no longer on this node (removed by anyone); one a
    container still mounts stays. Returns how many went."""
    gone = 0
    for volume in client.volumes.list(filters={"label": PRISTINE_LABEL}):
        image_id = (volume.attrs.get("Labels") or {}).get(f"{PRISTINE_LABEL}.image", "")
        try:
            client.images.get(image_id)
        except docker.errors.ImageNotFound:
            with contextlib.suppress(*_DOCKER_ERRORS):
                volume.remove()
                gone += 1
    return gone
