"""Task heads on pretrained backbones: sequence classification (BERT, GPT-2, Llama) and token
classification (BERT), laid out like transformers' ``*ForSequenceClassification`` /
``*ForTokenClassification`` so :mod:`lmforge.models.hf_task` maps them with prefixes only.

Which vector a sequence classifier reads:

* BERT: the pooler's ``tanh(dense(hidden[:, 0]))`` ([CLS]), then dropout, then ``classifier`` (with bias).
* GPT-2 / Llama: the hidden state of the *last real token* of each row (last position where
  ``attention_mask == 1``), then ``score`` (no bias).  transformers picks "the rightmost token that is not
  ``pad_token_id``" instead; the two agree for right- or left-padded batches as long as the pad id never
  occurs as a real token -- hence :func:`ensure_pad_token`, which gives a decoder a pad token distinct from
  EOS (with pad == EOS transformers would skip a sequence's final EOS and read the token before it).

Heads are initialised as transformers does (weights N(0, initializer_range), zero bias).  A classifier's
``reset_parameters`` resets the head only: the backbone is usually pretrained and resets itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from lmforge.core.errors import ConfigError
from lmforge.core.tokenizer import Tokenizer
from lmforge.models.decoder import DecoderLM
from lmforge.models.families import families, family_of, get_family
from lmforge.models.layers import Linear
from lmforge.models.slots import INPUT

PAD_TOKEN = "<|pad|>"


def normalise_labels(id2label: Mapping[Any, str] | Sequence[str], where: str = "id2label",
                     min_labels: int = 2) -> dict[int, str]:
    """``{0: "neg", 1: "pos"}``, ``{"0": "neg", ...}`` (JSON keys) or ``["neg", "pos"]`` -> ``{int: str}``
    with ids exactly ``0..n-1``, n >= ``min_labels`` and distinct names (so ``label2id`` is its inverse)."""
    if isinstance(id2label, Mapping):
        try:
            out = {int(k): v for k, v in id2label.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"{where} keys {list(id2label)} must be integer class ids 0..n-1") from None
    elif isinstance(id2label, Sequence) and not isinstance(id2label, str):
        out = dict(enumerate(id2label))
    else:
        raise ConfigError(f"{where}={id2label!r} must be a list of label names or a mapping id -> name")
    if sorted(out) != list(range(len(out))):
        raise ConfigError(f"{where} ids {sorted(out)} must be exactly 0..{len(out) - 1}")
    if len(out) < min_labels:
        raise ConfigError(f"{where}={out} has {len(out)} label(s); classification needs at least 2 (a one-output "
                          f"score, such as a reward model, is SequenceClassifier(..., scalar=True))")
    names = [out[i] for i in range(len(out))]
    if not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{where} names {names} must be non-empty strings")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where} names {names} contain duplicates; give each class its own name")
    return {i: out[i] for i in range(len(out))}


def _family(backbone: nn.Module) -> str:
    return getattr(getattr(backbone, "config", None), "family", None) or type(backbone).__name__


class _TaskHead(nn.Module):
    """Shared plumbing: backbone, labels, one Linear head built on the backbone's device and dtype."""

    head_name: str  # transformers' attribute name of the head ("score" or "classifier")
    pools_first_position = False  # BERT sequence classifiers read hidden[:, 0] through the pooler

    def __init__(self, backbone: nn.Module, id2label: Mapping[Any, str] | Sequence[str], head_name: str,
                 bias: bool, dropout: float, min_labels: int = 2) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout={dropout} must be in [0, 1)")
        self.backbone = backbone
        self.family: str = backbone.config.family
        self.id2label = normalise_labels(id2label, min_labels=min_labels)
        self.label2id = {name: i for i, name in self.id2label.items()}
        self.dropout = float(dropout)
        self.head_name = head_name
        c = backbone.config
        # Built on meta like the backbones, then materialised where the backbone lives: a meta backbone
        # gives a meta head (materialise with to_empty + reset_parameters), a real one an initialised head.
        with torch.device("meta"):
            head = Linear(c.d_model, self.num_labels, bias=bias, std=c.initializer_range)
        self.add_module(head_name, head)
        if self.device.type != "meta":
            head.to_empty(device=self.device).to(self.dtype)
            self.reset_parameters()

    @property
    def head(self) -> Linear:
        return getattr(self, self.head_name)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def config(self) -> Any:
        """The backbone's config (``DecoderConfig`` / ``EncoderConfig``)."""
        return self.backbone.config

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.dtype

    def reset_parameters(self) -> None:
        """Re-initialise the head only (N(0, initializer_range) weight, zero bias); the backbone keeps its
        weights -- after a meta build call ``backbone.reset_parameters()`` first, as an eager build does."""
        self.head.reset_parameters()

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids [B, T]`` -> the backbone's hidden states ``[B, T, d]``."""
        if get_family(self.family).kind == "encoder":  # segment ids are an encoder's (BERT's) input
            # BERT's pooler reads position 0 of the full sequence, under prompt tuning the first prompt vector
            # (as transformers + PEFT): the backbone then returns the prompt positions too
            keep = self.pools_first_position and self.backbone.slot(INPUT) is not None
            return self.backbone(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                 **({"keep_prompt": True} if keep else {}))
        if token_type_ids is not None:
            raise ValueError(f"token_type_ids are a BERT input; a {self.family} classifier takes none")
        return self.backbone(input_ids, attention_mask=attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.features(input_ids, attention_mask, token_type_ids)
        if self.pad_is_eos():  # transformers' rule reads the ids (see last_token)
            return self.classify(hidden, attention_mask, input_ids)
        return self.classify(hidden, attention_mask)

    def pad_is_eos(self) -> bool:
        c = self.config
        pad, eos = getattr(c, "pad_token_id", None), getattr(c, "eos_token_id", None)
        return pad is not None and pad == eos

    def extra_repr(self) -> str:
        return f"family={self.family!r}, num_labels={self.num_labels}, dropout={self.dropout:g}"


class SequenceClassifier(_TaskHead):
    """A backbone (``DecoderLM`` or ``EncoderLM``) plus a linear head on one vector per sequence:
    ``forward(input_ids, attention_mask, token_type_ids) -> logits [B, num_labels]``.

    The head is ``classifier`` (Linear with bias, after the pooler and dropout) for BERT and ``score``
    (Linear without bias, on the last real token) for GPT-2 / Llama -- transformers' names, so the
    weights map 1:1.  ``dropout``: BERT's classifier dropout (default ``config.dropout``, i.e.
    transformers' ``hidden_dropout_prob`` when ``classifier_dropout`` is unset); decoders have none.
    """

    def __init__(self, backbone: nn.Module, id2label: Mapping[Any, str] | Sequence[str],
                 dropout: float | None = None, scalar: bool = False) -> None:
        family, fam = _family(backbone), family_of(backbone)
        kind = fam.classifier if fam is not None else None
        if scalar and len(id2label) != 1:
            raise ConfigError(f"a scalar classifier (a score, e.g. a reward model) has one output; got labels "
                              f"{list(id2label.values()) if isinstance(id2label, Mapping) else list(id2label)}")
        if kind == "pooled":
            head, bias = "classifier", True
            dropout = backbone.config.dropout if dropout is None else dropout
        elif kind == "last_token":
            if dropout:
                raise ConfigError(f"dropout={dropout}: a {family} sequence classifier has no classifier dropout "
                                  f"(as in transformers); leave it unset or use the model's own dropout")
            head, bias, dropout = "score", False, 0.0
        elif fam is not None and "sequence_classifier" in fam.why_not:
            raise ConfigError(fam.why_not["sequence_classifier"])
        else:
            able = sorted(f.name for f in families() if f.classifier is not None)
            raise ConfigError(f"sequence classification needs a {', '.join(able[:-1])} or {able[-1]} backbone, "
                              f"got {family!r}")
        super().__init__(backbone, id2label, head, bias, dropout, min_labels=1 if scalar else 2)

    @property
    def scalar(self) -> bool:
        """One output: a score (transformers' num_labels = 1, problem_type regression), not a class."""
        return self.num_labels == 1

    @property
    def pools_first_position(self) -> bool:  # type: ignore[override]
        return get_family(self.family).classifier == "pooled"

    def classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden ``[B, T, d]`` -> logits ``[B, num_labels]`` (``input_ids`` only where pad = EOS)."""
        if self.pools_first_position:
            pooled = self.backbone.pooled(hidden)  # [B, d]
            return self.head(F.dropout(pooled, self.dropout, self.training))
        pad = self.config.pad_token_id if input_ids is not None else None
        return self.head(last_token(hidden, attention_mask, input_ids, pad))


class TokenClassifier(_TaskHead):
    """A BERT backbone plus dropout and ``classifier`` (Linear with bias) on every position:
    ``forward(input_ids, attention_mask, token_type_ids) -> logits [B, T, num_labels]`` (transformers'
    ``BertForTokenClassification``; the backbone's pooler is unused and not exported)."""

    def __init__(self, backbone: nn.Module, id2label: Mapping[Any, str] | Sequence[str],
                 dropout: float | None = None) -> None:
        family, fam = _family(backbone), family_of(backbone)
        if fam is None or not fam.token_classifier:
            raise ConfigError(f"token classification needs an encoder (bert) backbone, got {family!r}: a "
                              f"decoder only sees the left context of each token; use a bert model")
        dropout = backbone.config.dropout if dropout is None else dropout
        super().__init__(backbone, id2label, "classifier", True, dropout)

    def classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden ``[B, T, d]`` -> logits ``[B, T, num_labels]`` (padding positions included: mask the
        loss, not the logits)."""
        return self.head(F.dropout(hidden, self.dropout, self.training))


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor | None, input_ids: torch.Tensor | None = None,
               pad_id: int | None = None) -> torch.Tensor:
    """``[B, T, d]`` -> ``[B, d]``: each row's hidden state at its last position with mask 1 (the last
    position when there is no mask; position 0 for a row without any real token).

    With ``input_ids`` and ``pad_id`` (given when the pad id is also EOS): transformers'
    ``…ForSequenceClassification`` rule instead, the rightmost token that is not ``pad_id`` -- by id a final EOS
    cannot be told from padding then, so the row's last EOS is skipped, and an exported model scores the same."""
    B, T = hidden.shape[:2]
    positions = torch.arange(T, device=hidden.device)  # [T]
    if input_ids is not None and pad_id is not None:
        last = (positions * (input_ids.to(hidden.device) != pad_id)).argmax(-1)
        return hidden[torch.arange(B, device=hidden.device), last]
    if attention_mask is None:
        return hidden[:, -1]
    last = (positions * (attention_mask.to(hidden.device) != 0)).argmax(-1)  # [B]; argmax of 0..T-1 masked
    return hidden[torch.arange(B, device=hidden.device), last]


# ---- vocabulary growth and pad tokens for decoders -------------------------------------------------

def _decoder_of(model: nn.Module, what: str) -> DecoderLM:
    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, DecoderLM):
        raise ConfigError(f"{what} works on decoder models (gpt2, llama), got {type(backbone).__name__} "
                          f"({_family(backbone)})")
    return backbone


def resize_token_embeddings(model: DecoderLM, new_size: int) -> DecoderLM:
    """Grow the decoder's vocabulary to ``new_size`` rows (input embedding and the untied LM head; a tied
    head follows the embedding).  Old rows are kept exactly; each new row is the mean of the old rows (a
    neutral start that keeps the new token's logits and features in the range of the existing ones).
    ``config.vocab_size`` is updated.  New parameter objects replace the old ones: build optimizers after
    this call.  Shrinking is refused (it would invalidate token ids)."""
    model = _decoder_of(model, "resize_token_embeddings")
    old = model.config.vocab_size
    if new_size < old:
        raise ConfigError(f"new vocabulary size {new_size} is smaller than the model's vocab_size={old}; "
                          f"only growing is supported")
    if new_size == old:
        return model

    def grown(weight: torch.Tensor) -> nn.Parameter:  # [old, d] -> [new_size, d]
        with torch.no_grad():
            new = torch.empty(new_size, weight.shape[1], device=weight.device, dtype=weight.dtype)
            new[:old] = weight
            new[old:] = weight.float().mean(0).to(weight.dtype)  # mean in fp32: bf16 sums lose digits
        return nn.Parameter(new, requires_grad=weight.requires_grad)

    model.embed_tokens.weight = grown(model.embed_tokens.weight)
    model.embed_tokens.num_embeddings = new_size
    if not model.config.tie_embeddings:
        model.lm_head.weight = grown(model.lm_head.weight)
    model.lm_head.out_features = new_size
    model.config.vocab_size = new_size
    model.tie_weights()
    return model


def ensure_pad_token(model: DecoderLM | SequenceClassifier, tokenizer: Any) -> int:
    """Give a decoder and its tokenizer a pad token distinct from EOS; returns the pad id.

    A tokenizer without a pad token, or whose pad is its EOS, gets the special token ``<|pad|>`` (added
    in place; it is saved as ``pad_token`` in tokenizer_config.json).  If its id is beyond the model's
    vocabulary, the embedding (and an untied LM head) grow by :func:`resize_token_embeddings`.
    ``config.pad_token_id`` is set (and, for Llama, the embedding's ``padding_idx``, as transformers
    builds it).  Call it before creating the optimizer."""
    decoder = _decoder_of(model, "ensure_pad_token")
    pad = tokenizer.pad_id
    if pad is None or pad == tokenizer.eos_id:
        if tokenizer.token_to_id(PAD_TOKEN) is None:
            hf = HFTokenizer.from_str(tokenizer.hf.to_str())  # a copy: the old object may be shared
            hf.add_special_tokens([AddedToken(PAD_TOKEN, special=True, normalized=False)])
        else:
            hf = tokenizer.hf
        if hf.token_to_id(PAD_TOKEN) == tokenizer.eos_id:
            raise ConfigError(f"the tokenizer's EOS token is {PAD_TOKEN!r}; give it another eos_token")
        new = Tokenizer(hf, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, pad_token=PAD_TOKEN,
                        unk_token=tokenizer.unk_token, mask_token=tokenizer.mask_token,
                        cls_token=tokenizer.cls_token, sep_token=tokenizer.sep_token,
                        chat_template=tokenizer.chat_template, model_max_length=tokenizer.model_max_length)
        # In place: callers keep their tokenizer object (state copied whole, not field by field, so
        # caches such as the fingerprint are the new tokenizer's).
        tokenizer.__dict__.update(new.__dict__)
        pad = tokenizer.pad_id
    if pad >= decoder.config.vocab_size:
        resize_token_embeddings(decoder, max(pad + 1, tokenizer.vocab_size))
    decoder.set_pad_token_id(pad)
    return pad
