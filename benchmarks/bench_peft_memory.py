"""Counted training memory of full fine-tuning and every delta method, on one fine-tuning config's model and task.

Each method is built exactly as ``lmforge finetune CONFIG peft.method=...`` builds it (``finetune.build``), then one
training step on the first micro-batch is counted (lmforge.train.memory): parameters + gradients + AdamW state +
the bytes autograd saves for backward.  Nothing is trained; the table is printed (MiB) and written as JSON.

    python benchmarks/bench_peft_memory.py --finetune configs/finetune-gpt2-sentiment.yaml model=runs/tiny-gpt2
    python benchmarks/bench_peft_memory.py --quick    # a tiny random GPT-2 from a temporary HF dir (CI)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from lmforge.recipes.bench_peft import METHOD_ARGS  # noqa: E402
from lmforge.recipes.finetune import _measure_memory, build, load_finetune_config  # noqa: E402


def _tiny_model(root: Path) -> str:
    from lmforge.core.tokenizer import Tokenizer
    from lmforge.models.decoder import DecoderLM
    from lmforge.models.decoder_config import DecoderConfig
    from lmforge.models.io import save_model

    texts = ["the review was not good but the food was great", "a calm river runs past the old mill"] * 50
    tok = Tokenizer.train(texts, vocab_size=300, special_tokens=["<|endoftext|>"], eos_token="<|endoftext|>")
    model = DecoderLM(DecoderConfig(vocab_size=tok.vocab_size, d_model=64, n_layer=2, n_head=4, max_seq_len=256,
                                    eos_token_id=tok.eos_id))
    save_model(model, root / "model", tokenizer=tok)
    return str(root / "model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--finetune", default="configs/finetune-gpt2-sentiment.yaml")
    ap.add_argument("--methods", default=",".join(METHOD_ARGS))
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("overrides", nargs="*", help="fine-tuning key=value overrides (e.g. model=runs/tiny-gpt2)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = list(a.overrides)
        if a.quick:
            overrides += [f"model={_tiny_model(Path(tmp))}", "task.n_train=64", "task.n_val=16", "task.n_test=16",
                          "train.global_batch_size=8"]
        rows = {}
        for name in a.methods.split(","):
            parts = build(load_finetune_config(a.finetune, [*overrides, *METHOD_ARGS[name],
                                                            f"run_dir={Path(tmp) / name}"]))
            mem = _measure_memory(parts)
            rows[name] = {**mem, "trainable": sum(p.numel() for p in parts.model.parameters() if p.requires_grad)}
    print(f"# {machine()}; {a.finetune} {' '.join(a.overrides)}")
    print(f"{'method':10s} {'trainable':>10s} {'params':>8s} {'grads':>8s} {'adamw':>8s} {'activ.':>8s} {'total MiB':>10s}")
    mib = 2 ** 20
    for name, r in rows.items():
        print(f"{name:10s} {r['trainable']:>10,d} {r['parameters'] / mib:8.2f} {r['gradients'] / mib:8.2f} "
              f"{r['optimizer'] / mib:8.2f} {r['activations'] / mib:8.2f} {r['total'] / mib:10.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    summary = {"lowest": min(rows, key=lambda k: rows[k]["total"]), "highest": max(rows, key=lambda k: rows[k]["total"])}
    if "lora" in rows and "ladder" in rows:  # ratio > 1: ladder side tuning needs less than LoRA
        summary["ratio"] = round(rows["lora"]["total"] / rows["ladder"]["total"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
