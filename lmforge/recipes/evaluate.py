"""`lmforge eval perplexity` and `lmforge generate`: load a model dir, call the eval layer, report."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from lmforge.core.device import resolve_device
from lmforge.core.errors import ModelError
from lmforge.data.sources import iter_documents
from lmforge.eval.fill_mask import fill_mask
from lmforge.eval.generate import GenerationConfig, generate_text, model_context_length
from lmforge.eval.generate_seq2seq import generate_seq2seq_text
from lmforge.eval.perplexity import perplexity
from lmforge.eval.pseudo_perplexity import pseudo_perplexity
from lmforge.eval.span_eval import span_corruption_loss
from lmforge.models.families import family_of
from lmforge.models.io import load_model
from lmforge.models.model_dir import train_window
from lmforge.models.task import SequenceClassifier, TokenClassifier


def load_for_inference(path: str, device: str = "auto", command: str = "generate"):
    """A model dir (lmforge or HF) -> (model in eval mode on the device, tokenizer); a dir of the wrong kind for
    ``lmforge COMMAND`` (a classifier, an encoder for ``generate``) is one line naming its kind and what fits."""
    dev = resolve_device(device)
    model, tokenizer = load_model(path, device=dev)
    _check_kind(model, path, command)
    if tokenizer is None:
        raise ModelError(f"model directory '{path}' has no tokenizer.json; save the tokenizer next to the model "
                         f"(lmforge writes it automatically)")
    model.eval()
    return model, tokenizer


def _check_kind(model: torch.nn.Module, path: str, command: str) -> None:
    family = family_of(model)
    if isinstance(model, (SequenceClassifier, TokenClassifier)):
        raise ModelError(f"'{path}' is a {family.name if family else ''} {type(model).__name__} (a fine-tuned task "
                         f"model), not a language model; `lmforge {command}` needs a language model dir: pass the "
                         f"model it was fine-tuned from (model= in its run's config.yaml)")
    if command == "generate" and family is not None and family.kind == "encoder":
        raise ModelError(f"'{path}' is a {family.name} encoder (a masked LM), which does not generate text; use "
                         f"`lmforge fill-mask` on it, or `lmforge generate` on a decoder or encoder-decoder model")


EVAL_TXT_SPLIT = "file"
"""Evaluation reads a .txt file as written: one document, newlines kept (``--txt-split`` changes it)."""


def eval_window(args, model: torch.nn.Module) -> tuple[int | None, str]:
    """The window ``eval perplexity`` uses and where it came from: ``--max-length``, else the window the model was
    trained with (recorded in its dir at export), else the model's context (a transformers dir: its positions)."""
    if args.max_length is not None:
        return args.max_length, "--max-length"
    recorded = train_window(args.model)
    if recorded is not None:
        return recorded, "training window"
    return model_context_length(model), "model context"


def run_perplexity(args) -> dict[str, Any]:
    """By the family's pretraining objective.  Causal LMs (gpt2, llama): strided perplexity + bits-per-byte, in
    windows of :func:`eval_window` tokens advancing by ``--stride`` (default half the window).  Masked LMs (bert):
    pseudo-perplexity (each token masked in turn, windows of that length).  Span corruption (t5): span-corruption
    loss on the text, as perplexity of the target tokens.  The result names the window and stride it used."""
    model, tokenizer = load_for_inference(args.model, args.device, "eval perplexity")
    docs = list(iter_documents(args.data, field=args.field, max_docs=args.max_docs, txt_split=args.txt_split))
    objective = family_of(model).pretrain_objective
    window, window_from = eval_window(args, model)
    used = {"window": window, "window_from": window_from, "stride": None}
    with torch.inference_mode():
        if objective == "mlm_nsp":
            window = model.config.max_seq_len if window is None else window
            used["window"] = min(window, model.config.max_seq_len)  # pseudo_perplexity's own cap
            r = pseudo_perplexity(model, tokenizer, docs, max_length=window, batch_size=max(args.batch_size, 32))
            return {"perplexity": r["pseudo_perplexity"], "bits_per_byte": None, "tokens": r["tokens"],
                    "kind": "pseudo-perplexity", **used, **r}
        if objective == "span":
            r = span_corruption_loss(model, tokenizer, docs, max_length=window, batch_size=args.batch_size)
            return {"perplexity": r["perplexity"], "bits_per_byte": None, "tokens": r["tokens"],
                    "kind": "span-corruption", **used, **r}  # r's window: span_eval's default without one
        # half the window: every token past the first window is scored with at least half a window of context
        # (the transformers perplexity guide's habit, and the pipeline's)
        used["stride"] = args.stride if args.stride is not None else (None if window is None else max(1, window // 2))
        result = perplexity(model, tokenizer, docs, max_length=window, stride=used["stride"],
                            batch_size=args.batch_size)
    return {k: result[k] for k in ("perplexity", "bits_per_byte", "tokens")} | used | {
        k: v for k, v in result.items() if k not in ("perplexity", "bits_per_byte", "tokens")}


def run_fill_mask(args) -> list[list[tuple[str, float]]]:
    model, tokenizer = load_for_inference(args.model, args.device, "fill-mask")
    if family_of(model).pretrain_objective != "mlm_nsp":  # fill-mask is the masked LM's own task
        raise ModelError(f"fill-mask needs a masked-LM (bert) model; '{args.model}' is a {model.config.family} model")
    with torch.inference_mode():
        preds = fill_mask(model, tokenizer, args.text, top_k=args.top_k)
    if args.json:
        print(json.dumps({"text": args.text, "predictions": preds}))
    else:
        for i, options in enumerate(preds):
            shown = "  ".join(f"{tok!r} {p:.3f}" for tok, p in options)
            print(f"[MASK] #{i + 1}: {shown}")
    return preds


def run_generate(args) -> list[dict[str, Any]]:
    """Decoders continue the prompt (streamed for a single prompt); t5 maps the input text to an output text."""
    model, tokenizer = load_for_inference(args.model, args.device)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop or [],
                           seed=args.seed)
    seq2seq = getattr(model, "is_encoder_decoder", False)
    stream = len(args.prompt) == 1 and not args.no_stream and not args.json and not seq2seq
    if seq2seq:
        results = generate_seq2seq_text(model, tokenizer, args.prompt, cfg)
    else:
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
            print(r.text if seq2seq else p + r.text)
    return out
