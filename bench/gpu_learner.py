"""The learner's GPU paths on one GPU, each against fp32 in the same run: tokens/s, MFU, peak
memory and the logprob drift of bf16, FlashAttention varlen, torch.compile and torchao float8.

    python bench/gpu_learner.py                # ~2 B Qwen2-shaped model (hidden 3072), one H200
    python bench/gpu_learner.py --tiny         # toy shape on CPU: checks the script end to end

Builds a Qwen2 model with random weights (the learner needs no tokenizer), then per variant runs
one `LearnerRank` (world size 1: NCCL on a GPU, gloo on CPU) on the same synthetic batch of
packed samples with mixed lengths, and prints a JSON line, then a table of all variants:
* tokens/s: row tokens (prompt and completion) per second of a train step, median of the steps
  after the first (which compiles and warms up);
* MFU: model FLOPs per second over 790 TFLOP/s, a bf16 8192³ matmul on the H200 (PLATFORM.md).
  Model FLOPs of a step: 6 per parameter per row token for the decoder blocks, 6 per output-head
  parameter per *model* token (logits are computed only where a model token is predicted) and
  6·layers·hidden per token per earlier token of its own sample (causal attention, packed);
* drift: mean |logprob − fp32 logprob| over the model tokens of the first micro-batch at the
  initial weights (how far the faster numerics move the policy the loss sees);
* peak memory of the step, and whether the loss moved from the first to the last step (the
  update is wired).
A variant this machine cannot run (no Hopper GPU, no flash_attn_interface, no torchao) prints why
and is skipped; the rest still run. All variants with every kernel present take longer than one
device call allows; pick the issue's four (and fp32) with --variants.

On the device (torch, triton and transformers, no registry): torchao and the FlashAttention
kernels are not installed there and must be carried as wheels, e.g. here
`pip download --no-deps torchao==0.18.0 -d wheels/`, there `pip install --no-deps wheels/*.whl`.
FlashAttention-3 has no PyPI wheel: it is built from source (deploy/docker/Dockerfile.cuda).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    # ~2.0 B parameters (1.5 B in the blocks): where float8 should pay (hidden >= 3072); Qwen2's vocabulary.
    "large": (3072, 16, 24, 4, 8192, 151936),
    "tiny": (128, 4, 4, 2, 512, 1024),
}
BF16 = {"mixed_precision": "bf16"}
VARIANTS = {  # compiled variants spend their first (untimed) step compiling: about a minute each
    "fp32": {"mixed_precision": "off"},
    "bf16 sdpa": BF16,
    "bf16 fa3": {**BF16, "attention": "fa3"},
    "bf16 fa4": {**BF16, "attention": "fa4"},
    "bf16 fa3 compiled": {**BF16, "attention": "fa3", "compile": True},
    "fp8 rowwise fa3": {**BF16, "attention": "fa3", "float8": "rowwise", "compile": True},
    "fp8 tensorwise fa3": {**BF16, "attention": "fa3", "float8": "tensorwise", "compile": True},
    # Where FlashAttention-3 is missing, float8 against the same compiled bf16 baseline on SDPA:
    "bf16 sdpa compiled": {**BF16, "compile": True},
    "fp8 rowwise sdpa": {**BF16, "float8": "rowwise", "compile": True},
    "fp8 tensorwise sdpa": {**BF16, "float8": "tensorwise", "compile": True},
}
CPU_VARIANTS = {  # what --tiny can run on a CPU: the same code paths, float8 emulated
    "fp32": VARIANTS["fp32"],
    "bf16 sdpa": BF16,
    "bf16 sdpa compiled": {**BF16, "compile": True},
    "fp8 rowwise sdpa (emulated)": {**BF16, "float8": "rowwise", "float8_emulate": True},
    "fp8 tensorwise sdpa (emulated)": {**BF16, "float8": "tensorwise", "float8_emulate": True},
    "fp8 rowwise sdpa compiled (emulated)": {**BF16, "float8": "rowwise", "float8_emulate": True, "compile": True},
    "bf16 fa3": VARIANTS["bf16 fa3"],
}
H200_BF16_FLOPS = 790e12


def build_model(out: Path, shape: str) -> int:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    # Random init on the GPU: seconds, not the minutes 2 B parameters take on the CPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def batch(samples: int, longest: int, vocab: int) -> list[Any]:
    """Mixed lengths (a quarter to all of `longest`), a quarter of each sample prompt."""
    from rl.batching import TrainSample

    rng = np.random.default_rng(0)
    out = []
    for i in range(samples):
        n = int(rng.integers(longest // 4, longest + 1))
        prompt = max(1, n // 4)
        out.append(
            TrainSample(
                input_ids=rng.integers(3, vocab, n).astype(np.int32),
                prompt_len=prompt,
                loss_mask=np.ones(n - prompt, np.int32),
                sampler_logprobs=np.full(n - prompt, -np.log(vocab), np.float32),
                advantage=1.0 if i % 2 == 0 else -1.0,
            )
        )
    return out


def step_flops(samples: list[Any], shape: str) -> float:
    """Model FLOPs of one train step (forward and backward), as the module docstring defines them."""
    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    head_dim = hidden // heads
    block = layers * (2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim + 3 * hidden * inter)
    rows = sum(len(s.input_ids) for s in samples)
    model_tokens = sum(int(s.loss_mask.sum()) for s in samples)
    context = sum(n * (n - 1) / 2 for n in (len(s.input_ids) for s in samples))  # earlier tokens, summed
    return 6 * block * rows + 6 * vocab * hidden * model_tokens + 6 * layers * hidden * context * 2


def probe_logprobs(rank: Any, samples: list[Any], budget: int) -> np.ndarray:
    import torch

    from rl.batching import micro_batches

    mb = micro_batches(samples, budget)[0].to(rank.device)
    with torch.no_grad():
        return rank._logprobs(mb)[0].float().cpu().numpy()


def run_variant(opts: dict[str, Any], model_dir: Path, samples: list[Any], steps: int, budget: int) -> dict[str, Any]:
    """One variant's figures; raises when this machine cannot run it."""
    import torch

    from rl.config import AlgorithmSection, LearnerSection
    from rl.learner import LearnerRank, free_port, weigh

    gpu = torch.cuda.is_available()
    cfg = LearnerSection(**opts, lr=1e-5, micro_batch_tokens=budget, threads_per_rank=2, float8_drift_every=0)
    try:
        rank = LearnerRank(0, 1, free_port(), str(model_dir), cfg, AlgorithmSection(), 1.0, 0)
        lp = probe_logprobs(rank, samples, budget)
        losses, times = [], []
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            stats = rank.train_step([weigh(samples, AlgorithmSection(), 1)])
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(stats.loss_sum / stats.tokens)
        return {
            "step_s": statistics.median(times[1:] or times),
            "first_step_s": times[0],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
            "loss_moved": losses[-1] != losses[0],
            "logprobs": lp,
        }
    finally:  # also when the variant failed after joining the process group
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if gpu:
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy shape and CPU-runnable variants (checks the script)")
    ap.add_argument("--steps", type=int, default=4, help="train steps per variant (the first is not timed)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--longest", type=int, default=2048, help="longest sample in tokens")
    ap.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset, e.g. 'fp32,bf16 fa3,fp8 rowwise fa3,fp8 tensorwise fa3'",
    )
    args = ap.parse_args()
    import torch

    shape, table = ("tiny", CPU_VARIANTS) if args.tiny else ("large", VARIANTS)
    longest = min(args.longest, 128) if args.tiny else args.longest
    names = args.variants.split(",") if args.variants else list(table)
    print(
        json.dumps(
            {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
        ),
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        params = build_model(Path(tmp), shape)
        samples = batch(args.samples, longest, SHAPES[shape][5])
        flops = step_flops(samples, shape)
        row_tokens = sum(len(s.input_ids) for s in samples)
        print(
            json.dumps(
                {
                    "shape": shape,
                    "parameters": params,
                    "row_tokens_per_step": row_tokens,
                    "model_tflop_per_step": round(flops / 1e12, 2),
                }
            ),
            flush=True,
        )
        rows = measure(names, Path(tmp), samples, args.steps, flops)
    print_table(rows)


def measure(names: list[str], tmp: Path, samples: list[Any], steps: int, flops: float) -> list[dict[str, Any]]:
    """Each variant's row, printed as it is measured: tokens/s, MFU on a GPU, logprob drift
    against the fp32 variant (when it runs first)."""
    import torch

    row_tokens = sum(len(s.input_ids) for s in samples)
    rows: list[dict[str, Any]] = []
    reference = None
    for name in names:
        try:
            got = run_variant({**VARIANTS, **CPU_VARIANTS}[name], tmp, samples, steps, 16384)
        except Exception as exc:  # a missing kernel, package or GPU: say which, go on with the rest
            rows.append({"variant": name, "skipped": f"{type(exc).__name__}: {exc}"[:300]})
            print(json.dumps(rows[-1]), flush=True)
            continue
        lp = got.pop("logprobs")
        reference = lp if name == "fp32" else reference
        gpu = torch.cuda.is_available()
        drift = None if reference is None else round(float(np.abs(lp - reference).mean()), 4)
        rows.append(
            {
                "variant": name,
                "tokens_per_s": round(row_tokens / got["step_s"]),
                "mfu": round(flops / got["step_s"] / H200_BF16_FLOPS, 3) if gpu else None,
                "drift_vs_fp32": drift,
                **{k: round(v, 2) if isinstance(v, float) else v for k, v in got.items()},
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'variant':<32}{'tokens/s':>10}{'MFU':>7}{'drift':>8}{'peak GiB':>10}{'step s':>8}  note")
    for r in rows:
        if "skipped" in r:
            print(f"{r['variant']:<32}{'-':>10}{'-':>7}{'-':>8}{'-':>10}{'-':>8}  skipped: {r['skipped']}")
            continue
        cells = [r["tokens_per_s"], r["mfu"], r["drift_vs_fp32"], r["peak_gib"], r["step_s"]]
        text = ["-" if c is None else str(c) for c in cells]
        note = "" if r["loss_moved"] else "the loss did not move: the update is not wired"
        print(f"{r['variant']:<32}{text[0]:>10}{text[1]:>7}{text[2]:>8}{text[3]:>10}{text[4]:>8}  {note}")


if __name__ == "__main__":
    main()
