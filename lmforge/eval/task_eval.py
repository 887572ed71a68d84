"""Task metrics of a fine-tuned model on a split: predictions, then the metrics of the task type.

* classification (heads): loss, accuracy, macro-F1 from the head's argmax;
* token classification: token accuracy over words, entity-level F1 (seqeval-style BIO spans);
* text-to-text: teacher-forced loss, then greedy decoding with the generation engine (T5: encoder once,
  cached decoder; decoders: the prompt, stopping at EOS or a newline) scored by exact match and token F1 —
  and, when the targets are class labels (T5 doing classification), accuracy and macro-F1 too.

Every evaluator returns ``(metrics, predictions)``; the recipe prefixes metric names with the split.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from lmforge.data.examples import batches
from lmforge.eval.generate import GenerationConfig, generate
from lmforge.eval.generate_seq2seq import generate_seq2seq
from lmforge.eval.task_metrics import accuracy, exact_match, macro_f1, seqeval_f1, token_f1
from lmforge.models.families import get_family
from lmforge.objectives.base import IGNORE_INDEX


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def _mean_loss(model: nn.Module, objective: Any, examples: Sequence[Any], batch_size: int) -> float:
    total, count = 0.0, 0
    device = _device(model)
    for batch in batches(examples, objective.collate, batch_size):
        out = objective.loss(model, _to(batch, device))
        total += float(out.loss_sum)
        count += int(out.count)
    return total / max(count, 1)


@torch.no_grad()
def evaluate_classification(model: nn.Module, objective: Any, examples: Sequence[dict[str, Any]],
                            labels: Sequence[str], batch_size: int = 64) -> tuple[dict[str, float], list[str]]:
    device = _device(model)
    total, preds, golds = 0.0, [], []
    for batch in batches(examples, objective.collate, batch_size):
        out = objective.loss(model, _to(batch, device))
        total += float(out.loss_sum)
        mask = batch["attention_mask"].to(device)
        hidden = model.features(batch["input_ids"].to(device), attention_mask=mask,
                                token_type_ids=batch["token_type_ids"].to(device) if "token_type_ids" in batch else None)
        preds += model.classify(hidden, attention_mask=mask).argmax(-1).tolist()
        golds += batch["labels"].tolist()
    pred_names = [labels[i] for i in preds]
    gold_names = [labels[i] for i in golds]
    return ({"loss": total / max(len(golds), 1), "accuracy": accuracy(pred_names, gold_names),
             "macro_f1": macro_f1(pred_names, gold_names, labels)}, pred_names)


@torch.no_grad()
def classification_probs(model: nn.Module, objective: Any, examples: Sequence[dict[str, Any]],
                         batch_size: int = 64) -> torch.Tensor:
    """``[N, num_labels]`` class probabilities (softmax of ``objective.logits``) of encoded examples, in eval mode."""
    device, was_training = _device(model), model.training
    model.eval()
    try:
        out = [torch.softmax(objective.logits(model, _to(b, device)), -1).cpu()
               for b in batches(examples, objective.collate, batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def evaluate_token_classification(model: nn.Module, objective: Any, examples: Sequence[dict[str, Any]],
                                  records: Sequence[dict[str, Any]], labels: Sequence[str], batch_size: int = 64
                                  ) -> tuple[dict[str, float], list[list[str]]]:
    """Word-level predictions (first sub-token's argmax; words cut by truncation are 'O')."""
    device = _device(model)
    total, count, pred_tags = 0.0, 0, []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = _to(objective.collate(list(chunk)), device)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()
        keep = batch["labels"] != IGNORE_INDEX
        total += float(torch.nn.functional.cross_entropy(logits[keep], batch["labels"][keep], reduction="sum"))
        count += int(keep.sum())
        argmax = logits.argmax(-1)
        for i, ex in enumerate(chunk):
            words = argmax[i][keep[i]].tolist()
            n_words = len(records[start + i]["tokens"])
            pred_tags.append([labels[j] for j in words] + ["O"] * (n_words - len(words)))
    gold_tags = [list(r["tags"]) for r in records]
    flat_p = [t for row in pred_tags for t in row]
    flat_g = [t for row in gold_tags for t in row]
    return ({"loss": total / max(count, 1), "accuracy": accuracy(flat_p, flat_g),
             "f1": seqeval_f1(pred_tags, gold_tags)}, pred_tags)


@torch.no_grad()
def evaluate_text2text(model: nn.Module, objective: Any, examples: Sequence[Any], records: Sequence[dict[str, Any]],
                       tokenizer: Any, family: str, max_new_tokens: int, batch_size: int = 64, *,
                       gen_inputs: Sequence[Sequence[int]], labels: Sequence[str] | None = None
                       ) -> tuple[dict[str, float], list[str]]:
    """Teacher-forced loss over ``examples`` + greedy decoding from ``gen_inputs`` (T5: encoder inputs;
    decoders: prompts with room for ``max_new_tokens``); ``records`` carry the gold ``target`` strings;
    ``labels`` (targets that are class names) add accuracy and macro-F1."""
    loss = _mean_loss(model, objective, examples, batch_size)
    # an encoder-decoder's output is the answer alone, ended by EOS; a decoder's continuation stops at a newline
    seq2seq = get_family(family).kind == "encoder-decoder"
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop=[] if seq2seq else ["\n"])
    preds: list[str] = []
    for start in range(0, len(gen_inputs), batch_size):
        chunk = list(gen_inputs[start:start + batch_size])
        run = generate_seq2seq if seq2seq else generate
        results = run(model, chunk, cfg, tokenizer=tokenizer)
        preds += [r.text.strip() for r in results]
    golds = [r["target"] for r in records]
    metrics = {"loss": loss, "exact_match": exact_match(preds, golds), "token_f1": token_f1(preds, golds)}
    if labels is not None:
        metrics["accuracy"] = accuracy(preds, golds)
        metrics["macro_f1"] = macro_f1(preds, golds, list(labels))
    return metrics, preds
