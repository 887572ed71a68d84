"""Training-step speed: lmforge's GPT-2 vs transformers' GPT2LMHeadModel, same weights, same batch.

Before timing, lmforge's weights are saved as an HF checkpoint and loaded into GPT2LMHeadModel (sdpa
attention, dropout 0 in both), and the first-step losses are asserted equal.  Then both run
forward + backward + AdamW step + zero_grad; the two are timed in turn (A, B, A, B), each
reported as the better of its two medians over >= 10 steps, with tokens/s, the
ratio (transformers time / lmforge time: > 1 means lmforge is faster) and lmforge's MFU against a
large-matmul ceiling measured in the same run (FLOPs per token 6N + 12·L·d·T, lmforge.models.flops).

    python benchmarks/bench_train_step.py            # the acceptance shape: 6 layers, d=384, seq 256, batch 8
    python benchmarks/bench_train_step.py --quick    # a seconds-long smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_gpt2_shape_args, apply_quick, machine, matmul_ceiling, lm_loss_pair, paired_times  # noqa: E402

from lmforge.models.decoder import DecoderLM  # noqa: E402
from lmforge.models.decoder_config import DecoderConfig  # noqa: E402
from lmforge.models.flops import flops_per_token  # noqa: E402
from lmforge.models.io import save_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gpt2_shape_args(ap)
    ap.add_argument("--check", action="store_true", help="exit 1 if the ratio < 1.0 or MFU < 60%% of the ceiling")
    args = ap.parse_args()
    apply_quick(args)
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = DecoderConfig(family="gpt2", vocab_size=args.vocab, d_model=args.d_model, n_layer=args.layers,
                        n_head=args.heads, max_seq_len=args.seq, dropout=0.0)
    ours = DecoderLM(cfg).train()
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp)
        ref = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa").train()
    loss_ours, loss_ref = lm_loss_pair(ours, ref, args.vocab, args.batch, args.seq)
    l0, l1 = loss_ours().detach(), loss_ref().detach()
    fused = {"fused": True}
    try:
        opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, **fused)
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-4, **fused)
    except RuntimeError:
        opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-4)

    def step(model_loss, opt) -> None:
        model_loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ceiling = matmul_ceiling()
    t_ours, t_ref = paired_times(lambda: step(loss_ours, opt_ours), lambda: step(loss_ref, opt_ref), args.steps)
    tokens = args.batch * args.seq
    flops = flops_per_token(cfg, args.seq) * tokens
    mfu = flops / t_ours / ceiling
    result = {
        "benchmark": "train_step", "machine": machine(),
        "shape": f"{args.layers} layers, d={args.d_model}, {args.heads} heads, seq {args.seq}, batch {args.batch}, "
                 f"vocab {args.vocab}, fp32",
        "first_step_loss": float(l0), "lmforge_step_s": t_ours, "transformers_step_s": t_ref,
        "lmforge_tokens_per_s": tokens / t_ours, "transformers_tokens_per_s": tokens / t_ref,
        "ratio": t_ref / t_ours, "matmul_ceiling_gflops": ceiling / 1e9, "lmforge_gflops": flops / t_ours / 1e9,
        "mfu_of_ceiling": mfu,
    }
    print(f"machine: {result['machine']}\nshape:   {result['shape']}")
    print(f"first-step loss equal: {float(l0):.6f} (lmforge) vs {float(l1):.6f} (transformers)")
    print(f"lmforge      {t_ours * 1e3:8.1f} ms/step  {tokens / t_ours:10.0f} tok/s")
    print(f"transformers {t_ref * 1e3:8.1f} ms/step  {tokens / t_ref:10.0f} tok/s")
    print(f"ratio (transformers time / lmforge time): {result['ratio']:.3f}")
    print(f"MFU: {flops / t_ours / 1e9:.1f} GFLOP/s of a {ceiling / 1e9:.1f} GFLOP/s matmul ceiling = {mfu:.1%}")
    print(json.dumps(result))
    if args.check and (result["ratio"] < 1.0 or mfu < 0.6):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
