"""T5 tokenizers: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 and the span-corruption sentinels on the last ids.

Sentinel ``i`` (``<extra_id_i>``) has id ``vocab_size - 1 - i``.  lmforge's BPE trainer puts special tokens at the
*first* ids, so sentinels cannot come from it directly.  :func:`train_t5_tokenizer` trains with ``<pad>`` (0),
``</s>`` (1), ``<unk>`` (2) and then appends the sentinels as special tokens in reverse order with
:func:`add_sentinels`, so ``<extra_id_i>`` lands on ``vocab_size - 1 - i``.  The corruption itself is an
objective (``objectives/span.py``); this module is about the tokenizer only.
"""

from __future__ import annotations

from typing import Any, Iterable

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.tokenizer import Tokenizer

T5_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 (T5's convention)


def sentinel_token(i: int) -> str:
    return f"<extra_id_{i}>"


def t5_special_tokens() -> list[str]:
    """Special tokens to train with so that pad = 0, EOS = 1, unk = 2; sentinels are appended afterwards by
    :func:`add_sentinels` (the trainer can only place special tokens at the first ids)."""
    return list(T5_SPECIAL_TOKENS)


def add_sentinels(tokenizer: Any, n: int = 100) -> Any:
    """A copy of ``tokenizer`` with ``<extra_id_{n-1}> ... <extra_id_0>`` appended as special tokens, so that
    ``<extra_id_i>`` has id ``vocab_size - 1 - i`` of the new vocabulary."""
    present = [sentinel_token(i) for i in range(n) if tokenizer.token_to_id(sentinel_token(i)) is not None]
    if present:
        raise DataError(f"the tokenizer already has sentinel token {present[0]}; use it as it is")
    hf = HFTokenizer.from_str(tokenizer.hf.to_str())
    hf.add_special_tokens([AddedToken(sentinel_token(i), special=True, normalized=False)
                           for i in reversed(range(n))])
    return Tokenizer(hf, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
                     unk_token=tokenizer.unk_token, mask_token=tokenizer.mask_token, cls_token=tokenizer.cls_token,
                     sep_token=tokenizer.sep_token, chat_template=tokenizer.chat_template,
                     model_max_length=tokenizer.model_max_length)


def train_t5_tokenizer(texts: Iterable[str], vocab_size: int, n_sentinels: int = 100, min_frequency: int = 2) -> Any:
    """Byte-level BPE with T5's ids: ``<pad>`` 0, ``</s>`` 1 (EOS), ``<unk>`` 2, and ``n_sentinels`` sentinels
    on the last ids; ``vocab_size`` counts them all."""
    if vocab_size - n_sentinels < 256 + len(T5_SPECIAL_TOKENS):
        raise ConfigError(f"vocab_size {vocab_size} is too small for a byte-level BPE with {n_sentinels} sentinels "
                          f"(needs at least {256 + len(T5_SPECIAL_TOKENS) + n_sentinels}); use e.g. 4096")
    base = Tokenizer.train(texts, vocab_size - n_sentinels, special_tokens=t5_special_tokens(),
                           min_frequency=min_frequency, eos_token="</s>", pad_token="<pad>")
    return add_sentinels(base, n_sentinels)


def check_sentinels(tokenizer: Any, n: int) -> None:
    """``DataError`` unless ``<extra_id_i>`` sits at ``vocab_size - 1 - i`` for ``i < n`` and EOS exists."""
    V = tokenizer.vocab_size
    for i in range(n):
        if tokenizer.id_to_token(V - 1 - i) != sentinel_token(i):
            raise DataError(
                f"the tokenizer has no sentinel {sentinel_token(i)} at id vocab_size-1-{i} = {V - 1 - i} (found "
                f"{tokenizer.id_to_token(V - 1 - i)!r}); span corruption needs special tokens <extra_id_0>... on the "
                f"last ids: train one with lmforge.data.span.train_t5_tokenizer or add them with add_sentinels")
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer has no EOS token (e.g. '</s>'); span corruption ends inputs and targets "
                        "with EOS: train one with lmforge.data.span.train_t5_tokenizer")
