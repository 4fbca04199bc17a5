"""The learner's GPU paths on one Hopper GPU: NCCL process group, FSDP2, bf16 mixed precision,
torchao float8 training and FlashAttention-3, each against the fp32 baseline in the same run.

    python bench/gpu_learner.py [--size large|tiny] [--steps 6]

Builds a Qwen2 model of the `init-tiny` shape (random weights: the learner needs no tokenizer),
runs one `LearnerRank` (world size 1, NCCL) per variant on the same synthetic batch, and prints
per variant: tokens/s of a train step, the first step's loss and mean |logprob| difference from
fp32 (how far the faster numerics drift), and the loss after `--steps` steps on that batch (it
must fall: the update is wired). A variant whose kernels are missing prints why and is skipped.
On CPU it runs the same code with gloo and float8 emulation (slow; for checking the script).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {  # (hidden, layers, heads, intermediate): "large" is bench/pipeline.py's ~350 M model
    "tiny": (128, 4, 4, 512),
    "large": (1024, 24, 16, 3328),
}
VARIANTS = {
    "fp32": {},
    "bf16": {"mixed_precision": "bf16"},
    "bf16+fp8-rowwise": {"mixed_precision": "bf16", "float8": "rowwise"},
    "bf16+fp8-tensorwise": {"mixed_precision": "bf16", "float8": "tensorwise"},
    "bf16+fa3": {"mixed_precision": "bf16", "attention": "fa3"},
}


def build_model(out: Path, size: str) -> int:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, inter = SIZES[size]
    config = Qwen2Config(vocab_size=512, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=2048,
                         tie_word_embeddings=True, torch_dtype="float32")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def batch(samples: int, prompt_len: int, completion_len: int):
    from rl.learner import TrainSample

    rng = np.random.default_rng(0)
    out = []
    for i in range(samples):
        ids = rng.integers(3, 512, prompt_len + completion_len).astype(np.int32)
        out.append(TrainSample(input_ids=ids, prompt_len=prompt_len, loss_mask=np.ones(completion_len, np.int32),
                               sampler_logprobs=np.full(completion_len, -6.0, np.float32),
                               advantage=1.0 if i % 2 == 0 else -1.0))
    return out


def logprobs(rank, samples) -> "np.ndarray":
    import torch

    from rl.learner import _to_tensors
    from rl.loss import token_logprobs

    t = _to_tensors(samples, rank.device)
    with torch.no_grad():
        logp, _ = token_logprobs(rank.model(input_ids=t["input_ids"]).logits[:, :-1], t["targets"], 1.0)
    return logp[t["mask"] == 1].float().cpu().numpy()  # completion tokens only


def run_variant(name: str, model_dir: Path, samples, steps: int, reference) -> dict:
    import torch

    from rl.config import AlgorithmSection, LearnerSection
    from rl.learner import LearnerRank, _free_port

    cpu = not torch.cuda.is_available()
    opts = dict(VARIANTS[name], float8_emulate=cpu and "float8" in VARIANTS[name], lr=1e-4, threads_per_rank=2)
    try:
        rank = LearnerRank(0, 1, _free_port(), str(model_dir), LearnerSection(**opts), AlgorithmSection(), 1.0, 0)
        lp = logprobs(rank, samples)
        tokens = sum(int(s.loss_mask.sum()) for s in samples)
        losses, times = [], []
        for _ in range(steps):
            if not cpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            stats = rank.train_step([samples], [tokens])
            if not cpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(stats.loss_sum / stats.tokens)
        seq_tokens = sum(len(s.input_ids) for s in samples)
        return {"variant": name, "tokens_per_s": round(seq_tokens / float(np.median(times[1:] or times))),
                "first_loss": round(losses[0], 5), "last_loss": round(losses[-1], 5),
                "mean_abs_logprob_diff_vs_fp32": None if reference is None else float(np.abs(lp - reference).mean()),
                "backend": torch.distributed.get_backend()}, lp
    finally:  # also when the variant failed after joining the process group
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="large")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    import torch

    print(json.dumps({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      "torch": torch.__version__}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        params = build_model(Path(tmp), args.size)
        print(json.dumps({"model": args.size, "parameters": params}), flush=True)
        samples = batch(args.samples, 256, 256)
        reference = None
        for name in args.variants.split(","):
            try:
                row, lp = run_variant(name, Path(tmp), samples, args.steps, reference)
            except Exception as exc:  # a missing kernel or package: say which, go on with the rest
                print(json.dumps({"variant": name, "skipped": f"{type(exc).__name__}: {exc}"[:400]}), flush=True)
                continue
            reference = lp if name == "fp32" else reference
            row["loss_fell"] = row["last_loss"] < row["first_loss"]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
