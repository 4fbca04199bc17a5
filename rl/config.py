"""The run configuration: typed sections loaded from YAML, with `dotted.key=value` overrides.

Every section forbids unknown keys, so a typo is an error that names its key path instead of a
setting silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Section(BaseModel):
    """Base of every config section: unknown keys are errors; field docstrings are the docs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class RunSection(Section):
    name: str = "run"
    """Run name: used for the run directory, the Redis stream and the weight exchange folder."""
    dir: Path = Path("runs/run")
    """Where metrics, plots, checkpoints and summary.json are written."""
    seed: int = 0
    """Seed for task sampling, model init and sampling."""
    steps: int = Field(100, ge=1)
    """Learner steps to run."""
    max_wall_s: float | None = Field(None, gt=0)
    """Stop after the step during which this many seconds of training have passed (None: no limit)."""
    record_batches: bool = False
    """Write every step's batch to <dir>/batches/step_N.msgpack (for replay and tests)."""


class ModelSection(Section):
    path: Path = Path("runs/tiny")
    """A local Hugging Face checkpoint directory (config.json, safetensors, tokenizer)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Engine dtype. Training logprobs are always computed in fp32."""


class RolloutSection(Section):
    num_workers: int = Field(1, ge=1)
    """vLLM engines (one Ray actor each)."""
    max_tokens: int = Field(32, ge=1)
    """Token limit of one model turn."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (the learner divides logits by the same value)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling; keep 1.0 for unbiased policy-gradient estimates."""
    max_model_len: int = Field(1024, ge=16)
    """Longest sequence (prompt plus all turns) the engine accepts."""
    kv_cache_gib: float = Field(1.0, gt=0)
    """KV-cache memory per engine on CPU (VLLM_CPU_KVCACHE_SPACE)."""
    cpu_cores: str | None = Field(None, pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
    """CPU cores a CPU engine's OpenMP threads bind to ("1", "0-3"); None: all. When the learner
    shares the machine, OpenMP threads on every core spin-wait against it; one core can be faster."""

    @field_validator("cpu_cores", mode="before")
    @classmethod
    def _core_number(cls, value: object) -> object:
        return str(value) if isinstance(value, int) else value  # `rollout.cpu_cores=1` reads as an int

    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """Share of its GPUs' memory a GPU engine may take (weights, activations, KV cache)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one engine shards the model over; they are always on one node."""
    num_gpus: float | None = Field(None, ge=0)
    """GPUs each engine reserves. None: `tensor_parallel_size` on a cluster with GPUs, 0 without. A
    fraction (with `tensor_parallel_size` 1) lets several engines share a GPU; size
    `gpu_memory_utilization` so that they fit."""
    enforce_eager: bool = True
    """Skip torch.compile / CUDA graphs: starts ~3x faster, generates a little slower."""
    max_concurrent_episodes: int = Field(512, ge=1)
    """Episodes running at once across all workers (beyond admission control)."""

    @model_validator(mode="after")
    def _gpus_fit_tensor_parallel(self) -> RolloutSection:
        tp, gpus = self.tensor_parallel_size, self.num_gpus
        if gpus is not None and 0 < gpus < 1 and tp > 1:
            raise ValueError(
                f"rollout.num_gpus {gpus} (a share of one GPU) needs rollout.tensor_parallel_size 1, not {tp}."
            )
        if gpus is not None and gpus >= 1 and gpus != tp:
            raise ValueError(
                f"rollout.num_gpus {gpus:g} must equal rollout.tensor_parallel_size {tp} "
                "(one GPU per tensor-parallel rank)."
            )
        return self


class AlgorithmSection(Section):
    group_size: int = Field(8, ge=1)
    """Samples per task (G); advantages are normalised within a group."""
    batch_size: int = Field(64, ge=1)
    """Groups per learner step."""
    max_staleness: int = Field(1, ge=0)
    """How many versions generation may run ahead of the learner (0: synchronous on-policy)."""
    lookahead: int = Field(1, ge=0)
    """Batches generation may run ahead of the one being trained when it keeps up (plus one group
    per straggler, within max_staleness). Samples are then trained at the age the overlap needs (about
    one version), not at the bound: measured on the demo, a pipeline filled to max_staleness 4 bought
    no speed over 1 and trained on 4-version-old samples that taught less per step."""
    max_age: int | None = Field(None, ge=0)
    """Hard cap on a trajectory's age in versions; older ones are dropped and counted
    (None: max_staleness + 1)."""
    minibatches: int = Field(1, ge=1)
    """Optimizer steps per learner step (the batch split into this many parts). With more than
    one, decoupled PPO's ratio against the step-start policy moves and its clip acts."""
    loss: Literal["decoupled_ppo", "gspo", "truncated_is"] = "decoupled_ppo"
    """decoupled_ppo: PPO's clipped ratio against the step-start (proximal) policy, times the
    behaviour weight exp(prox − sampler) (AReaL); gspo: the same with the ratio taken per
    sequence (the geometric mean of its tokens'; use a small clip, e.g. 3e-4 / 4e-4);
    truncated_is: REINFORCE with the weight exp(logp − sampler), no clipping."""
    clip_low: float = Field(0.2, ge=0)
    """Lower clip range: ratio >= 1 - clip_low."""
    clip_high: float = Field(0.2, ge=0)
    """Upper clip range: ratio <= 1 + clip_high."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip PPO: for a negative advantage the objective is bounded below by dual_clip × A, so a
    token whose ratio has grown large cannot push the loss without bound (None: off)."""
    is_cap: float = Field(2.0, ge=1)
    """Bound of the behaviour (importance) weights: weights above it are truncated to it, or, with
    `is_mode: mask`, tokens whose weight lies outside [1/is_cap, is_cap] are left out."""
    is_mode: Literal["truncate", "mask"] = "truncate"
    """What happens to an importance weight beyond `is_cap`: truncated to it, or its token masked."""
    is_level: Literal["token", "sequence"] = "token"
    """Importance weights per token, or per sequence (the geometric mean of its tokens' weights)."""
    aggregation: Literal["token_mean", "sequence_mean", "token_sum"] = "token_mean"
    """How per-token losses make the batch's loss: the mean over all model tokens; the mean over
    sequences of each one's token mean (GRPO); or their sum over (sequences × rollout.max_tokens),
    a constant (Dr. GRPO: no length bias)."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the KL penalty to a frozen reference policy (the starting weights), computed on
    the learner ranks (0: no reference model is kept)."""
    kl_estimator: Literal["k1", "k3"] = "k3"
    """Per-token KL estimate: k1 = logp − ref; k3 = exp(ref − logp) − (ref − logp) − 1 (≥ 0)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Weight of the entropy bonus (subtracted from the loss)."""
    normalize_std: bool = True
    """Divide advantages by the group's reward std (GRPO) or only subtract its mean (Dr. GRPO)."""
    unfinished_reward: float = 0.0
    """Reward of an episode that ran out of context (rollout.max_model_len) or turns before its
    environment finished it: the policy's failure, scored and flagged truncated, never dropped."""
    shuffle_rewards: bool = False
    """A control, for checking the wiring only: rewards are permuted across the batch's samples
    before advantages are computed, so that whatever the run still learns does not come from the
    reward (bench/learning.py uses it)."""
    filter_zero_variance: bool = True
    """Drop groups whose rewards are all equal: they carry no gradient."""
    overlong: Literal["none", "filter", "penalty"] = "none"
    """Samples whose last turn hit the token limit: kept as they are; left out of the loss (their
    group's baseline still counts them); or penalised (DAPO's soft punishment, see `overlong_buffer`)."""
    overlong_buffer: int = Field(0, ge=0)
    """`overlong: penalty`: the last this-many tokens before rollout.max_tokens where the penalty
    grows linearly from 0 to `overlong_penalty` (0: no penalty)."""
    overlong_penalty: float = Field(1.0, ge=0)
    """`overlong: penalty`: the reward subtracted from a turn cut at the token limit."""
    env_advantage_norm: bool = False
    """After the group baselines, divide each environment's advantages by their standard deviation
    over the batch, so that environments with different reward scales pull equally."""
    dynamic_sampling: bool = False
    """Replace groups whose rewards are all equal by sampling more (DAPO), so that each step trains
    on `batch_size` groups that carry a gradient; otherwise such groups are only filtered out."""
    dynamic_sampling_max_batches: int = Field(10, ge=1)
    """`dynamic_sampling`: at most this many batches' worth of groups are drawn for one version of
    the weights (the batch and its replacements). Past that, groups without signal are passed on
    and filtered as without dynamic sampling, so a policy that solves every task, or none, still
    trains on the informative groups there are instead of sampling forever; a warning says so."""

    @model_validator(mode="after")
    def _max_age_covers_the_bound(self) -> AlgorithmSection:
        if self.max_age is not None and self.max_age < self.max_staleness:
            raise ValueError(
                f"max_age ({self.max_age}) is below max_staleness ({self.max_staleness}): groups "
                "the staleness bound admits would be dropped as too old; raise max_age or lower "
                "max_staleness."
            )
        return self

    @property
    def effective_max_age(self) -> int:
        return self.max_staleness + 1 if self.max_age is None else self.max_age


class LearnerSection(Section):
    world_size: int = Field(1, ge=1)
    """Learner ranks (Ray actors); FSDP2 shards the model across them."""
    lr: float = Field(3e-4, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = Field(1.0, gt=0)
    """Global gradient-norm clip."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps over which the learning rate ramps linearly up to `lr`. A fresh AdamW's
    first steps move every weight by about `lr` in the sign of a noisy policy gradient; the ramp
    lets its moment estimates average that noise out first."""
    stable_steps: int = Field(0, ge=0)
    """Optimizer steps at the full `lr` after the warm-up, before the decay."""
    decay_steps: int = Field(0, ge=0)
    """Optimizer steps after the stable phase over which the learning rate falls linearly to
    `lr × min_lr_ratio`, then stays there; 0: no decay. A policy still moving by a full `lr` per
    step when the run ends is a noisy snapshot; the decay lets it settle."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Where the decay ends, as a share of `lr`."""
    micro_batch_tokens: int = Field(16384, ge=1)
    """Tokens per forward/backward micro-batch on one rank (gradient accumulation beyond). Samples
    are packed without padding, so this counts real tokens."""
    threads_per_rank: int = Field(1, ge=1)
    """torch intra-op threads per rank on CPU."""
    mixed_precision: Literal["auto", "off", "bf16"] = "auto"
    """FSDP2 parameter dtype for compute ("auto": bf16 on a GPU, fp32 on CPU); gradient reductions
    and logprobs stay fp32."""
    float8: Literal["off", "rowwise", "tensorwise"] = "off"
    """torchao float8 training of the decoder's linear layers (GPU; `float8_emulate` on CPU).
    Tensorwise also all-gathers weights in fp8. Costs logprob accuracy: the learner logs the drift
    (`float8_drift_every`); 0.094 nats per token was measured, ten times bf16's."""
    float8_emulate: bool = False
    """Emulate float8 matmuls with the same recipe (for CPU tests)."""
    float8_drift_every: int = Field(10, ge=0)
    """With float8: every this many steps, each rank runs one micro-batch through the model with
    and without float8 (two extra forwards) and the step reports the mean |logprob difference|
    (0: never)."""
    attention: Literal["sdpa", "fa3", "fa4"] = "sdpa"
    """Attention kernel over packed samples. sdpa: block-diagonal SDPA (CPU, any GPU); fa3:
    FlashAttention-3 varlen (Hopper, flash_attn_interface); fa4: FlashAttention-4 varlen (Hopper
    or Blackwell, flash-attn-4). FlashAttention needs bf16; a kernel this machine cannot run is an
    error at start."""
    compile: bool = False
    """torch.compile each decoder block (attention stays outside the graph). float8 only pays with
    it: uncompiled float8 measured 3x slower than bf16 (27 k vs 88 k tokens/s, H200, hidden 1024)."""
    activation_checkpointing: int = Field(0, ge=0)
    """Recompute every n-th decoder block's activations in the backward pass instead of keeping
    them (1: every block, 2: every other one; 0: off): about a third more compute for memory."""

    @field_validator("mixed_precision", "float8", mode="before")
    @classmethod
    def _off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML reads a bare `off` as false

    @model_validator(mode="after")
    def _kernels_fit_the_dtype(self) -> LearnerSection:
        if self.attention in ("fa3", "fa4") and self.mixed_precision == "off":
            raise ValueError(
                f"learner.attention {self.attention} runs in bf16 only; set "
                "learner.mixed_precision to bf16 (or auto, bf16 on a GPU), or use attention "
                "sdpa for fp32."
            )
        if self.float8 != "off" and not self.float8_emulate and not self.compile:
            raise ValueError(
                "learner.float8 without learner.compile measured 3x slower than bf16; set learner.compile: true."
            )
        return self


class EnvSection(Section):
    name: str
    """Registered environment name (`codeworld envs list`)."""
    weight: float = Field(1.0, gt=0)
    """Relative sampling weight among the run's environments."""
    loss_weight: float = Field(1.0, ge=0)
    """Multiplies this environment's advantages: how hard its samples pull on the policy."""
    data: Path | None = None
    """Dataset file, when the environment reads one."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Environment-specific parameters, validated by the environment's Params model."""


class EvalSetSection(Section):
    env: str
    """Registered environment whose held-out split is evaluated (any environment, trained on or not)."""
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    """Label of the set in metric names (`eval/<name>/...`); None: the environment's name."""
    split: str = "test"
    """The split to evaluate."""
    data: Path | None = None
    """Dataset file; None: that of the same environment in `envs`, else the environment's default."""
    params: dict[str, Any] | None = None
    """Environment parameters; None: those of the same environment in `envs` (so a held-out split
    matches the train split it is held out from), else the environment's defaults."""
    n: int = Field(500, ge=1)
    """Tasks evaluated: the first n of the split."""
    greedy: bool = True
    """One greedy (temperature 0) sample per task: `eval/<set>/greedy` is its mean reward."""
    pass_k: int = Field(0, ge=0)
    """Also sample k completions per task at the rollout temperature: `eval/<set>/pass_at_<k>` is the
    share of tasks with a full-reward sample, `eval/<set>/sampled_mean` the mean reward; 0: off."""

    @property
    def label(self) -> str:
        return self.name or self.env

    @model_validator(mode="after")
    def _measures_something(self) -> EvalSetSection:
        if not self.greedy and not self.pass_k:
            raise ValueError(f"eval set {self.label!r} has greedy off and pass_k 0: it would measure nothing.")
        return self


class EvalSection(Section):
    every: int = Field(0, ge=0)
    """Evaluate every N learner steps, between steps (0: only before and after training). The learner
    waits for it; generation goes on, within the staleness bound."""
    sets: list[EvalSetSection] = Field(default_factory=list)
    """Held-out sets, all evaluated at each evaluation point; empty: no evaluation."""

    @field_validator("sets")
    @classmethod
    def _unique_labels(cls, sets: list[EvalSetSection]) -> list[EvalSetSection]:
        labels = [s.label for s in sets]
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise ValueError(f"eval set names repeat: {repeated}; give each set its own `name`.")
        return sets


class BusSection(Section):
    redis_url: str | None = Field(None, pattern=r"^rediss?://")
    """Redis to use (`redis://host:6379/0`, `rediss://` for TLS; a private CA as
    `?ssl_ca_certs=/path/ca.pem`); unset: codeworld starts a private redis-server and stops it at
    exit. A password may be in the URL (`redis://:PASSWORD@host:6379/0`) or in `password_env`."""
    password_env: str = "CODEWORLD_REDIS_PASSWORD"
    """Environment variable holding the Redis password, used when `redis_url` carries none (keeps
    the secret out of config files and logs)."""
    block_ms: int = Field(1000, ge=1)
    """How long one read waits for trajectories before checking for shutdown."""


class WeightsSection(Section):
    transport: Literal["auto", "file", "broadcast"] = "auto"
    """How new weights reach the engines. file: safetensors in shared memory that each engine
    reloads, for engines on learner rank 0's node only; broadcast: streamed in buckets from the
    learner's shards to every engine's workers (gloo on CPU, NCCL on GPU), across nodes; auto:
    file when every engine is on learner rank 0's node, broadcast otherwise."""
    bucket_mb: float = Field(256, gt=0)
    """Broadcast bucket size in MiB: the learner gathers, checksums and sends this much at a time
    (a larger tensor goes alone). Learner rank 0 holds one bucket; an engine stages the whole push
    (one model's bytes) until it is verified."""
    timeout_s: float = Field(600, gt=0)
    """Longest any one step of a broadcast push (joining, one bucket, the final load) may take
    before the push fails."""
    push_attempts: int = Field(3, ge=1)
    """Attempts at a push an engine refused (a corrupted or torn transfer: the engines keep
    serving the previous version); after the last, the run stops with the engines' reason."""


class PlacementSection(Section):
    learner: Literal["pack", "spread"] = "pack"
    """Learner ranks: pack fills nodes (ranks talk over NVLink or shared memory); spread puts one
    rank per node."""
    engines: Literal["packed", "separate"] = "packed"
    """Rollout engines: packed fills the learner's nodes first, then others; separate never puts
    an engine on a node with a learner rank."""
    timeout_s: float = Field(120, gt=0)
    """How long Ray may take to reserve the plan (other jobs may hold resources) before the run
    stops with the plan that could not be placed."""


class CheckpointSection(Section):
    every: int = Field(0, ge=0)
    """Checkpoint every N steps (0: never). Trajectories are acknowledged on the bus only once the
    step that used them is checkpointed (or right after the step when checkpointing is off)."""


class FaultsSection(Section):
    """How a run survives its parts failing: deadlines on every wait (a watchdog names what hung,
    writes `hang-<time>.json` in the run directory, then restarts the part or stops the run
    resumably) and how often a part may be restarted."""

    engine_call_s: float = Field(600, gt=0)
    """Longest one generate call may take before its engine counts as hung and is restarted."""
    engine_start_s: float = Field(900, gt=0)
    """Longest starting an engine (a restart: a new actor loading the model) may take before the
    run stops resumably; far longer than one call, which is why it has its own deadline."""
    engine_poll_s: float = Field(5, gt=0)
    """How often each engine is asked whether its vLLM core still lives; a dead one is restarted
    at once, failing the calls that waited in it."""
    weight_push_s: float = Field(600, gt=0)
    """Longest pushing one version of the weights to the engines may take (an engine that does not
    load it in time is restarted on it)."""
    learner_call_s: float = Field(3600, gt=0)
    """Longest one learner call (a step, a publish, a checkpoint) may take before the learner ranks
    count as hung and are rebuilt from the last checkpoint."""
    batch_wait_s: float = Field(1800, gt=0)
    """Longest the learner may wait for a batch without any trajectory arriving or any group
    finishing; then the run stops resumably, naming what it waited for."""
    episode_s: float = Field(3600, gt=0)
    """Longest one group's episodes (environment steps, sandboxes, engine calls) may take; a group
    past it is cancelled and its samples are dropped as lost."""
    redis_s: float = Field(120, gt=0)
    """How long a Redis call is retried (with backoff) through a dropped connection before the run
    stops resumably."""
    engine_restarts: int = Field(10, ge=0)
    """Engine restarts allowed in one launch (dead or hung); one more stops the run resumably."""
    learner_rebuilds: int = Field(3, ge=0)
    """Times the learner ranks may be rebuilt from the last checkpoint in one launch; one more
    stops the run resumably."""
    group_retries: int = Field(1, ge=0)
    """Times a group whose engine died is run again (on a restarted engine) before its samples
    are dropped as lost."""


class WandbSection(Section):
    project: str = "codeworld"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); None: the account's default."""
    mode: Literal["offline", "online"] = "offline"
    """offline writes under <run dir>/wandb for a later `wandb sync` (clusters are often offline)."""
    table_every: int = Field(50, ge=1)
    """Log the recorded train samples as a W&B table every N steps (evaluation samples: at every
    evaluation)."""


class MlflowSection(Section):
    tracking_uri: str | None = None
    """MLflow tracking URI (a server, `sqlite:///...`); None: a file store in <run dir>/mlruns."""
    experiment: str = "codeworld"
    """MLflow experiment name."""


class SamplesSection(Section):
    train_share: float = Field(0.125, ge=0, le=1)
    """Share of each step's groups whose trajectories are recorded, whole groups (at least one group
    when above 0). Every evaluation sample is recorded."""
    max_samples: int = Field(20000, ge=1)
    """The store keeps the newest this many samples and deletes older ones."""
    max_chars: int = Field(20000, ge=100)
    """Characters kept of each prompt and turn (the rest is cut and marked)."""


class DashboardSection(Section):
    enabled: bool = True
    """Serve the dashboard while the run trains (`codeworld dashboard` serves it afterwards)."""
    host: str = "127.0.0.1"
    """Address to listen on. Any other than loopback requires a token (CODEWORLD_DASHBOARD_TOKEN, or
    a random one printed with the URL)."""
    port: int = Field(8700, ge=0, le=65535)
    """Port to listen on; when taken, a free one is used and printed (0: always a free one)."""


class LoggingSection(Section):
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers that receive every metric under the same names as metrics.jsonl.
    wandb and mlflow are optional extras: pip install 'codeworld[wandb]' / 'codeworld[mlflow]'."""
    wandb: WandbSection = WandbSection()
    """Weights & Biases settings (used when `trackers` lists wandb)."""
    mlflow: MlflowSection = MlflowSection()
    """MLflow settings (used when `trackers` lists mlflow)."""
    samples: SamplesSection = SamplesSection()
    """The rotating store of samples that the dashboard's sample browser reads."""
    dashboard: DashboardSection = DashboardSection()
    """The live dashboard started by `codeworld train`."""
    plot: bool = True
    """Write reward_curve.png at the end of the run."""
    progress: bool = True
    """Show a progress bar."""


class Config(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    rollout: RolloutSection = RolloutSection()
    algorithm: AlgorithmSection = AlgorithmSection()
    learner: LearnerSection = LearnerSection()
    envs: list[EnvSection] = Field(default_factory=list, min_length=1)
    eval: EvalSection = EvalSection()
    bus: BusSection = BusSection()
    weights: WeightsSection = WeightsSection()
    placement: PlacementSection = PlacementSection()
    checkpoint: CheckpointSection = CheckpointSection()
    logging: LoggingSection = LoggingSection()
    faults: FaultsSection = FaultsSection()


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the key path."""


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set `a.b.0.c=value` in a nested dict/list tree; the value is parsed as YAML."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"Override {override!r} is not of the form dotted.key=value.")
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]), create=True)
    last = parts[-1]
    value = yaml.safe_load(raw)
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    else:
        node[last] = value


def _child(node: Any, part: str, path: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if not isinstance(node, dict):
        raise ConfigError(f"Override key {path!r} goes below a value that is not a section.")
    if part not in node and create:
        node[part] = {}
    return node[part]


def _index(node: list[Any], part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"Override key {path!r}: {part!r} is not an index of a {len(node)}-item list.")
    return int(part)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or defaults when `path` is None) and apply `dotted.key=value` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file {str(p)!r} does not exist.")
        tree = yaml.safe_load(p.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"Config file {str(p)!r} must hold a mapping at the top level.")
    for override in overrides:
        apply_override(tree, override)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        lines = [f"{'.'.join(str(x) for x in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()]
        raise ConfigError("Invalid config: " + "; ".join(lines)) from None
