"""Where every actor of a run goes, decided before any of them starts.

A run needs one bundle of resources per learner rank (1 GPU on a GPU cluster, `threads_per_rank`
CPUs on CPU) and one per rollout engine (`rollout.num_gpus`, its tensor-parallel GPUs, all on one
node; on CPU the engine's host memory: weights plus KV cache), plus a sandbox pool actor on each
node that can run sandboxes (which claims nothing). `assign` maps the bundles onto the cluster's
nodes as `placement` asks — learner ranks packed or one per node, engines on the learner's nodes
first or never there — and turns every impossible request into one `ConfigError` naming the key
at fault. `reserve` then has Ray hold exactly that plan in placement groups (each bundle pinned
to its planned node), so what `codeworld train --dry-run` prints is where the actors will run.

On one machine this is the same code: a cluster of one node.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from rl.config import Config, ConfigError

log = logging.getLogger(__name__)

GIB = 1024**3
_PIN = 0.001
"""Share of a node's `node:<address>` resource a bundle asks for: pins it there, blocks no one."""


def count_params(model_dir: Path) -> int:
    """Parameters of a Hugging Face decoder, from its config.json alone."""
    c = json.loads((model_dir / "config.json").read_text())
    h, layers = c["hidden_size"], c["num_hidden_layers"]
    vocab, inter = c["vocab_size"], c["intermediate_size"]
    head = c.get("head_dim") or h // c["num_attention_heads"]
    kv = c.get("num_key_value_heads", c["num_attention_heads"]) * head
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter + 2 * h
    embed = vocab * h * (1 if c.get("tie_word_embeddings", False) else 2)
    return layers * per_layer + embed + h


class Node(BaseModel):
    """One alive Ray node as the plan sees it."""

    model_config = ConfigDict(frozen=True)

    node_id: str
    """Ray's node id."""
    address: str
    """The node's IP address."""
    cpus: float
    """Logical CPUs Ray schedules on the node."""
    gpus: float
    """GPUs of the node."""
    memory: float
    """Bytes of Ray's `memory` resource on the node."""
    sandboxes: str | None = None
    """Why the node cannot run sandboxes (None: it can; "not probed" until probed)."""


class Placed(BaseModel):
    """One bundle and the node it goes to."""

    role: Literal["learner rank", "rollout engine"]
    index: int
    """Rank or engine number."""
    resources: dict[str, float]
    """What the bundle reserves (Ray resource names)."""
    node: Node


class Plan(BaseModel):
    """Every bundle of a run on its node, and the nodes that get a sandbox pool."""

    gpu: bool
    """Whether the learner and engines run on GPUs."""
    nodes: list[Node]
    """Every alive node."""
    learner: list[Placed]
    engines: list[Placed]

    @property
    def sandbox_nodes(self) -> list[Node]:
        """Nodes that can run sandboxes: each gets a pool actor when an environment first asks."""
        return [n for n in self.nodes if n.sandboxes is None]

    def transport(self, choice: str) -> Literal["file", "broadcast"]:
        """`weights.transport` resolved: the file transport needs every engine on rank 0's node."""
        if choice != "auto":
            return choice  # type: ignore[return-value]
        home = self.learner[0].node.node_id
        return "file" if all(e.node.node_id == home for e in self.engines) else "broadcast"


def engine_gpus(cfg: Config, gpu: bool) -> float:
    """GPUs one engine reserves (`rollout.num_gpus`, by default its tensor-parallel size)."""
    if not gpu:
        return 0.0
    r = cfg.rollout
    return float(r.tensor_parallel_size) if r.num_gpus is None else r.num_gpus


def engine_memory(cfg: Config) -> float:
    """Host bytes of a CPU engine: its weights, its KV cache and half a GiB for the rest."""
    n = count_params(Path(cfg.model.path))
    return n * (2 if cfg.model.dtype == "bfloat16" else 4) + cfg.rollout.kv_cache_gib * GIB + 0.5 * GIB


def bundles(cfg: Config, gpu: bool) -> tuple[dict[str, float], dict[str, float]]:
    """What one learner rank and one engine reserve."""
    if gpu:
        learner = {"GPU": 1.0, "CPU": 1.0}
        gpus = engine_gpus(cfg, gpu)
        engine = {"GPU": gpus} if gpus else {"memory": engine_memory(cfg)}
    else:
        # vLLM binds its own OpenMP threads (`rollout.cpu_cores`), so a CPU engine reserves the
        # memory it needs rather than Ray CPUs, which would only starve the learner ranks.
        learner = {"CPU": float(cfg.learner.threads_per_rank)}
        engine = {"memory": engine_memory(cfg)}
    return learner, engine


def _fits(free: dict[str, float], need: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def _take(free: dict[str, float], need: dict[str, float]) -> None:
    for k, v in need.items():
        free[k] = free.get(k, 0.0) - v


def _check_totals(
    cfg: Config, nodes: list[Node], gpu: bool, learner: dict[str, float], engine: dict[str, float]
) -> None:
    """The impossible requests, each named by its key, before any placement is tried."""
    w, e, gpus = cfg.learner.world_size, cfg.rollout.num_workers, engine_gpus(cfg, gpu)
    if gpu:
        total = sum(n.gpus for n in nodes)
        need = w + e * gpus
        if need > total:
            raise ConfigError(
                f"learner.world_size ({w}) + rollout.num_workers ({e}) x {gpus:g} GPUs per "
                f"engine need {need:g} GPUs; the cluster has {total:g}."
            )
        most = max(n.gpus for n in nodes)
        if gpus > most:
            raise ConfigError(
                f"rollout.tensor_parallel_size {cfg.rollout.tensor_parallel_size} needs "
                f"{gpus:g} GPUs on one node; the largest node has {most:g}."
            )
    if not any(_fits(_free(n), learner) for n in nodes):
        key = "learner.threads_per_rank" if not gpu else "learner.world_size"
        raise ConfigError(f"{key}: a learner rank needs {_show(learner)}; no node has that much.")
    if not any(_fits(_free(n), engine) for n in nodes):
        key = "rollout.kv_cache_gib" if "memory" in engine else "rollout.num_gpus"
        raise ConfigError(f"{key}: an engine needs {_show(engine)}; no node has that much.")


def _free(node: Node) -> dict[str, float]:
    return {"CPU": node.cpus, "GPU": node.gpus, "memory": node.memory}


def _show(resources: dict[str, float]) -> str:
    return ", ".join(f"{v / GIB:.1f} GiB memory" if k == "memory" else f"{v:g} {k}" for k, v in resources.items())


def assign(cfg: Config, nodes: list[Node]) -> Plan:
    """The bundles of `cfg` on `nodes` (alive, with their total resources); ConfigError naming the
    key when they do not fit."""
    if not nodes:
        raise ConfigError("the Ray cluster has no alive node.")
    gpu = any(n.gpus > 0 for n in nodes)
    learner_need, engine_need = bundles(cfg, gpu)
    _check_totals(cfg, nodes, gpu, learner_need, engine_need)
    free = {n.node_id: _free(n) for n in nodes}
    # Biggest nodes first, then by address: the same cluster always gets the same plan.
    order = sorted(nodes, key=lambda n: (-n.gpus, -n.cpus, -n.memory, n.address))
    learner = _place_learner(cfg, order, free, learner_need)
    homes = {p.node.node_id for p in learner}
    if cfg.placement.engines == "separate":
        candidates = [n for n in order if n.node_id not in homes]
    else:
        candidates = [n for n in order if n.node_id in homes] + [n for n in order if n.node_id not in homes]
    engines = []
    for i in range(cfg.rollout.num_workers):
        node = next((n for n in candidates if _fits(free[n.node_id], engine_need)), None)
        if node is None:
            where = "on nodes without learner ranks" if cfg.placement.engines == "separate" else "anywhere"
            raise ConfigError(
                f"rollout.num_workers: engine {i + 1} of {cfg.rollout.num_workers} "
                f"({_show(engine_need)}) does not fit {where} once the learner is placed"
                + (" (placement.engines: separate)." if where != "anywhere" else ".")
            )
        _take(free[node.node_id], engine_need)
        engines.append(Placed(role="rollout engine", index=i, resources=engine_need, node=node))
    return Plan(gpu=gpu, nodes=nodes, learner=learner, engines=engines)


def _place_learner(
    cfg: Config, order: list[Node], free: dict[str, dict[str, float]], need: dict[str, float]
) -> list[Placed]:
    w = cfg.learner.world_size
    placed: list[Placed] = []
    if cfg.placement.learner == "spread":
        hosts = [n for n in order if _fits(free[n.node_id], need)][:w]
        if len(hosts) < w:
            raise ConfigError(
                f"placement.learner: spread puts each of learner.world_size ({w}) ranks on a "
                f"node of its own; only {len(hosts)} node(s) can hold a rank ({_show(need)})."
            )
    else:
        hosts = []
        for n in order:  # fill one node before the next
            room = dict(free[n.node_id])
            while len(hosts) < w and _fits(room, need):
                _take(room, need)
                hosts.append(n)
        if len(hosts) < w:
            raise ConfigError(
                f"learner.world_size: {w} ranks of {_show(need)} each do not fit the cluster (room for {len(hosts)})."
            )
    for rank, node in enumerate(hosts):
        _take(free[node.node_id], need)
        placed.append(Placed(role="learner rank", index=rank, resources=need, node=node))
    return placed


# ----------------------------------------------------------------------------- the live cluster
def live_nodes(probe_sandboxes: bool = True) -> list[Node]:
    """The cluster's alive nodes (Ray must be initialised), each probed for sandboxes."""
    import ray

    from workers.sandbox.ray_pool import probe_nodes

    alive = [n for n in ray.nodes() if n["Alive"]]
    nodes = [
        Node(
            node_id=n["NodeID"],
            address=n["NodeManagerAddress"],
            cpus=n["Resources"].get("CPU", 0.0),
            gpus=n["Resources"].get("GPU", 0.0),
            memory=n["Resources"].get("memory", 0.0),
            sandboxes="not probed",
        )
        for n in alive
    ]
    if not probe_sandboxes:
        return nodes
    why_not = probe_nodes([n.node_id for n in nodes])
    return [n.model_copy(update={"sandboxes": why_not[n.node_id]}) for n in nodes]


class Reservation:
    """The plan held by Ray: one placement group for the learner, one for the engines, each bundle
    pinned to its planned node. `remove` gives the resources back."""

    def __init__(self, plan: Plan, timeout_s: float) -> None:
        from ray.util.placement_group import placement_group, remove_placement_group

        self.plan = plan
        self.groups = [
            placement_group([_pinned(p) for p in placed], strategy="PACK", name=f"codeworld-{role}")
            for role, placed in (("learner", plan.learner), ("engines", plan.engines))
        ]
        start = time.perf_counter()
        for group, placed in zip(self.groups, (plan.learner, plan.engines)):
            left = max(timeout_s - (time.perf_counter() - start), 0.1)
            if not group.wait(left):
                for g in self.groups:
                    remove_placement_group(g)
                raise ConfigError(
                    f"placement.timeout_s: Ray did not reserve the {placed[0].role}s within "
                    f"{timeout_s:g} s (other jobs hold the resources?): " + _short(placed)
                )
        self.learner_group, self.engine_group = self.groups

    def options(self, placed: Placed) -> dict[str, Any]:
        """Ray actor options that run an actor in `placed`'s bundle, with its resources."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = self.learner_group if placed.role == "learner rank" else self.engine_group
        res = placed.resources
        out: dict[str, Any] = {
            "num_cpus": res.get("CPU", 0.0),
            "num_gpus": res.get("GPU", 0.0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=placed.index
            ),
        }
        if "memory" in res:
            out["memory"] = res["memory"]
        return out

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for group in self.groups:
            try:
                remove_placement_group(group)
            except Exception:  # already gone with the cluster
                pass


def _pinned(placed: Placed) -> dict[str, float]:
    return {**placed.resources, f"node:{placed.node.address}": _PIN}


def _short(placed: list[Placed]) -> str:
    return "; ".join(f"{p.role} {p.index} on {p.node.address} ({_show(p.resources)})" for p in placed)


def reserve(cfg: Config) -> Reservation:
    """Plan against the live cluster and hold the plan (Ray must be initialised)."""
    plan = assign(cfg, live_nodes())
    reservation = Reservation(plan, cfg.placement.timeout_s)
    for line in describe_plan(plan).splitlines():
        log.info("placement: %s", line)
    return reservation


# ----------------------------------------------------------------------------- for a person
def describe(cfg: Config, plan: Plan | None, gpu: bool = False) -> str:
    """`codeworld train --dry-run`: the run, what each bundle reserves and, with a live cluster's
    plan, which node gets which actor."""
    n = count_params(Path(cfg.model.path))
    gpu = plan.gpu if plan is not None else gpu
    learner, engine = bundles(cfg, gpu)
    lines = [
        f"run {cfg.run.name!r}: model {cfg.model.path} ({n / 1e6:.2f} M params, {cfg.model.dtype}), "
        f"{cfg.run.steps} steps x {cfg.algorithm.batch_size} groups x {cfg.algorithm.group_size} "
        "samples, "
        f"max_staleness {cfg.algorithm.max_staleness}, loss {cfg.algorithm.loss}",
        "envs: " + ", ".join(f"{e.name} (weight {e.weight})" for e in cfg.envs),
        f"bus: {_redacted(cfg.bus.redis_url) or 'private redis-server started for the run'}",
        f"learner: {cfg.learner.world_size} rank(s), {_show(learner)} each, placement.learner "
        f"{cfg.placement.learner}; ~{_learner_gib(cfg, n):.2f} GiB each",
        f"engines: {cfg.rollout.num_workers} x ({_show(engine)}), tensor_parallel_size "
        f"{cfg.rollout.tensor_parallel_size}, placement.engines {cfg.placement.engines}",
    ]
    if plan is None:
        lines.append("no Ray cluster (RAY_ADDRESS is unset): set it to see which node gets which actor.")
        return "\n".join(lines)
    choice = cfg.weights.transport
    lines.append(f"weights: {plan.transport(choice)} (weights.transport {choice})")
    lines.append(describe_plan(plan))
    return "\n".join(lines)


def describe_plan(plan: Plan) -> str:
    lines = [f"{'node':<18}{'CPUs':>6}{'GPUs':>6}{'GiB':>8}  actors"]
    for node in sorted(plan.nodes, key=lambda n: n.address):
        here = [f"learner rank {p.index}" for p in plan.learner if p.node.node_id == node.node_id]
        here += [f"engine {p.index}" for p in plan.engines if p.node.node_id == node.node_id]
        here.append("sandbox pool" if node.sandboxes is None else f"no sandboxes ({node.sandboxes})")
        lines.append(f"{node.address:<18}{node.cpus:>6g}{node.gpus:>6g}{node.memory / GIB:>8.1f}  " + ", ".join(here))
    return "\n".join(lines)


def _learner_gib(cfg: Config, n: int) -> float:
    # fp32 master weights + grads + two AdamW moments, sharded over the ranks, plus one full
    # parameter at a time during a gather.
    return (n * 16 / cfg.learner.world_size) / GIB + 0.5


def _redacted(url: str | None) -> str | None:
    from rl.redis_server import redact

    return None if url is None else redact(url)


def dry_run(cfg: Config) -> str:
    """`codeworld train --dry-run`: against the Ray cluster in RAY_ADDRESS (the run's own, as
    `codeworld train` would attach to it), the plan on its live nodes, with the kernels checked on
    learner rank 0's node; without one, what each bundle needs, with the kernels checked here.
    Starts no actor; raises ConfigError for an impossible plan."""
    import os

    import ray
    import torch

    from rl.parallelize import require_runnable

    if not os.environ.get("RAY_ADDRESS"):
        require_runnable(cfg.learner)  # the kernels this machine cannot run, as a start would
        return describe(cfg, None, gpu=torch.cuda.is_available())
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level="error")
    try:
        plan = assign(cfg, live_nodes())
        _check_kernels_on(cfg, plan.learner[0])
        return describe(cfg, plan)
    finally:
        ray.shutdown()


def _check_kernels_on(cfg: Config, placed: Placed) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rl.parallelize import require_runnable

    probe = ray.remote(require_runnable).options(
        num_cpus=0,
        num_gpus=placed.resources.get("GPU", 0.0),
        scheduling_strategy=NodeAffinitySchedulingStrategy(placed.node.node_id, soft=False),
    )
    try:
        ray.get(probe.remote(cfg.learner))
    except ray.exceptions.RayTaskError as err:
        raise err.cause from None
