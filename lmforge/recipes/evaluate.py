"""`lmforge eval perplexity` and `lmforge generate`: load a model dir, call the eval layer, report."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from lmforge.core.device import resolve_device
from lmforge.core.errors import ModelError


def load_for_inference(path: str, device: str = "auto"):
    """A model dir (lmforge or HF) -> (model in eval mode on the device, tokenizer)."""
    from lmforge.models.hf import load_model

    dev = resolve_device(device)
    model, tokenizer = load_model(path, device=dev)
    if tokenizer is None:
        raise ModelError(f"model directory '{path}' has no tokenizer.json; save the tokenizer next to the model "
                         f"(lmforge writes it automatically)")
    model.eval()
    return model, tokenizer


def run_perplexity(args) -> dict[str, Any]:
    from lmforge.data.sources import iter_documents
    from lmforge.eval.perplexity import perplexity

    model, tokenizer = load_for_inference(args.model, args.device)
    docs = list(iter_documents(args.data, field=args.field, max_docs=args.max_docs))
    with torch.inference_mode():
        result = perplexity(model, tokenizer, docs, max_length=args.max_length, stride=args.stride,
                            batch_size=args.batch_size)
    return {k: result[k] for k in ("perplexity", "bits_per_byte", "tokens")} | {
        k: v for k, v in result.items() if k not in ("perplexity", "bits_per_byte", "tokens")}


def run_generate(args) -> list[dict[str, Any]]:
    from lmforge.eval.generate import GenerationConfig, generate_text

    model, tokenizer = load_for_inference(args.model, args.device)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop or [],
                           seed=args.seed)
    stream = len(args.prompt) == 1 and not args.no_stream and not args.json
    if stream:
        sys.stdout.write(args.prompt[0])
        sys.stdout.flush()
    results = generate_text(model, tokenizer, args.prompt, cfg, stream_to=sys.stdout if stream else None)
    out = [{"prompt": p, "completion": r.text, "finish_reason": r.finish_reason, "tokens": len(r.tokens)}
           for p, r in zip(args.prompt, results)]
    if stream:
        sys.stdout.write("\n")
    elif args.json:
        print(json.dumps({"results": out}))
    else:
        for p, r in zip(args.prompt, results):
            print(p + r.text)
    return out
