"""What a frozen backbone already knows about a world classification task: a linear probe on its hidden states.

Delta methods that keep the backbone frozen (prefix and prompt tuning, ladder side tuning, and to a degree adapters
and BitFit) can only re-route what pretraining put into the hidden states; full fine-tuning and LoRA can rewrite
them.  This script fits an L2-regularised logistic regression (LBFGS) on the frozen model's features of the train
split and scores the test split: the last token's final hidden state (what lmforge's GPT classifier reads;
[CLS] for BERT) and the mean over tokens.  A probe near chance predicts that the frozen-backbone methods will
struggle on that model, however they are tuned.

    python benchmarks/probe_frozen.py --model runs/tiny-gpt2/model --task world-sentiment
    python benchmarks/probe_frozen.py --model runs/tiny-gpt2/model --template "{text}\nRating:"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from lmforge.data.world.tasks import build_world_task  # noqa: E402
from lmforge.models.io import load_model  # noqa: E402


@torch.no_grad()
def features(model, tokenizer, texts: list[str], encoder: bool) -> tuple[torch.Tensor, ...]:
    """``[N, d]`` summary-token states, ``[N, d]`` token means of the final hidden states, and for BERT the
    frozen pooler's ``tanh(dense([CLS]))`` (what a sequence classifier with a frozen pooler reads)."""
    first, mean, pooled = [], [], []
    for text in texts:
        ids = list(tokenizer.encode(text))
        if encoder and tokenizer.cls_id is not None and ids[:1] != [tokenizer.cls_id]:
            ids = [tokenizer.cls_id] + ids + [tokenizer.sep_id]
        h = model(torch.tensor([ids]))[0]  # [T, d]
        first.append(h[0] if encoder else h[-1])
        mean.append(h.mean(0))
        if encoder:
            pooled.append(model.pooled(h[None])[0])
    return torch.stack(first), torch.stack(mean), *([torch.stack(pooled)] if encoder else [])


def probe(x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, n_classes: int,
          l2: float = 1e-3) -> float:
    """Test accuracy of a logistic regression fit on standardised train features."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mu) / sd, (xt - mu) / sd
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(((xt @ w + b).argmax(-1) == yt).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a model dir (decoder or BERT)")
    ap.add_argument("--task", default="world-sentiment", help="a world classification task")
    ap.add_argument("--template", default="{text}", help="how each text is presented, e.g. '{text}\\nRating:'")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=500)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    encoder = getattr(model.config, "family", "") == "bert"
    data = build_world_task(args.task, n_train=args.n_train, n_val=0, n_test=args.n_test)
    labels = sorted({r["label"] for r in data["train"]})
    template = args.template.replace("\\n", "\n")

    def split(name: str):
        recs = data[name]
        feats = features(model, tokenizer, [template.format(text=r["text"]) for r in recs], encoder)
        return feats, torch.tensor([labels.index(r["label"]) for r in recs])

    (f_tr, m_tr, *p_tr), y = split("train")
    (f_te, m_te, *p_te), yt = split("test")
    majority = max(float((yt == c).float().mean()) for c in range(len(labels)))
    summary = "[CLS]" if encoder else "last token"
    print(f"# {machine()} | {args.model} | {args.task} (train {len(y)}, test {len(yt)}) | template {args.template!r}")
    print(f"majority {majority:.3f} | probe on {summary} {probe(f_tr, y, f_te, yt, len(labels)):.3f} | "
          f"on the token mean {probe(m_tr, y, m_te, yt, len(labels)):.3f}"
          + (f" | on the pooler output {probe(p_tr[0], y, p_te[0], yt, len(labels)):.3f}" if encoder else ""))


if __name__ == "__main__":
    main()
