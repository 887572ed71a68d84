"""Greedy generation speed: lmforge's engine vs transformers' ``generate``, same weights, one process.

Model: GPT-2 style, 6 layers, d_model 384, 6 heads, vocab 8192, random weights, fp32.  lmforge builds it;
the weights go to transformers' ``GPT2LMHeadModel`` through lmforge's ``save_model`` and
``from_pretrained`` (sdpa attention, KV cache).  Both generate exactly ``--new-tokens`` tokens greedily
(EOS set, ``min_new_tokens`` = all of them).  Before timing, the two must produce identical token ids on
a short run.  Then for batch 1 (one prompt) and batch 8 (eight prompts of different lengths, left
padded) each side is timed ``--repeats`` times, alternating lmforge/transformers so that drift on a
shared machine hits both alike, after a warm-up run; the median wall time gives tokens/s.

    python benchmarks/bench_generate.py            # full run (256 new tokens)
    python benchmarks/bench_generate.py --quick    # CI smoke: a few tokens, seconds
    python benchmarks/bench_generate.py --check    # exit 1 if a ratio is below --target (1.5)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.eval.generate import GenerationConfig, generate  # noqa: E402
from lmforge.models.decoder import DecoderLM  # noqa: E402
from lmforge.models.decoder_config import DecoderConfig  # noqa: E402
from lmforge.models.io import save_model  # noqa: E402

EOS, PAD = 0, 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> str:
    import transformers

    parts = [f"cpu: {cpu_model()} ({os.cpu_count()} logical cores)",
             f"torch {torch.__version__}, transformers {transformers.__version__}, "
             f"python {platform.python_version()}, torch threads {torch.get_num_threads()}",
             f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")]
    try:
        parts.append("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    except OSError:
        pass
    return "\n".join(parts)


def make_prompts(batch: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [32] if batch == 1 else [16 + 4 * i for i in range(batch)]  # 16..44: left padding in play
    return [torch.randint(2, 8192, (n,), generator=g).tolist() for n in lengths]


def hf_inputs(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_lmforge(model, prompts, n: int) -> list[list[int]]:
    cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, eos_token_id=EOS)
    return [r.tokens for r in generate(model, prompts, cfg, pad_id=PAD)]


def run_hf(hf, ids, mask, n: int) -> list[list[int]]:
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=EOS, pad_token_id=PAD, use_cache=True)
    return out[:, ids.shape[1]:].tolist()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side (median is reported)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--check-tokens", type=int, default=32, help="tokens compared for equality before timing")
    ap.add_argument("--quick", action="store_true", help="CI smoke: 16 new tokens, 3 repeats")
    ap.add_argument("--check", action="store_true", help="exit 1 if any ratio is below --target")
    ap.add_argument("--target", type=float, default=1.5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats, args.check_tokens = 16, 3, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    torch.manual_seed(0)
    config = DecoderConfig(family="gpt2", vocab_size=8192, d_model=384, n_layer=6, n_head=6, max_seq_len=1024,
                           bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    model = DecoderLM(config, device=device).eval()
    with tempfile.TemporaryDirectory() as d:
        save_model(model, d)
        hf = GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa").to(device).eval()

    print(machine_info(device))
    try:
        busy = os.getloadavg()[0]
        if device.type == "cpu" and busy > 0.5:
            print(f"warning: the machine is busy (load {busy:.2f}); other processes share the cores, so CPU "
                  f"timings are noisy (with more torch threads than free cores, badly so: try --threads 1)")
    except OSError:
        pass
    print(f"model: gpt2-style, 6 layers, d_model 384, 6 heads, vocab 8192, fp32, random weights; "
          f"{args.new_tokens} new tokens, greedy, median of {args.repeats}")
    print(f"{'batch':>5} {'lmforge tok/s':>14} {'transformers tok/s':>19} {'ratio':>6}")
    ratios = {}
    for batch in args.batches:
        prompts = make_prompts(batch, seed=batch)
        ids, mask = hf_inputs(prompts, device)
        # Correctness first: identical token ids on a short run.
        ours = run_lmforge(model, prompts, args.check_tokens)
        ref = run_hf(hf, ids, mask, args.check_tokens)
        if ours != ref:
            print(f"batch {batch}: lmforge and transformers disagree on greedy tokens; not timing", file=sys.stderr)
            return 1
        n = args.new_tokens
        run_lmforge(model, prompts, n)  # warm-up
        run_hf(hf, ids, mask, n)
        t_ours, t_hf = [], []
        for _ in range(args.repeats):
            t_ours.append(timed(lambda: run_lmforge(model, prompts, n), device))
            t_hf.append(timed(lambda: run_hf(hf, ids, mask, n), device))
        tps_ours = batch * n / statistics.median(t_ours)
        tps_hf = batch * n / statistics.median(t_hf)
        ratios[batch] = tps_ours / tps_hf
        print(f"{batch:>5} {tps_ours:>14.1f} {tps_hf:>19.1f} {ratios[batch]:>5.2f}x", flush=True)
    status = 0
    if args.check:
        low = {b: r for b, r in ratios.items() if r < args.target}
        if low:
            print(f"FAIL: ratio below {args.target}x at batch " + ", ".join(f"{b} ({r:.2f}x)" for b, r in low.items()))
            status = 1
        else:
            print(f"OK: every ratio >= {args.target}x")
    # Last line: one JSON object for scripts (ratio = the smallest over the batch sizes).
    print(json.dumps({"benchmark": "generate", "new_tokens": args.new_tokens, "target": args.target,
                      "ratios": {str(b): r for b, r in ratios.items()}, "ratio": min(ratios.values())}))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
