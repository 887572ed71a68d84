"""Multiple-choice scoring: each context run once for all its choices vs one forward per (context, choice).

The same requests -- world tasks' k-shot prompts and their choices -- scored three ways in one process:

* ``shared``: :func:`lmforge.eval.choice.score_requests`, a context and all its continuations in one packed row;
* ``per_choice``: :func:`lmforge.eval.choice.score_requests_per_choice`, one right-padded row per request (what
  lm-eval's HFLM runs), batched as many rows at a time;
* ``hflm`` (if lm-eval is installed): lm-eval 0.4.13's ``hf`` model on the same model saved as an HF dir.

All three must agree (max |difference| of log-likelihoods printed, asserted < 1e-4); each is timed ``--repeats``
times, alternating, and the medians give the ratios.  Model: GPT-2 style, 4 layers, d_model 192, 6 heads (the
pipeline's shape), a 2048-token BPE trained on world documents, random weights, fp32, one thread.

    python benchmarks/bench_choice_scoring.py            # 4-shot prompts, 40 questions per task
    python benchmarks/bench_choice_scoring.py --quick    # smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine  # noqa: E402

from lmforge.core.tokenizer import Tokenizer  # noqa: E402
from lmforge.data.incontext import load_task, prompts  # noqa: E402
from lmforge.data.world import World, generate_documents  # noqa: E402
from lmforge.eval.choice import encode_pair, score_requests, score_requests_per_choice  # noqa: E402
from lmforge.models.decoder import DecoderLM  # noqa: E402
from lmforge.models.decoder_config import DecoderConfig  # noqa: E402
from lmforge.models.io import save_model  # noqa: E402

TASKS = ["world-kind", "world-arithmetic", "world-fact", "world-sentiment"]


def requests(tok: Tokenizer, n: int, k: int) -> tuple[list[tuple[str, str]], list[tuple[list[int], list[int]]]]:
    strings = []
    for name in TASKS:
        task = load_task(name, n=n, pool_size=32)
        for ctx, ex in zip(prompts(task, k), task.examples):
            strings += [(ctx, " " + c) for c in ex.choices]
    return strings, [encode_pair(tok, c, k) for c, k in strings]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40, help="questions per task")
    ap.add_argument("--k", type=int, default=4, help="demonstrations per prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="rows per forward of the per-choice paths")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n, args.k, args.repeats = 4, 1, 1
    torch.set_num_threads(1)
    torch.manual_seed(0)
    docs = list(itertools.islice(generate_documents(World.build(0), seed=0), 400))
    tok = Tokenizer.train(docs, vocab_size=2048)
    cfg = DecoderConfig(family="gpt2", vocab_size=tok.vocab_size, d_model=192, n_layer=4, n_head=6, max_seq_len=256,
                        dropout=0.0, eos_token_id=tok.eos_id)
    model = DecoderLM(cfg).eval()
    strings, pairs = requests(tok, args.n, args.k)
    tokens_per_choice = sum(len(c) + len(k) for c, k in pairs)
    contexts = len({tuple(c) for c, _ in pairs})

    runs = {"shared": lambda: score_requests(model, pairs, batch_tokens=args.batch * 256),
            "per_choice": lambda: score_requests_per_choice(model, pairs, batch_size=args.batch)}
    hflm = None
    try:
        # optional extra: pip install 'lmforge[harness]'
        from lm_eval.api.instance import Instance
        # optional extra: pip install 'lmforge[harness]'
        from lm_eval.models.huggingface import HFLM
        tmp = tempfile.mkdtemp()
        save_model(model, tmp, tokenizer=tok)
        hflm = HFLM(pretrained=tmp, dtype="float32", device="cpu", batch_size=args.batch)
        insts = [Instance("loglikelihood", {}, s, i) for i, s in enumerate(strings)]
        runs["hflm"] = lambda: hflm.loglikelihood(insts, disable_tqdm=True)
    except ImportError:
        pass

    with torch.inference_mode():
        outs = {name: fn() for name, fn in runs.items()}
    ref = outs["per_choice"]
    diffs = {name: max(abs(a[0] - b[0]) for a, b in zip(out, ref)) for name, out in outs.items()}
    greedy_same = {name: all(a[1] == b[1] for a, b in zip(out, ref)) for name, out in outs.items()}
    assert all(d < 1e-4 for d in diffs.values()) and all(greedy_same.values()), (diffs, greedy_same)
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    for name in runs:
        print(f"{name:<11} {med[name]:8.3f} s  ({len(pairs) / med[name]:8.1f} requests/s, max |Δll| vs per-choice "
              f"{diffs[name]:.2e})")
    ratio = med["per_choice"] / med["shared"]
    print(f"shared-context scoring is {ratio:.2f}x one forward per (context, choice)"
          + (f" and {med['hflm'] / med['shared']:.2f}x lm-eval's HFLM" if "hflm" in med else ""))
    print(json.dumps({"bench": "choice_scoring", "machine": machine(), "load": os.getloadavg(), "tasks": TASKS,
                      "n_per_task": args.n, "k": args.k, "requests": len(pairs), "contexts": contexts,
                      "tokens_per_choice_rows": tokens_per_choice, "seconds": med, "ratio": ratio,
                      "ratio_vs_per_choice": ratio,
                      "ratio_vs_hflm": med["hflm"] / med["shared"] if "hflm" in med else None,
                      "max_abs_diff": diffs}))


if __name__ == "__main__":
    main()
