"""Labels on every sandbox container, and the reaper that removes containers whose owner is gone.

Docker may be shared (other pools, other users' tests): only containers carrying our label AND
whose owning process is provably dead (or whose pool is the one closing) are ever removed."""

from __future__ import annotations

import concurrent.futures
import logging

import docker
import docker.errors
import requests.exceptions

from workers.sandbox.owner import Owner

LABEL = "codeworld.sandbox"
_PREFIX = "codeworld.owner."
log = logging.getLogger(__name__)


def owner_labels(owner: Owner) -> dict[str, str]:
    return {_PREFIX + key: str(value) for key, value in owner.model_dump().items()}


def owner_from_labels(labels: dict[str, str]) -> Owner | None:
    try:
        return Owner(**{key[len(_PREFIX) :]: value for key, value in labels.items() if key.startswith(_PREFIX)})
    except ValueError:
        return None


def reap_containers(client: docker.DockerClient, pool: str | None) -> int:
    """Removes sandbox containers of `pool`, or (pool=None) of owners that are dead; returns how many."""
    victims = []
    for container in client.api.containers(all=True, filters={"label": f"{LABEL}=1"}):
        owner = owner_from_labels(container.get("Labels") or {})
        if owner is None:
            continue  # labelled by something we do not understand: not ours to judge
        if (pool is not None and owner.pool == pool) or (pool is None and not owner.is_alive()):
            victims.append(container["Id"])
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as workers:
        list(workers.map(lambda cid: _remove(client, cid), victims))
    return len(victims)


def _remove(client: docker.DockerClient, container_id: str) -> None:
    try:
        client.api.remove_container(container_id, force=True)
    except docker.errors.NotFound:
        pass
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        log.warning("could not remove sandbox container %s: %s", container_id[:12], exc)
