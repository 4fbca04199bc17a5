"""Run on the container cluster by tests/e2e/test_cluster.py (`ray job submit -- python check_push.py
MODEL`): weights cross nodes by broadcast, the engine's fp32 logprobs are compared with the
learner's, and a push whose bytes are flipped in flight is refused. Prints one JSON line.

The learner rank and the engine are placed on different nodes (`placement.engines: separate`).
The flipped bytes come from a sender on the learner's node whose broadcast is wrapped to flip one
byte of the first bucket after its checksum was taken: a fault injected at the transport
boundary, the one place a corruption in flight can be caused on purpose.
"""

import json
import sys

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rl.config import load_config
from rl.learner import LearnerGroup, TrainSample, free_port
from rl.placement import reserve
from workers.rollout import EngineConfig, RolloutWorker, Sampling
from workers.weight_transfer import WeightTransferRefused

PROMPT = [1, 283, 201, 20, 21, 13, 22, 23, 279, 2, 201, 1, 288, 201]


def reference_logprobs(model_dir: str, state: dict, tokens: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.load_state_dict(state)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([PROMPT + tokens])).logits[0].float(), -1)
    return np.array([logp[len(PROMPT) - 1 + i, t].item() for i, t in enumerate(tokens)])


@ray.remote(num_cpus=0)
class Sender:
    """A second sender, on the learner's node, holding a copy of the learner's weights."""

    def __init__(self, model_dir: str, state: dict) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.load_state_dict(state)

    def push(self, engine, version: int, flip: bool) -> str | None:
        from rl.weight_broadcast import connect

        sender = connect(self.model, 0, [engine], [1], 0.25, 120, torch.float32, free_port())
        if flip:
            send, sent = sender._broadcast, []

            def flipped(data: torch.Tensor) -> None:
                if not sent:  # the first bucket only
                    data[len(data) // 2] ^= 0xFF
                sent.append(1)
                send(data)

            sender._broadcast = flipped
        try:
            sender.send_weights(version)
        except WeightTransferRefused as err:
            return str(err)
        finally:
            sender.shutdown()
        return None


def main(model_dir: str) -> None:
    ray.init(log_to_driver=False)
    cfg = load_config(None, [f"model.path={model_dir}", "placement.engines=separate", "envs=[{name: arithmetic}]"])
    placement = reserve(cfg)
    plan = placement.plan
    engine = RolloutWorker.remote_actor(
        EngineConfig(model_path=model_dir, max_model_len=128), **placement.options(plan.engines[0])
    )
    learner = LearnerGroup(model_dir, cfg.learner.model_copy(update={"lr": 1e-2}), cfg.algorithm, 1.0, 0, placement)
    ray.get(engine.get_version.remote())
    learner.connect_engines([engine], [1], cfg.weights, "float32")
    rng = np.random.default_rng(0)
    samples = [
        TrainSample(
            input_ids=np.array(PROMPT + list(rng.integers(3, 400, 8))),
            prompt_len=len(PROMPT),
            loss_mask=np.ones(8),
            sampler_logprobs=np.full(8, -6.0),
            advantage=a,
        )
        for a in (1.0, -1.0, 0.5, -0.5)
    ]
    learner.train_step([samples])
    stats = learner.broadcast(1)
    sampling = Sampling(n=4, max_tokens=16, seed=3)
    gens = ray.get(engine.generate.remote(PROMPT, sampling))
    state = learner.full_state_dict()
    diff = max(
        float(np.abs(reference_logprobs(model_dir, state, g.token_ids) - np.array(g.logprobs)).max()) for g in gens
    )
    on_learner_node = NodeAffinitySchedulingStrategy(plan.learner[0].node.node_id, soft=False)
    sender = Sender.options(scheduling_strategy=on_learner_node).remote(model_dir, state)
    refused = ray.get(sender.push.remote(engine, 2, True))
    after = ray.get(engine.generate.remote(PROMPT, sampling))
    print(
        json.dumps(
            {
                "learner_node": plan.learner[0].node.address,
                "engine_node": plan.engines[0].node.address,
                "transport": plan.transport(cfg.weights.transport),
                "push_s": stats.seconds,
                "push_bytes": stats.bytes,
                "versions": sorted({v for g in gens for v in g.versions}),
                "max_logprob_diff": diff,
                "refused": refused,
                "version_after_refusal": ray.get(engine.get_version.remote()),
                "same_samples_after_refusal": [g.token_ids for g in after] == [g.token_ids for g in gens],
                "same_logprobs_after_refusal": [g.logprobs for g in after] == [g.logprobs for g in gens],
                "accepted_after_refusal": ray.get(sender.push.remote(engine, 3, False)) is None,
                "version_at_end": ray.get(engine.get_version.remote()),
            }
        )
    )
    learner.shutdown()
    placement.remove()


if __name__ == "__main__":
    main(sys.argv[1])
