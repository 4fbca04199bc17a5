"""Building the learner's model: attention kernel, float8, activation checkpointing, compilation
and FSDP2, applied in that order (torchtitan's order: converters, then AC, then compile, then
sharding).

Attention always runs on packed rows (`rl.batching`): one row per micro-batch, samples bounded
by `PackedLayout`. Three kernels, all registered with transformers' `AttentionInterface` under
names of our own, so transformers never substitutes another kernel for a missing one:
* `sdpa`: the block-diagonal path for CPU and any GPU. Each sample's queries, keys and values are
  scattered into a right-padded [samples, longest, ...] layout and SDPA runs causally on it; a
  causal query never sees the padding after it, and the padded rows are dropped. Only attention
  sees padding; the linear layers and the output head run on the packed tokens.
* `fa3`: FlashAttention-3's varlen kernel (`flash_attn_interface`), Hopper, bf16.
* `fa4`: FlashAttention-4's varlen kernel (`flash_attn.cute`, the `flash-attn-4` package), Hopper
  or Blackwell, bf16.
Asking for a kernel this machine cannot run is a `ConfigError` at start (`require_runnable`),
never a fallback.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from rl.config import ConfigError, LearnerSection

ATTENTION_IMPLEMENTATIONS = {"sdpa": "codeworld_sdpa", "fa3": "codeworld_fa3", "fa4": "codeworld_fa4"}
"""`learner.attention` → the name its kernel is registered under in transformers."""

_KERNELS = {  # attention → (module, what it needs, compute capability majors it runs on)
    "fa3": ("flash_attn_interface", "FlashAttention-3's Hopper build (flash_attn_interface)", (9,)),
    "fa4": ("flash_attn.cute", "FlashAttention-4 (the flash-attn-4 package)", (9, 10)),
}


# The packed layout changes with every micro-batch; traced, these would recompile for each new
# longest-sample length. Each is one opaque kernel call, so the compiled blocks lose nothing by
# keeping them out of the graph.
@torch.compiler.disable
def _sdpa_packed(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    packed: Any = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Block-diagonal causal attention over a packed row. query: [1, heads, N, dim]."""
    samples, longest = packed.cu_seqlens.numel() - 1, packed.max_seqlen

    def padded(x: Any) -> Any:  # [1, h, N, d] -> [samples, h, longest, d], zeros after each sample
        h, d = x.shape[1], x.shape[3]
        out = x.new_zeros(h, samples * longest, d).index_copy(1, packed.pad_index, x[0])
        return out.view(h, samples, longest, d).transpose(0, 1)

    out = F.scaled_dot_product_attention(
        padded(query), padded(key), padded(value), is_causal=True, scale=scaling, enable_gqa=True
    )
    h, d = out.shape[1], out.shape[3]
    out = out.transpose(0, 1).reshape(h, samples * longest, d).index_select(1, packed.pad_index)
    return out.transpose(0, 1).unsqueeze(0), None  # [1, N, heads, dim], as transformers expects


def _flash_packed(varlen: Any) -> Any:
    """An attention function calling a FlashAttention varlen kernel on a packed row."""

    @torch.compiler.disable
    def attention(
        module: Any,
        query: Any,
        key: Any,
        value: Any,
        attention_mask: Any,
        scaling: float | None = None,
        dropout: float = 0.0,
        packed: Any = None,
        **kwargs: Any,
    ) -> tuple[Any, None]:
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [N, heads, dim]
        out = varlen(
            q,
            k,
            v,
            cu_seqlens_q=packed.cu_seqlens,
            cu_seqlens_k=packed.cu_seqlens,
            max_seqlen_q=packed.max_seqlen,
            max_seqlen_k=packed.max_seqlen,
            softmax_scale=scaling,
            causal=True,
        )
        out = out[0] if isinstance(out, tuple) else out  # builds differ: some also return the LSE
        return out.unsqueeze(0), None

    return attention


def attention_problem(attention: str, capability: tuple[int, int] | None, kernel_error: str | None) -> str | None:
    """Why `learner.attention` cannot run on a machine whose first GPU has `capability` (None: no
    CUDA GPU) and where importing the kernel failed with `kernel_error` (None: it imports)."""
    if attention not in _KERNELS:
        return None
    _, needs, majors = _KERNELS[attention]
    gpus = "a Hopper GPU" if majors == (9,) else "a Hopper or Blackwell GPU"
    if capability is None:
        return f"learner.attention: {attention} needs {gpus}; this machine has no CUDA GPU."
    if capability[0] not in majors:
        return (
            f"learner.attention: {attention} needs {gpus}; this GPU has compute capability "
            f"{capability[0]}.{capability[1]}."
        )
    if kernel_error is not None:
        return f"learner.attention: {attention} needs {needs}, which cannot be imported here ({kernel_error})."
    return None


def _varlen_kernel(attention: str) -> Any:
    return importlib.import_module(_KERNELS[attention][0]).flash_attn_varlen_func


def require_runnable(cfg: LearnerSection) -> None:
    """Raise a ConfigError naming the key if this machine cannot run `cfg`'s kernels."""
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    kernel_error = None
    if cfg.attention in _KERNELS and capability is not None:
        try:
            _varlen_kernel(cfg.attention)
        except (ImportError, AttributeError) as err:
            kernel_error = f"{type(err).__name__}: {err}"
    problem = attention_problem(cfg.attention, capability, kernel_error)
    if problem is None and cfg.float8 != "off" and capability is None and not cfg.float8_emulate:
        problem = "learner.float8 needs a CUDA GPU; on a CPU set learner.float8_emulate: true (tests only)."
    if problem is not None:
        raise ConfigError(problem)


def load_model(model_path: str, attention: str) -> Any:
    """The Hugging Face model in fp32 with the packed-row attention kernel `attention`."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    kernel = _sdpa_packed if attention == "sdpa" else _flash_packed(_varlen_kernel(attention))
    AttentionInterface.register(ATTENTION_IMPLEMENTATIONS[attention], kernel)
    return AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation=ATTENTION_IMPLEMENTATIONS[attention]
    )


def compute_dtype(cfg: LearnerSection, device: Any) -> Any:
    """The dtype FSDP2 computes in: `mixed_precision`, where "auto" is bf16 on a GPU, fp32 on CPU."""
    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def build_model(model_path: str, cfg: LearnerSection, device: Any) -> Any:
    """Load, convert, checkpoint, compile and shard the model (each decoder block, then the root)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = load_model(model_path, cfg.attention).to(device)
    if cfg.float8 != "off":
        _convert_float8(model, cfg, device)
    layers = model.model.layers
    for i in range(len(layers)):
        if cfg.activation_checkpointing and i % cfg.activation_checkpointing == 0:
            # In the backward pass the block's forward runs again instead of its activations being kept.
            layers[i] = checkpoint_wrapper(layers[i], preserve_rng_state=False)
        if cfg.compile:
            layers[i].compile()
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype(cfg, device), reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def _convert_float8(model: Any, cfg: LearnerSection, device: Any) -> None:
    """torchao float8 training for the decoder's linear layers (not the output head). Tensorwise
    scaling on a GPU also all-gathers the weights in fp8 (FSDP2), with scales precomputed after
    each optimizer step (`precompute_float8_scales`); torchao allows that for tensorwise only, and
    gloo cannot all-gather fp8 at all."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(cfg.float8)
    config = dataclasses.replace(
        config, emulate=cfg.float8_emulate, enable_fsdp_float8_all_gather=_fp8_all_gather(cfg, device)
    )
    convert_to_float8_training(
        model.model,
        config=config,
        module_filter_fn=lambda mod, fqn: mod.in_features % 16 == 0 and mod.out_features % 16 == 0,
    )


def _fp8_all_gather(cfg: LearnerSection, device: Any) -> bool:
    return cfg.float8 == "tensorwise" and device.type == "cuda"


def precompute_float8_scales(model: Any, cfg: LearnerSection, device: Any) -> None:
    """After an optimizer step: the fp8 all-gather's weight scales, in one all-reduce."""
    if cfg.float8 != "off" and _fp8_all_gather(cfg, device):
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(model)


@contextmanager
def float8_bypassed(model: Any) -> Iterator[None]:
    """Inside, every float8 linear layer computes in its compute dtype instead (to measure the
    logprob drift float8 causes). A weight FSDP2 already all-gathered in fp8 (tensorwise on a GPU)
    is used as gathered, so there the drift counts the casts of activations, not of weights."""
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    def plain(m: Any) -> Any:
        def forward(x: Any) -> Any:
            w = m.weight.to_original_precision() if isinstance(m.weight, Float8TrainingTensor) else m.weight
            return F.linear(x, w.to(x.dtype), None if m.bias is None else m.bias.to(x.dtype))

        return forward

    layers = [m for m in model.modules() if isinstance(m, Float8Linear)]
    for m in layers:
        m.forward = plain(m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward  # back to the class's float8 forward
