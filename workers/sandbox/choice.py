"""Where an environment's sandboxes come from, as its config says (`SandboxService`): a pool in
this process, the per-node pool actors of the Ray cluster, or a `codeworld sandbox serve` service.
`open_pool` opens the chosen one; all three have the same `run` / `session` / `close` API."""

from __future__ import annotations

import os
import socket
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from workers.sandbox.config import ImagePolicy, SandboxLimits, SandboxProfile
from workers.sandbox.models import PoolStats
from workers.sandbox.pool import SandboxPool, SandboxUnavailable


class SandboxService(BaseModel):
    """Which pool runs an environment's sandboxes."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    kind: Literal["auto", "process", "ray", "http"] = "auto"
    """process: a pool inside the process that runs the episodes; ray: one pool actor on every node
    of the Ray cluster that can run the sandboxes, the caller's own node first while it has a
    sandbox to spare, else the least loaded; http: the `codeworld sandbox serve` service at `url`;
    auto: ray when the Ray cluster of the run has more than one node, else process."""
    url: str | None = None
    """http: base URL of the service (`http://host:8765`)."""
    token_env: str = "CODEWORLD_SANDBOX_TOKEN"
    """http: environment variable holding the service's bearer token."""

    @model_validator(mode="after")
    def _http_has_url(self) -> SandboxService:
        if self.kind == "http" and not self.url:
            raise ValueError("service.kind http needs service.url (the `codeworld sandbox serve` address).")
        return self


def resolved_kind(service: SandboxService) -> Literal["process", "ray", "http"]:
    """`auto` decided: ray inside a Ray cluster of several nodes, process otherwise."""
    if service.kind != "auto":
        return service.kind
    try:
        import ray
    except ImportError:
        return "process"
    if ray.is_initialized() and sum(1 for n in ray.nodes() if n["Alive"]) > 1:
        return "ray"
    return "process"


async def open_pool(
    service: SandboxService,
    backend: Literal["docker", "local", "auto"],
    image: str,
    size: int,
    limits: SandboxLimits,
    local_isolation: Literal["bwrap", "rlimit"] | None,
    profile: SandboxProfile | None = None,
    images: ImagePolicy | None = None,
) -> Any:
    """The started pool `service` names (backend, image, size, profile and image policy apply to
    process and ray pools; an HTTP service runs its own)."""
    kind = resolved_kind(service)
    if kind == "http":
        from workers.sandbox.client import SandboxClient

        token = os.environ.get(service.token_env)
        if not token:
            raise SandboxUnavailable(f"the sandbox service at {service.url} needs its token in ${service.token_env}.")
        return SandboxClient(service.url or "", token)
    pool_class: Any = SandboxPool
    if kind == "ray":
        from workers.sandbox.ray_pool import RaySandboxPool

        pool_class = RaySandboxPool
    pool = pool_class(
        backend=backend,
        image=image,
        size=size,
        limits=limits,
        local_isolation=local_isolation,
        profile=profile,
        images=images,
    )
    await pool.start()
    return pool


def stats_by_node(pool: Any, label: str) -> dict[tuple[str, str], PoolStats]:
    """A pool's counters as (node, label) → stats: one entry per node for the Ray pools, this
    host's for a process pool, none for a service (it reports its own at GET /v1/stats)."""
    from workers.sandbox.ray_pool import RaySandboxPool

    if isinstance(pool, RaySandboxPool):
        return {(address, label): stats for address, stats in pool.stats_by_node().items()}
    if isinstance(pool, SandboxPool):
        return {(socket.gethostname(), label): pool.stats()}
    return {}
