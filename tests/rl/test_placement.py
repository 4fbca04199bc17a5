"""The placement plan: bundles mapped onto nodes as `placement` asks, every impossible request one
ConfigError naming its key (pure, on described clusters), and the plan held by a live Ray."""

import pytest

from rl.config import ConfigError, load_config
from rl.placement import GIB, Node, Reservation, assign, describe, live_nodes

GPU_NODE = dict(cpus=32, gpus=8, memory=500 * GIB)


def config(tiny_model: str, *overrides: str):
    return load_config(None, [f"model.path={tiny_model}", "envs=[{name: arithmetic}]", *overrides])


def nodes(count: int, **resources: float) -> list[Node]:
    spec = dict(cpus=2, gpus=0, memory=16 * GIB) | resources
    return [Node(node_id=f"n{i}", address=f"10.0.0.{i + 1}", **spec) for i in range(count)]  # type: ignore[arg-type]


def where(plan) -> tuple[list[str], list[str]]:
    return [p.node.address for p in plan.learner], [p.node.address for p in plan.engines]


def test_one_cpu_node_takes_everything_and_the_file_transport(tiny_model: str) -> None:
    plan = assign(config(tiny_model, "learner.world_size=2"), nodes(1))
    assert where(plan) == (["10.0.0.1"] * 2, ["10.0.0.1"])
    assert not plan.gpu and plan.learner[0].resources == {"CPU": 1.0}
    assert set(plan.engines[0].resources) == {"memory"}  # vLLM binds its own cores on CPU
    assert plan.transport("auto") == "file" and plan.transport("broadcast") == "broadcast"


def test_spread_puts_one_rank_per_node_and_separate_keeps_engines_off_them(tiny_model: str) -> None:
    cfg = config(
        tiny_model,
        "learner.world_size=2",
        "placement.learner=spread",
        "placement.engines=separate",
        "rollout.num_workers=2",
    )
    plan = assign(cfg, nodes(3))
    learner, engines = where(plan)
    assert len(set(learner)) == 2 and not set(engines) & set(learner)
    assert plan.transport("auto") == "broadcast"
    packed = assign(config(tiny_model, "learner.world_size=2", "placement.learner=spread"), nodes(3))
    assert where(packed)[1] == [where(packed)[0][0]]  # packed: rank 0's node first
    assert packed.transport("auto") == "file"


def test_gpu_ranks_get_one_gpu_and_engines_their_tensor_parallel_gpus_on_one_node(tiny_model: str) -> None:
    cfg = config(
        tiny_model,
        "learner.world_size=8",
        "rollout.num_workers=4",
        "rollout.tensor_parallel_size=2",
        "placement.engines=separate",
    )
    plan = assign(cfg, nodes(2, **GPU_NODE))
    learner, engines = where(plan)
    assert plan.gpu and len(set(learner)) == 1 and set(engines) == {"10.0.0.2"}
    assert plan.learner[0].resources == {"GPU": 1.0, "CPU": 1.0} and plan.engines[0].resources == {"GPU": 2.0}
    shared = assign(config(tiny_model, "rollout.num_workers=2", "rollout.num_gpus=0.5"), nodes(1, **GPU_NODE))
    assert [p.resources for p in shared.engines] == [{"GPU": 0.5}] * 2


def test_gpu_plan_uses_gpu_nodes_only_and_sandboxes_go_where_docker_is(tiny_model: str) -> None:
    cpu_node = Node(node_id="cpu", address="10.0.1.1", cpus=64, gpus=0, memory=256 * GIB)
    gpu_node = Node(node_id="gpu", address="10.0.2.1", sandboxes="no Docker daemon: ...", **GPU_NODE)
    plan = assign(config(tiny_model, "learner.world_size=4", "rollout.num_workers=4"), [cpu_node, gpu_node])
    assert set(where(plan)[0] + where(plan)[1]) == {"10.0.2.1"}
    assert [n.address for n in plan.sandbox_nodes] == ["10.0.1.1"]
    text = describe(config(tiny_model), plan)
    assert "10.0.1.1" in text and "sandbox pool" in text and "no sandboxes (no Docker daemon" in text


@pytest.mark.parametrize(
    "overrides, cluster, key",
    [
        (
            ["learner.world_size=8", "rollout.num_workers=2"],
            nodes(1, **GPU_NODE),
            "learner.world_size (8) + rollout.num_workers (2)",
        ),
        (
            ["rollout.tensor_parallel_size=8"],
            nodes(3, cpus=32, gpus=4, memory=GIB * 100),
            "rollout.tensor_parallel_size 8",
        ),
        (["learner.world_size=3", "placement.learner=spread"], nodes(2), "placement.learner: spread"),
        (["placement.engines=separate"], nodes(1), "placement.engines: separate"),
        (["learner.threads_per_rank=4"], nodes(3), "learner.threads_per_rank"),
        (["rollout.kv_cache_gib=64"], nodes(3), "rollout.kv_cache_gib"),
        (["learner.world_size=4"], nodes(1), "learner.world_size: 4 ranks"),
        (["rollout.num_workers=3"], nodes(1, memory=4 * GIB), "rollout.num_workers: engine 3 of 3"),
    ],
)
def test_an_impossible_plan_is_one_error_naming_the_key(
    tiny_model: str, overrides: list[str], cluster: list[Node], key: str
) -> None:
    with pytest.raises(ConfigError) as err:
        assign(config(tiny_model, *overrides), cluster)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_gpu_settings_that_contradict_each_other_fail_in_the_config(tiny_model: str) -> None:
    with pytest.raises(ConfigError, match="rollout.num_gpus 0.5 .* needs rollout.tensor_parallel_size 1"):
        config(tiny_model, "rollout.tensor_parallel_size=2", "rollout.num_gpus=0.5")
    with pytest.raises(ConfigError, match="rollout.num_gpus 4 must equal rollout.tensor_parallel_size 2"):
        config(tiny_model, "rollout.tensor_parallel_size=2", "rollout.num_gpus=4")


def test_the_same_cluster_always_gets_the_same_plan(tiny_model: str) -> None:
    cfg = config(tiny_model, "learner.world_size=2", "placement.learner=spread", "rollout.num_workers=3")
    cluster = nodes(4)
    assert where(assign(cfg, cluster)) == where(assign(cfg, list(reversed(cluster))))


def test_the_plan_is_held_by_ray_in_pinned_placement_groups(ray_session: None, tiny_model: str) -> None:
    import ray

    cfg = config(tiny_model, "learner.world_size=2")
    live = live_nodes()
    assert len(live) == 1 and live[0].sandboxes is None  # dockerd and the sandbox image are here
    reservation = Reservation(assign(cfg, live), timeout_s=60)
    try:
        tables = [ray.util.placement_group_table(g) for g in reservation.groups]
        assert [t["state"] for t in tables] == ["CREATED", "CREATED"]
        assert tables[0]["bundles"][0] == {"CPU": 1.0, f"node:{live[0].address}": 0.001}
        options = reservation.options(reservation.plan.engines[0])
        assert options["num_gpus"] == 0 and options["memory"] == reservation.plan.engines[0].resources["memory"]
    finally:
        reservation.remove()
    # More than the node has: Ray cannot hold it, and the run stops naming the timeout's key.
    too_big = assign(cfg, [live[0].model_copy(update={"cpus": 64.0})]).model_copy()
    too_big.learner[0] = too_big.learner[0].model_copy(update={"resources": {"CPU": 64.0}})
    with pytest.raises(ConfigError, match="placement.timeout_s: Ray did not reserve the learner ranks within 2 s"):
        Reservation(too_big, timeout_s=2)
    assert all(
        t["state"] == "REMOVED" for t in ray.util.placement_group_table().values() if t["name"].startswith("codeworld-")
    )
