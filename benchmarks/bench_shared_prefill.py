"""Rollout sampling: G = 8 answers for each of 8 prompts from one shared prefill vs 64 independent rows.

What GRPO does every step (issue 24): a group of G completions per prompt.  The same engine either prefills the 8
prompts once and repeats their KV cache 8 times (``num_samples=8``), or is given the 64 rows (each prompt 8 times)
and prefills all of them.  Decoding after the prefill is the same work either way (64 rows, one token each per
step), so the gain is the 56 prefills saved: large for long prompts and short answers, small otherwise.  Both runs
draw from the same generator seed and must give identical tokens (checked before timing); then each side is timed
``--repeats`` times, alternating, and the median wall time gives generated tokens/s.

Model: GPT-2 style, 6 layers, d_model 384, 6 heads, vocab 8192, random weights, fp32, temperature 1.

    python benchmarks/bench_shared_prefill.py            # prompts of 192-256 tokens, 32 new tokens
    python benchmarks/bench_shared_prefill.py --quick    # smoke: short prompts, a few tokens
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, sync  # noqa: E402

from lmforge.eval.generate import GenerationConfig, generate  # noqa: E402
from lmforge.models.decoder import DecoderLM  # noqa: E402
from lmforge.models.decoder_config import DecoderConfig  # noqa: E402


def timed(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8, help="G: samples per prompt")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[192, 256], metavar=("MIN", "MAX"))
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="smoke: prompts of 16-24 tokens, 4 new tokens, 2 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompt_len, args.new_tokens, args.repeats = [16, 24], 4, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg_model = DecoderConfig(family="gpt2", vocab_size=8192, d_model=384, n_layer=6, n_head=6,
                              max_seq_len=args.prompt_len[1] + args.new_tokens, dropout=0.0)
    model = DecoderLM(cfg_model, device=device).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.prompt_len[0], args.prompt_len[1] + 1, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(3, 8192, (n,), generator=g).tolist() for n in lengths]
    rows = [p for p in prompts for _ in range(args.group)]
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, temperature=1.0, ignore_eos=True)

    def shared():
        return generate(model, prompts, cfg, num_samples=args.group,
                        generator=torch.Generator(device=device).manual_seed(7))

    def independent():
        return generate(model, rows, cfg, generator=torch.Generator(device=device).manual_seed(7))

    if [r.tokens for r in shared()] != [r.tokens for r in independent()]:
        print("shared prefill and independent rows drew different tokens; not timing", file=sys.stderr)
        return 1
    t_shared, t_indep = [], []
    for _ in range(args.repeats):
        t_shared.append(timed(shared))
        t_indep.append(timed(independent))
    n_tokens = len(rows) * args.new_tokens
    tps_shared = n_tokens / statistics.median(t_shared)
    tps_indep = n_tokens / statistics.median(t_indep)
    ratio = tps_shared / tps_indep
    print(machine())
    print(f"model: gpt2-style, 6 layers, d_model 384, vocab 8192, fp32, random weights; {args.prompts} prompts of "
          f"{min(lengths)}-{max(lengths)} tokens x G={args.group}, {args.new_tokens} new tokens, temperature 1, "
          f"median of {args.repeats}")
    print(f"shared prefill   {tps_shared:9.1f} tok/s")
    print(f"independent rows {tps_indep:9.1f} tok/s")
    print(f"ratio            {ratio:9.2f}x")
    print(json.dumps({"bench": "shared_prefill", "prompts": args.prompts, "group": args.group,
                      "prompt_len": [min(lengths), max(lengths)], "new_tokens": args.new_tokens,
                      "shared_tok_s": round(tps_shared, 1), "independent_tok_s": round(tps_indep, 1),
                      "ratio": round(ratio, 3), "device": str(device)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
