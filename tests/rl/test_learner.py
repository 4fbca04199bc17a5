"""The learner ranks: the lr schedule and its checkpoint (one rank in this process), several gloo
ranks with minibatches and uneven shards (Ray actors), and the kernel choices that must fail at
start."""

import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import torch.distributed as dist

from rl.config import AlgorithmSection, ConfigError, LearnerSection, load_config
from rl.learner import LearnerGroup, LearnerRank, TrainSample, free_port, lr_multiplier, weigh
from rl.parallelize import attention_problem, require_runnable

REPO = Path(__file__).resolve().parents[2]


def _samples() -> list[TrainSample]:
    rng = np.random.default_rng(0)
    return [
        TrainSample(
            input_ids=rng.integers(3, 100, 12).astype(np.int32),
            prompt_len=6,
            loss_mask=np.ones(6, np.int32),
            sampler_logprobs=np.full(6, -3.0, np.float32),
            advantage=1.0 if i % 2 else -1.0,
        )
        for i in range(4)
    ]


@pytest.fixture()
def rank(tiny_model: str) -> Iterator[LearnerRank]:
    learner = LearnerSection(lr=1e-3, warmup_steps=4)
    r = LearnerRank(0, 1, free_port(), tiny_model, learner, AlgorithmSection(), 1.0, 0)
    yield r
    dist.destroy_process_group()


def _lr(rank: LearnerRank) -> float:
    return rank.optimizer.param_groups[0]["lr"]


def test_lr_ramps_linearly_over_the_warmup_then_holds(rank: LearnerRank) -> None:
    samples, seen = _samples(), []
    for _ in range(6):
        seen.append(_lr(rank))
        rank.train_step([weigh(samples, AlgorithmSection(), 1)])
    assert seen == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_lr_warms_up_holds_then_decays_linearly_to_its_floor() -> None:
    cfg = LearnerSection(lr=1e-3, warmup_steps=2, stable_steps=2, decay_steps=4, min_lr_ratio=0.2)
    got = [lr_multiplier(step, cfg) for step in range(10)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2])
    decayed = [lr_multiplier(s, LearnerSection(decay_steps=2)) for s in range(3)]
    assert decayed == pytest.approx([1.0, 0.5, 0.0])


def test_checkpoint_restores_weights_optimizer_and_warmup_position(
    rank: LearnerRank, tiny_model: str, tmp_path: Path
) -> None:
    samples = _samples()
    rank.train_step([weigh(samples, AlgorithmSection(), 1)])
    rank.save_checkpoint(str(tmp_path / "ckpt"))
    saved = {k: v.detach().clone() for k, v in rank.model.state_dict().items()}
    rank.train_step([weigh(samples, AlgorithmSection(), 1)])  # moves the weights and the schedule past the checkpoint
    rank.load_checkpoint(str(tmp_path / "ckpt"))
    assert _lr(rank) == pytest.approx(5e-4)
    for k, v in rank.model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def _sample(rng: np.random.Generator, prompt: int, completion: int, advantage: float) -> TrainSample:
    return TrainSample(
        input_ids=rng.integers(3, 400, prompt + completion).astype(np.int32),
        prompt_len=prompt,
        loss_mask=np.ones(completion, np.int32),
        sampler_logprobs=rng.uniform(-7, -4, completion).astype(np.float32),
        advantage=advantage,
    )


def test_two_ranks_with_minibatches_and_uneven_shards_match_one_rank(ray_session: None, tiny_model: str) -> None:
    """Issue #9, defect 1: in the proximal pass a rank with fewer micro-batches padded with a
    forward + backward while the others ran no-grad forwards, and the collectives paired wrongly
    (gloo hung). Here minibatch 0 splits 1 : 2 micro-batches over the ranks and minibatch 1, one
    sample, leaves rank 1 nothing at all."""
    rng = np.random.default_rng(1)
    minibatches = [
        [_sample(rng, 20, 20, 1.0)] + [_sample(rng, 4, 6, a) for a in (1.0, -1.0, 0.5, -0.5)],
        [_sample(rng, 5, 5, -1.0)],
    ]
    totals = [sum(int(s.loss_mask.sum()) for s in mb) for mb in minibatches]
    cfg, algo = LearnerSection(lr=1e-3, micro_batch_tokens=24, world_size=2), AlgorithmSection(minibatches=2)
    one = LearnerRank(0, 1, free_port(), tiny_model, cfg.model_copy(update={"world_size": 1}), algo, 1.0, 0)
    try:
        ref = one.train_step([weigh(mb, algo, 1) for mb in minibatches])
        ref_weights = one.full_state_dict()
    finally:
        dist.destroy_process_group()
    group = LearnerGroup(tiny_model, cfg, algo, 1.0, 0)
    pool = ThreadPoolExecutor(1)
    try:
        got = pool.submit(group.train_step, minibatches).result(timeout=180)  # a hang fails here
        weights = group.full_state_dict()
    finally:
        for r in group.ranks:  # also frees the thread of a hung step
            ray.kill(r)
        pool.shutdown(wait=False)
    # The staleness-0 test's tolerances (tests/e2e/test_train_loop.py): the first optimizer step
    # starts from identical weights, the second from weights two ranks moved by reduction order.
    assert len(got.grad_norms) == 2
    assert got.grad_norms[0] == pytest.approx(ref.grad_norms[0], rel=1e-5)
    assert got.grad_norms[1] == pytest.approx(ref.grad_norms[1], rel=1e-3)
    assert got.loss == pytest.approx(ref.loss_sum / ref.tokens, rel=1e-5)
    assert got.tokens == ref.tokens == sum(totals)
    initial = one.model.state_dict()  # unused weights aside, training moved every tensor below
    numel = sum(v.numel() for v in weights.values())
    far = sum(int(((weights[k] - ref_weights[k]).abs() > 0.1 * cfg.lr).sum()) for k in weights)
    mean = sum(float((weights[k] - ref_weights[k]).abs().sum()) for k in weights) / numel
    assert far <= 1e-3 * numel and mean <= 1e-3 * cfg.lr, (far, mean)
    assert initial.keys() == weights.keys()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learner.attention=fa3", "learner.mixed_precision=off"], "learner.attention fa3 runs in bf16 only"),
        (["learner.attention=fa4", "learner.mixed_precision=off"], "learner.attention fa4 runs in bf16 only"),
        (["learner.float8=rowwise"], "learner.float8 without learner.compile"),
    ],
)
def test_kernel_choices_that_cannot_pay_or_run_are_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["envs=[{name: arithmetic}]", *overrides])


def test_flash_attention_without_a_hopper_gpu_or_its_kernel_is_one_error_naming_the_key() -> None:
    assert not torch.cuda.is_available(), "this test describes a machine without a GPU"
    no_gpu = "learner.attention: fa3 needs a Hopper GPU; this machine has no CUDA GPU."
    with pytest.raises(ConfigError, match=re.escape(no_gpu)):
        require_runnable(LearnerSection(attention="fa3"))
    with pytest.raises(ConfigError, match="learner.attention: fa4 needs a Hopper or Blackwell GPU"):
        require_runnable(LearnerSection(attention="fa4", mixed_precision="bf16"))
    with pytest.raises(ConfigError, match="learner.float8 needs a CUDA GPU"):
        require_runnable(LearnerSection(float8="tensorwise", compile=True))
    require_runnable(LearnerSection())  # sdpa runs anywhere
    # The checks a GPU machine reaches, on the facts such a machine reports:
    assert attention_problem("fa3", (8, 0), None) == (
        "learner.attention: fa3 needs a Hopper GPU; this GPU has compute capability 8.0."
    )
    assert "cannot be imported here (ModuleNotFoundError: No module named 'flash_attn_interface')" in attention_problem(
        "fa3", (9, 0), "ModuleNotFoundError: No module named 'flash_attn_interface'"
    )
    assert attention_problem("fa4", (10, 0), None) is None and attention_problem("fa3", (9, 0), None) is None


def test_dry_run_and_start_refuse_a_kernel_this_machine_lacks(ray_session: None, tiny_model: str) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rl.cli",
            "train",
            str(REPO / "examples/demo.yaml"),
            f"model.path={tiny_model}",
            "learner.attention=fa3",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == ("codeworld: learner.attention: fa3 needs a Hopper GPU; this machine has no CUDA GPU.")
    with pytest.raises(ConfigError, match="fa3 needs a Hopper GPU"):  # before any rank starts
        LearnerGroup(tiny_model, LearnerSection(attention="fa3"), AlgorithmSection(), 1.0, 0)


@pytest.mark.parametrize(("recipe", "granularity"), [("rowwise", "AXISWISE"), ("tensorwise", "TENSORWISE")])
def test_emulated_float8_keeps_its_recipe_and_reports_its_logprob_drift(
    tiny_model: str, recipe: str, granularity: str
) -> None:
    from torchao.float8.float8_linear import Float8Linear

    from rl.batching import micro_batches
    from rl.parallelize import float8_bypassed, load_model

    cfg = LearnerSection(lr=1e-3, float8=recipe, float8_emulate=True, float8_drift_every=1)
    rank = LearnerRank(0, 1, free_port(), tiny_model, cfg, AlgorithmSection(), 1.0, 0)
    try:
        linears = [m for m in rank.model.modules() if isinstance(m, Float8Linear)]
        assert len(linears) == 4 * 7, "every decoder linear layer, not the output head"
        assert {m.config.cast_config_weight.scaling_granularity.name for m in linears} == {granularity}
        assert all(m.config.emulate for m in linears)
        # Bypassed, the float8 layers compute what the plain model computes with the same weights.
        mb = micro_batches(_samples(), 64)[0]
        with torch.no_grad():
            fp8 = rank._logprobs(mb)[0]
            with float8_bypassed(rank.model):
                bypassed = rank._logprobs(mb)[0]
            plain = load_model(tiny_model, "sdpa")(**mb.model_inputs()).logits[0].log_softmax(-1)
        assert torch.allclose(bypassed, plain.gather(-1, mb.targets[:, None]).squeeze(-1), atol=1e-5)
        stats = rank.train_step([weigh(_samples(), AlgorithmSection(), 1)])
        drift = stats.float8_drift_sum / stats.float8_drift_tokens
        # measured at the step-start weights, as above
        assert drift == pytest.approx(float((fp8 - bypassed).abs().mean()), rel=1e-5)
        assert 1e-4 < drift < 0.5, drift
    finally:
        dist.destroy_process_group()


def test_kl_to_the_frozen_reference_starts_at_zero_and_grows(tiny_model: str) -> None:
    """kl_coef keeps a frozen copy of the starting weights on the rank: the first step's policy is
    the reference (KL 0), after it the policy has moved away (KL > 0) while the reference has not."""
    algo = AlgorithmSection(kl_coef=0.5)
    rank = LearnerRank(0, 1, free_port(), tiny_model, LearnerSection(lr=1e-2), algo, 1.0, 0)
    try:
        first = rank.train_step([weigh(_samples(), algo, 1)])
        second = rank.train_step([weigh(_samples(), algo, 1)])
        moved = any(
            not torch.equal(p, r)
            for p, r in zip(rank.model.state_dict().values(), rank.reference.state_dict().values())
        )
    finally:
        dist.destroy_process_group()
    assert first.kl_sum == pytest.approx(0.0, abs=1e-6)
    assert second.kl_sum > 1e-4 and moved
