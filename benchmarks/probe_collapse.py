"""Has a T5 encoder collapsed its tokens onto one direction?  Residual-stream norms per block and the cosine
similarity of the encoder's final outputs.

A healthy encoder keeps its positions apart: cross-attention can then tell them apart, read the one that answers a
question, or copy it.  A tiny T5 pretrained on the built-in world grows a few "massive activation" dimensions (Sun et
al. 2024, "Massive Activations in Large Language Models"): the residual stream goes from the embeddings' norm ~14
to ~1000 in three blocks, almost all of it one constant vector, and the final RMS norm divides every token by it.
Fine-tuning such a model starts from nearly identical keys and values at every position (benchmarks/RESULTS.md, T5
section).  The check takes seconds; run it on a checkpoint before spending an hour fine-tuning it.

    python benchmarks/probe_collapse.py --model runs/tiny-t5/model
    python benchmarks/probe_collapse.py --model runs/tiny-t5/model --random   # the same architecture, fresh weights

Prints one line: the block norms and the mean cosine between the final outputs of distinct positions (pooled over
``--n`` world-sentiment reviews); ~0.3 at random init, > 0.95 for a collapsed encoder.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from lmforge.data.world.tasks import build_world_task
from lmforge.models.io import load_model


def mean_offdiag_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity over distinct pairs of the rows of ``x [N, d]``."""
    n = x.shape[0]
    if n < 2:
        raise ValueError("need at least two vectors")
    xn = F.normalize(x.float(), dim=-1)
    sim = xn @ xn.T
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


@torch.no_grad()
def encoder_trace(model, ids: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    """Mean residual-stream norm after each encoder block and the final normed outputs ``[T, d]`` of one input
    (``model.encode`` itself runs; hooks read each block's output)."""
    norms: list[float] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: norms.append(float(out[0].norm(dim=-1).mean())))
             for block in model.encoder.blocks]
    try:
        out = model.encode(ids, None)
    finally:
        for h in hooks:
            h.remove()
    return norms, out[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a T5 model dir (lmforge or transformers)")
    ap.add_argument("--n", type=int, default=16, help="world-sentiment reviews to pool positions over")
    ap.add_argument("--random", action="store_true", help="re-initialise the weights (the reference point)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    model, tokenizer = load_model(a.model)
    if getattr(model.config, "family", "") != "t5":
        print(f"error: --model {a.model} is a {getattr(model.config, 'family', '?')} model; this probe reads a T5 "
              f"encoder", file=sys.stderr)
        return 2
    if a.random:
        torch.manual_seed(a.seed)
        model.reset_parameters()
    model.eval()
    texts = [r["text"] for r in build_world_task("world-sentiment", n_train=a.n, n_val=0, n_test=0)["train"]]
    norms, outs = [], []
    for text in texts:
        ids = torch.tensor([list(tokenizer.encode(text)) + [tokenizer.eos_id]])
        n, out = encoder_trace(model, ids)
        norms.append(n)
        outs.append(out)
    block_norms = [sum(col) / len(col) for col in zip(*norms)]
    g = torch.Generator().manual_seed(a.seed)
    pool = torch.cat(outs)
    pick = pool[torch.randperm(len(pool), generator=g)[:512]]
    emb = float(model.shared.weight.detach().norm(dim=-1).mean())
    print(f"embedding norm {emb:.1f} | block norms {' / '.join(f'{v:.0f}' for v in block_norms)} | "
          f"final output cosine {mean_offdiag_cosine(pick):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
