"""LoRA training step: lmforge's LoRA on its GPT-2 vs PEFT's LoRA on transformers' GPT2LMHeadModel.

Same weights (lmforge's model saved as an HF checkpoint and loaded by transformers), same LoRA (r=8, alpha=16,
targets ``c_attn``, dropout 0), same batch; the first-step losses are asserted equal.  Both run forward +
backward + AdamW step (over the LoRA parameters only) + zero_grad; the two are timed in turn (A, B, A, B), each
reported as the better of its two medians over >= 10 steps
with the ratio (PEFT time / lmforge time: > 1 means lmforge is faster).  Memory is counted the same way for
both (lmforge.train.memory): parameters + gradients + AdamW state + the bytes autograd saves for backward.

    python benchmarks/bench_lora_step.py            # 6 layers, d=384, seq 256, batch 8
    python benchmarks/bench_lora_step.py --quick    # a seconds-long smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_gpt2_shape_args, apply_quick, machine, lm_loss_pair, paired_times  # noqa: E402

from lmforge.delta import DeltaConfig, apply_delta  # noqa: E402
from lmforge.models.decoder import DecoderLM  # noqa: E402
from lmforge.models.decoder_config import DecoderConfig  # noqa: E402
from lmforge.models.io import save_model  # noqa: E402
from lmforge.train.memory import measure_training_memory  # noqa: E402


class _LossOf:
    """Adapts a loss closure to measure_training_memory's objective interface."""

    def __init__(self, fn):
        self.fn = fn

    def loss(self, model, batch):
        return SimpleNamespace(loss_sum=self.fn())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gpt2_shape_args(ap)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--check", action="store_true", help="exit 1 if the ratio < 1.0 or lmforge's memory > PEFT's")
    args = ap.parse_args()
    apply_quick(args)
    import peft
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = DecoderConfig(family="gpt2", vocab_size=args.vocab, d_model=args.d_model, n_layer=args.layers,
                        n_head=args.heads, max_seq_len=args.seq, dropout=0.0)
    ours = DecoderLM(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp)
        ref = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa")
    apply_delta(ours, DeltaConfig(method="lora", r=args.rank, alpha=2 * args.rank))
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["c_attn"],
                                                   lora_dropout=0.0, fan_in_fan_out=True))
    ours.train()
    ref.train()
    with torch.no_grad():  # the same (non-zero) B in both, so the LoRA branch contributes
        for name, p in ours.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.02)
        theirs = {n: p for n, p in ref.named_parameters() if ".lora_" in n}
        for name, p in ours.named_parameters():
            if ".lora_" not in name:
                continue
            layer = name.split(".")[1]
            kind = "lora_A" if "lora_A" in name else "lora_B"
            key = f"base_model.model.transformer.h.{layer}.attn.c_attn.{kind}.default.weight"
            theirs[key].copy_(p)
    loss_ours, loss_ref = lm_loss_pair(ours, ref, args.vocab, args.batch, args.seq)
    l0, l1 = loss_ours().detach(), loss_ref().detach()
    trainable_ours = [p for p in ours.parameters() if p.requires_grad]
    trainable_ref = [p for p in ref.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable_ours) == sum(p.numel() for p in trainable_ref)
    opt_ours = torch.optim.AdamW(trainable_ours, lr=1e-4)
    opt_ref = torch.optim.AdamW(trainable_ref, lr=1e-4)

    def step(model_loss, opt) -> None:
        model_loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    mem_ours = measure_training_memory(ours, _LossOf(loss_ours), {})
    mem_ref = measure_training_memory(ref, _LossOf(loss_ref), {})
    t_ours, t_ref = paired_times(lambda: step(loss_ours, opt_ours), lambda: step(loss_ref, opt_ref), args.steps)
    tokens = args.batch * args.seq
    result = {
        "benchmark": "lora_step", "machine": machine(),
        "shape": f"{args.layers} layers, d={args.d_model}, {args.heads} heads, seq {args.seq}, batch {args.batch}, "
                 f"vocab {args.vocab}, LoRA r={args.rank} on c_attn, fp32",
        "first_step_loss": float(l0), "lmforge_step_s": t_ours, "peft_step_s": t_ref,
        "lmforge_tokens_per_s": tokens / t_ours, "peft_tokens_per_s": tokens / t_ref, "ratio": t_ref / t_ours,
        "lmforge_memory_bytes": mem_ours, "peft_memory_bytes": mem_ref,
        "memory_ratio": mem_ours["total"] / mem_ref["total"],
    }
    mb = 2**20
    print(f"machine: {result['machine']}\nshape:   {result['shape']}")
    print(f"first-step loss equal: {float(l0):.6f} (lmforge) vs {float(l1):.6f} (transformers + PEFT)")
    print(f"lmforge  {t_ours * 1e3:8.1f} ms/step  {tokens / t_ours:10.0f} tok/s  memory {mem_ours['total'] / mb:8.1f} MiB "
          f"(activations {mem_ours['activations'] / mb:.1f})")
    print(f"PEFT     {t_ref * 1e3:8.1f} ms/step  {tokens / t_ref:10.0f} tok/s  memory {mem_ref['total'] / mb:8.1f} MiB "
          f"(activations {mem_ref['activations'] / mb:.1f})")
    print(f"ratio (PEFT time / lmforge time): {result['ratio']:.3f}; memory lmforge / PEFT: {result['memory_ratio']:.3f}")
    print(json.dumps(result))
    if args.check and (result["ratio"] < 1.0 or result["memory_ratio"] > 1.0):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
