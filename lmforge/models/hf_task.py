"""Hugging Face directories for task heads: ``{GPT2,Llama,Qwen2,Mistral,Bert}ForSequenceClassification``
and ``BertForTokenClassification``.

A task checkpoint is the backbone's checkpoint (its family's key map, reused here) with the LM heads left out
and one head added; the layout follows the family's ``classifier`` (``last_token``: decoders, ``pooled``: BERT)::

    GPT-2 / Llama    transformer.* | model.*  + score.weight            (no lm_head.weight)
    BERT sequence    bert.* (pooler included) + classifier.{weight,bias}  (no cls.*)
    BERT token       bert.* (no pooler)       + classifier.{weight,bias}

``config.json`` is the backbone's plus ``architectures``, ``id2label`` (string keys, as JSON has them),
``label2id``, ``problem_type`` (sequence classification) and BERT's ``classifier_dropout``; transformers
derives ``num_labels`` from ``id2label``.  Loading, backbone weights the classifier never uses (lm_head,
BERT's MLM/NSP heads) may be absent and are initialised silently; a missing classifier head (or, for BERT
sequence classification, pooler) is a ``ModelError``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.core.errors import ConfigError, ModelError
from lmforge.models.families import families, family_for_hf_config, family_of
from lmforge.models.model_dir import (cast_state, load_tokenizer_for, read_json, read_weights, require_model_dir,
                                      unwrap_model, write_model_dir)
from lmforge.models.task import SequenceClassifier, TokenClassifier, normalise_labels

TASKS = {"ForSequenceClassification": "sequence_classification", "ForTokenClassification": "token_classification"}


def task_of_config(hf_config: dict[str, Any]) -> str | None:
    """"sequence_classification" / "token_classification" from a config dict's ``architectures``, else None."""
    for arch in hf_config.get("architectures") or []:
        for suffix, task in TASKS.items():
            if isinstance(arch, str) and arch.endswith(suffix):
                return task
    return None


def is_task_dir(path: str | Path) -> str | None:
    """The task of a model directory (see :func:`task_of_config`); None for LMs and non-model paths."""
    f = Path(path) / "config.json"
    return task_of_config(read_json(f)) if f.is_file() else None


# ---- saving --------------------------------------------------------------------------------------

def _task_state_and_config(model: SequenceClassifier | TokenClassifier) -> tuple[dict[str, torch.Tensor],
                                                                                   dict[str, Any]]:
    """HF key -> tensor and the config.json dict (without dtype) of a classifier."""
    backbone, config = model.backbone, model.config
    token = isinstance(model, TokenClassifier)
    family = family_of(backbone)
    state, hf_config = family.state_dict_to_hf(backbone), family.config_to_hf(config)
    if family.classifier == "pooled":  # BERT's layout
        keep = ("bert.embeddings.", "bert.encoder.") if token else ("bert.",)  # no cls.*; no pooler for tokens
        state = {k: v for k, v in state.items() if k.startswith(keep)}
        # transformers reads classifier_dropout, falling back to hidden_dropout_prob when it is null
        hf_config["classifier_dropout"] = None if model.dropout == config.dropout else model.dropout
    else:
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    for param, value in model.head.named_parameters():
        state[f"{model.head_name}.{param}"] = value
    suffix = "ForTokenClassification" if token else "ForSequenceClassification"
    hf_config["architectures"] = [family.model_types[hf_config["model_type"]] + suffix]
    hf_config["id2label"] = {str(i): name for i, name in model.id2label.items()}
    hf_config["label2id"] = dict(model.label2id)
    if not token:
        # one output: a score (a reward model), which transformers treats as regression
        hf_config["problem_type"] = "regression" if model.scalar else "single_label_classification"
    return state, hf_config


def save_task_model(model: nn.Module, path: str | Path, tokenizer: Any = None) -> Path:
    """Write a :class:`SequenceClassifier` / :class:`TokenClassifier` as a HF checkpoint directory
    (atomically) that transformers' ``AutoModelFor{Sequence,Token}Classification`` loads with no missing
    or unexpected key; the tokenizer's files too when given."""
    model = unwrap_model(model)
    if not isinstance(model, (SequenceClassifier, TokenClassifier)):
        raise ModelError(f"save_task_model expects a SequenceClassifier or TokenClassifier, got "
                         f"{type(model).__name__}")
    config = model.config
    if family_of(model).needs_pad_token and config.pad_token_id is None:
        warnings.warn("saving a decoder classifier without pad_token_id: transformers' "
                      "*ForSequenceClassification then refuses batches of more than one row; call "
                      "ensure_pad_token(model, tokenizer) before saving", stacklevel=2)
    state, hf_config = _task_state_and_config(model)
    max_len = (tokenizer.model_max_length or config.max_seq_len) if tokenizer is not None else None
    return write_model_dir(path, state, hf_config, model.dtype, tokenizer=tokenizer,
                                      vocab_size=config.vocab_size, model_max_length=max_len)


# ---- loading -------------------------------------------------------------------------------------

def _labels(hf_config: dict[str, Any], rows: int, where: str) -> dict[int, str]:
    """id2label from config.json; without one, transformers' ``LABEL_i`` names for the head's rows.  One row is a
    score (a reward model)."""
    raw = hf_config.get("id2label")
    if not raw:
        raw = [f"LABEL_{i}" for i in range(rows)]
    try:
        labels = normalise_labels(raw, where=f"{where}: field 'id2label'", min_labels=1 if rows == 1 else 2)
    except ConfigError as e:
        raise ModelError(str(e)) from None
    if len(labels) != rows:
        raise ModelError(f"{where}: field 'id2label' names {len(labels)} labels but the classifier head has "
                         f"{rows} rows; fix id2label to list one name per class")
    return labels


def _materialise_missing(backbone: nn.Module, device: torch.device | str, dtype: torch.dtype,
                         where: str) -> None:
    """Initialise the backbone's top-level modules the checkpoint had no weights for (still on meta after
    loading): LM heads the classifier never uses.  A module with only some of its own weights loaded
    would lose them, so that is refused."""
    for name, child in backbone.named_children():
        params = dict(child.named_parameters())
        if not any(p.is_meta for p in params.values()):
            continue
        elsewhere = {id(p) for n, c in backbone.named_children() if n != name for p in c.parameters()}
        loaded = [n for n, p in params.items() if not p.is_meta and id(p) not in elsewhere]  # tied ones aside
        if loaded:
            missing = [n for n, p in params.items() if p.is_meta]
            raise ModelError(f"'{where}' has only part of '{name}' (missing {', '.join(missing[:4])}); "
                             f"pass a complete checkpoint")
        # Only the meta parameters get storage: ``to_empty`` would also re-allocate a weight tied to a
        # loaded one (BERT's MLM decoder = the word embedding) in place, through ``param.data``.
        for module in child.modules():
            for pname, p in list(module.named_parameters(recurse=False)):
                if p.is_meta:
                    setattr(module, pname, nn.Parameter(torch.empty_like(p, device=device, dtype=dtype),
                                                        requires_grad=p.requires_grad))
        backbone.tie_weights()
        child.reset_parameters()


def load_task_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32
                    ) -> tuple[SequenceClassifier | TokenClassifier, Any]:
    """A sequence/token classification directory (lmforge's or transformers' ``save_pretrained``) ->
    ``(classifier in eval mode, Tokenizer or None)``.  ``dtype=None`` keeps the stored dtype."""
    d = Path(path)
    hf_config = require_model_dir(d)
    where = f"config.json of '{d}'"
    task = task_of_config(hf_config)
    model_type = hf_config.get("model_type")
    if task is None:
        raise ModelError(f"{where}: architectures {hf_config.get('architectures')} name no "
                         f"*ForSequenceClassification / *ForTokenClassification model; load it with load_model")
    # None for a model_type no family loads: refused when its config is read, below, after the checks of the files
    family = next((f for f in families() if model_type in f.model_types), None)
    if family is not None and family.classifier is None:
        why = family.why_not.get("classifier_dir", f"model family '{family.name}' has no classification head")
        raise ModelError(f"{where}: {why}")
    if task == "token_classification" and not (family is not None and family.token_classifier):
        raise ModelError(f"{where}: token classification needs an encoder (bert), got model_type "
                         f"{model_type!r}; use a BertForTokenClassification checkpoint")
    problem = hf_config.get("problem_type")
    one_output = len(hf_config.get("id2label") or {}) == 1 or hf_config.get("num_labels") == 1
    if problem not in (None, "single_label_classification") and not (problem == "regression" and one_output):
        raise ModelError(f"{where}: field 'problem_type' = {problem!r} is not supported (supported: "
                         f"'single_label_classification', and 'regression' for a one-output score such as a "
                         f"reward model)")
    weights = read_weights(d)
    pooled = family is not None and family.classifier == "pooled"  # BERT's layout
    head_name = "classifier" if pooled else "score"
    head = {k.partition(".")[2]: weights.pop(k) for k in list(weights) if k.startswith(head_name + ".")}
    cls = TokenClassifier if task == "token_classification" else SequenceClassifier
    if "weight" not in head:
        raise ModelError(f"'{d}' has no '{head_name}.weight': it is not a fine-tuned {task} checkpoint (a "
                         f"pretrained LM has no classifier head); build a {cls.__name__} on the LM instead")
    if set(head) != ({"weight", "bias"} if pooled else {"weight"}):
        raise ModelError(f"'{d}': classifier head weights {sorted(head_name + '.' + k for k in head)} do not "
                         f"match transformers' {head_name} layer ({'weight and bias' if pooled else 'weight only'})")
    labels = _labels(hf_config, head["weight"].shape[0], where)

    family = family or family_for_hf_config(hf_config, source=str(d))
    config = family.config_from_hf(hf_config, str(d))
    if pooled:
        state = family.state_dict_from_hf(weights, config, str(d))
        with torch.device("meta"):
            backbone = family.model_class(config)
        if task == "sequence_classification" and any(k.startswith("pooler.") and k not in state
                                                     for k in backbone.state_dict()):
            raise ModelError(f"'{d}' has no pooler weights (bert.pooler.*), which BERT sequence classification "
                             f"reads; pass a complete BertForSequenceClassification checkpoint")
        drop = hf_config.get("classifier_dropout")
    else:
        if not config.tie_embeddings and "lm_head.weight" not in weights:
            # The backbone loader requires every weight of a causal LM; a classifier checkpoint has no LM
            # head, so a meta stand-in passes its checks and is dropped again (initialised below).
            weights["lm_head.weight"] = torch.empty(config.vocab_size, config.d_model, device="meta")
        state = family.state_dict_from_hf(weights, config, str(d))
        if "lm_head.weight" in state and state["lm_head.weight"].is_meta:
            del state["lm_head.weight"]
        with torch.device("meta"):
            backbone = family.model_class(config)
        drop = None
    tokenizer = load_tokenizer_for(d, config.vocab_size)
    try:
        kwargs = {"scalar": True} if len(labels) == 1 and cls is SequenceClassifier else {}
        model = cls(backbone, labels, dropout=drop, **kwargs)
    except ConfigError as e:
        raise ModelError(f"{where}: {e}") from None
    full = {**{f"backbone.{k}": v for k, v in state.items()}, **{f"{head_name}.{k}": v for k, v in head.items()}}
    full = cast_state(full, device, dtype)
    model.load_state_dict(full, strict=False, assign=True)
    backbone.tie_weights()
    _materialise_missing(backbone, device, dtype or model.head.weight.dtype, str(d))
    still = [n for n, p in model.named_parameters() if p.is_meta]
    if still:  # a loader check above missed something; never hand out meta weights
        raise ModelError(f"'{d}' has no weights for {', '.join(still[:4])}; pass a complete checkpoint")
    return model.eval(), tokenizer
