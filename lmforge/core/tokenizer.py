"""Tokenizer: a thin wrapper around a Hugging Face ``tokenizers.Tokenizer``.

lmforge reads and writes the Hugging Face tokenizer format, so a tokenizer directory is usable by
``transformers.AutoTokenizer`` as it is and any HF ``tokenizer.json`` loads here:

* ``tokenizer.json``        the full tokenizer (model, pre-tokenizer, decoder, added tokens, ...);
* ``tokenizer_config.json`` the roles of the special tokens (``bos_token``, ``eos_token``,
  ``pad_token``, ...), ``chat_template`` and ``model_max_length``.

:meth:`Tokenizer.train` builds a byte-level BPE (GPT-2 style: every byte is in the vocabulary, so any
text encodes and there is no unknown token).  Its default special tokens are ``<|endoftext|>`` (both BOS
and EOS, as in GPT-2) and ``<|pad|>`` (padding, distinct from EOS so that padding never hides a real
end of document).  Training is deterministic: the same corpus and settings give a byte-identical
``tokenizer.json``.

Training a tokenizer from a data spec (files, folders, the built-in world) lives one layer up, in
:func:`lmforge.data.shards.train_tokenizer`, because reading data sources is the data layer's job.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.io import atomic_write_json, atomic_write_text, read_json

MAX_VOCAB = 2**24
"""The largest vocabulary :meth:`Tokenizer.train` accepts: far beyond any real one (256k), far below the ids
HF tokenizers can count."""

DEFAULT_EOS = "<|endoftext|>"
DEFAULT_PAD = "<|pad|>"
DEFAULT_SPECIAL_TOKENS = [DEFAULT_EOS, DEFAULT_PAD]

# Role -> well-known token strings, tried in order when no tokenizer_config.json names the role.
_ROLE_GUESSES: dict[str, tuple[str, ...]] = {
    "bos": ("<|endoftext|>", "<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "[BOS]"),
    "eos": ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]"),
    "pad": ("<|pad|>", "<pad>", "[PAD]", "<|padding|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
}
_ROLES = tuple(_ROLE_GUESSES)


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, or a dict with "content" (AddedToken)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def vocabulary_note(tok: "Tokenizer", flag: str = "--vocab-size") -> str | None:
    """One line when a trained tokenizer came out smaller than asked (BPE stops when no pair of tokens occurs
    ``min_frequency`` times: a small corpus runs out of merges), else None.  Not an error: the tokenizer works,
    it is only smaller; ``flag`` names the setting the user asked with."""
    asked = (tok.trained or {}).get("vocab_size")
    if asked is None or tok.vocab_size >= asked:
        return None
    t = tok.trained
    return (f"vocabulary has {tok.vocab_size} tokens, fewer than the {asked} asked: the training text "
            f"({t['bytes']:,} bytes in {t['documents']:,} documents) has no more pairs to merge that occur at least "
            f"min_frequency={t['min_frequency']} times; give it more text or ask for a smaller {flag}")


class Tokenizer:
    """A tokenizer: encode/decode text, plus the ids of its special tokens.

    Construct with :meth:`train` or :meth:`load`; ``Tokenizer(hf_tokenizer, ...)`` wraps an existing
    ``tokenizers.Tokenizer``.  Role tokens (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``,
    ``mask_token``, ``cls_token``, ``sep_token``) that are not given are guessed from well-known
    spellings present in the vocabulary (``<|endoftext|>``, ``<s>``/``</s>``, ``[PAD]``, ...).
    """

    def __init__(self, hf: HFTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, mask_token: str | None = None,
                 cls_token: str | None = None, sep_token: str | None = None, chat_template: Any = None,
                 model_max_length: int | None = None, guess_roles: bool = True):
        # Truncation/padding stored in a tokenizer.json would silently cut or pad documents; lmforge
        # does its own packing, padding and truncation.
        if hf.truncation is not None:
            hf.no_truncation()
        if hf.padding is not None:
            hf.no_padding()
        self._hf = hf
        given = dict(bos=bos_token, eos=eos_token, pad=pad_token, unk=unk_token, mask=mask_token,
                     cls=cls_token, sep=sep_token)
        self._roles: dict[str, str | None] = {}
        for role in _ROLES:
            tok = given[role]
            if tok is not None and hf.token_to_id(tok) is None:
                raise DataError(f"{role}_token {tok!r} is not in the tokenizer's vocabulary; "
                                f"add it as a special token or name another {role}_token")
            if tok is None and guess_roles:
                tok = next((t for t in _ROLE_GUESSES[role] if hf.token_to_id(t) is not None), None)
            self._roles[role] = tok
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self._fingerprint: str | None = None
        self._adds_bos: bool | None = None
        self.trained: dict[str, int] | None = None
        """What :meth:`train` was asked and given (``vocab_size``, ``documents``, ``bytes``, ``min_frequency``);
        None for a loaded tokenizer."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None,
              min_frequency: int = 2, *, bos_token: str | None = None, eos_token: str | None = None,
              pad_token: str | None = None, chat_template: Any = None,
              model_max_length: int | None = None) -> "Tokenizer":
        """Train a byte-level BPE on ``texts``.

        ``special_tokens`` get the first ids, in order (default ``<|endoftext|>``, ``<|pad|>``).  Roles
        are given by ``bos_token``/``eos_token``/``pad_token`` or guessed from well-known spellings
        (``<|endoftext|>`` is BOS and EOS, ``<|pad|>`` is padding).
        """
        specials = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        if len(set(specials)) != len(specials):
            raise ConfigError(f"special_tokens {specials} contain duplicates; list each token once")
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        minimum = len(alphabet) + len(specials)
        if int(vocab_size) < minimum:
            raise ConfigError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
                              f"{minimum} (256 bytes + {len(specials)} special tokens); use e.g. 4096")
        if int(vocab_size) > MAX_VOCAB:  # HF tokenizers aborts the whole process (a Rust panic) past 2**32
            raise ConfigError(f"vocab_size {vocab_size} is more than a tokenizer can hold (at most {MAX_VOCAB:,}); "
                              f"use e.g. 4096")
        if int(min_frequency) < 1:
            raise ConfigError(f"min_frequency {min_frequency} must be >= 1")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                      special_tokens=specials, initial_alphabet=sorted(alphabet),
                                      show_progress=False)
        seen = [0, 0]  # documents, UTF-8 bytes

        def counted(it: Iterable[str]):
            for text in it:
                if text:
                    seen[0] += 1
                    seen[1] += len(text.encode("utf-8"))
                    yield text

        hf.train_from_iterator(counted(texts), trainer=trainer)
        if seen[0] == 0:
            raise DataError("the tokenizer training text is empty; give it some documents to learn from")
        tok = cls(hf, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                  chat_template=chat_template, model_max_length=model_max_length)
        tok.trained = {"vocab_size": int(vocab_size), "documents": seen[0], "bytes": seen[1],
                       "min_frequency": int(min_frequency)}
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a directory holding ``tokenizer.json`` (+ ``tokenizer_config.json``), or the file itself."""
        path = Path(path)
        if path.is_dir():
            tok_file = path / "tokenizer.json"
            if not tok_file.is_file():
                hint = ""
                if (path / "tokenizer.model").is_file() or (path / "vocab.json").is_file():
                    hint = (" (it has a slow-tokenizer file; convert it once with transformers: "
                            "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
                raise DataError(f"tokenizer directory '{path}' has no tokenizer.json{hint}; "
                                f"pass a directory saved by lmforge or transformers, or train one with "
                                f"'lmforge tokenizer train'")
            cfg_dir = path
        elif path.is_file():
            tok_file, cfg_dir = path, path.parent
        else:
            raise DataError(f"tokenizer path '{path}' does not exist; pass a directory holding tokenizer.json "
                            f"or the tokenizer.json file itself")
        try:
            hf = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"'{tok_file}' is not a Hugging Face tokenizer.json ({first}); pass a file saved "
                            f"by lmforge, tokenizers or transformers") from None

        # tokenizer_config.json next to tokenizer.json (only when it sits next to it under that name).
        config: dict[str, Any] = {}
        if tok_file.name == "tokenizer.json":
            for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later wins
                f = cfg_dir / name
                if f.is_file():
                    data = read_json(f, DataError, "re-save the tokenizer")
                    if not isinstance(data, dict):
                        raise DataError(f"'{f}' must hold a JSON object; re-save the tokenizer")
                    config.update(data)
            jinja = cfg_dir / "chat_template.jinja"
            if config.get("chat_template") is None and jinja.is_file():
                config["chat_template"] = jinja.read_text(encoding="utf-8")
        roles = {f"{r}_token": _token_content(config.get(f"{r}_token")) for r in _ROLES}
        max_len = config.get("model_max_length")
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len > 10**12:
            max_len = None  # transformers writes 1e30-ish sentinels for "no limit"
        try:
            return cls(hf, chat_template=config.get("chat_template"), model_max_length=max_len, **roles)
        except DataError as e:
            raise DataError(f"'{cfg_dir / 'tokenizer_config.json'}': {e}") from None

    # ------------------------------------------------------------------ saving
    def to_json_str(self) -> str:
        """The tokenizer.json text (what :meth:`save` writes)."""
        return self._hf.to_str(pretty=True)

    def save(self, directory: str | os.PathLike, model_max_length: int | None = None) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory`` (atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "tokenizer.json", self.to_json_str())
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for role in _ROLES:
            if self._roles[role] is not None:
                config[f"{role}_token"] = self._roles[role]
        config["add_bos_token"] = False
        config["add_eos_token"] = False
        max_len = model_max_length if model_max_length is not None else self.model_max_length
        if max_len is not None:
            config["model_max_length"] = int(max_len)
        config["clean_up_tokenization_spaces"] = False
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_json(directory / "tokenizer_config.json", config)
        return directory

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``.  ``add_special_tokens=True`` means "whatever the tokenizer.json's own
        post-processor does" (nothing for lmforge's BPE; BOS for a Llama tokenizer, [CLS]/[SEP] for BERT)."""
        return self._hf.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Encode many texts at once on the Rust side (parallel over cores)."""
        if not isinstance(texts, list):
            texts = list(texts)
        fast = getattr(self._hf, "encode_batch_fast", None) or self._hf.encode_batch
        return [e.ids for e in fast(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        seqs = [list(x.tolist() if hasattr(x, "tolist") else x) for x in batch]
        return self._hf.decode_batch(seqs, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._hf.id_to_token(idx)

    def get_vocab(self) -> dict[str, int]:
        return self._hf.get_vocab(with_added_tokens=True)

    # ------------------------------------------------------------------ properties
    @property
    def hf(self) -> HFTokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (an embedding needs at least this many rows)."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    def _id(self, role: str) -> int | None:
        tok = self._roles[role]
        return None if tok is None else self._hf.token_to_id(tok)

    bos_token = property(lambda self: self._roles["bos"])
    eos_token = property(lambda self: self._roles["eos"])
    pad_token = property(lambda self: self._roles["pad"])
    unk_token = property(lambda self: self._roles["unk"])
    mask_token = property(lambda self: self._roles["mask"])
    cls_token = property(lambda self: self._roles["cls"])
    sep_token = property(lambda self: self._roles["sep"])
    bos_id = property(lambda self: self._id("bos"))
    eos_id = property(lambda self: self._id("eos"))
    pad_id = property(lambda self: self._id("pad"))
    unk_id = property(lambda self: self._id("unk"))
    mask_id = property(lambda self: self._id("mask"))
    cls_id = property(lambda self: self._id("cls"))
    sep_id = property(lambda self: self._id("sep"))

    @property
    def special_ids(self) -> list[int]:
        """Ids of all special added tokens (sorted)."""
        return sorted(i for i, t in self._hf.get_added_tokens_decoder().items() if t.special)

    @property
    def adds_bos(self) -> bool:
        """True when the tokenizer's own post-processor puts BOS in front of an encoded text (Llama)."""
        if self._adds_bos is None:
            bos = self.bos_id
            ids = self._hf.encode("a", add_special_tokens=True).ids
            self._adds_bos = bos is not None and len(ids) > 0 and ids[0] == bos and \
                self._hf.encode("a", add_special_tokens=False).ids[:1] != [bos]
        return self._adds_bos

    @property
    def word_prefix(self) -> str:
        """What to put before a text so it encodes as a word *inside* running text: ``" "`` for byte-level
        BPE without ``add_prefix_space`` (``"38"`` and ``" 38"`` are different tokens, and pretraining saw
        the second), ``""`` when the tokenizer marks the first word itself (SentencePiece ``▁``,
        ``add_prefix_space``).  A fine-tuned model that must copy a word from its input into its output
        then copies the very same token ids."""
        bare = self._hf.encode("a", add_special_tokens=False).ids
        first = self._hf.id_to_token(bare[0]) if bare else ""
        if first.startswith(("\u2581", "\u0120")):  # "▁a" / "Ġa": the tokenizer marks the first word itself
            return ""
        return " " if self._hf.encode(" a", add_special_tokens=False).ids != bare else ""

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the canonical tokenizer.json (sorted keys, compact): stable across save/load."""
        if self._fingerprint is None:
            canonical = json.dumps(json.loads(self._hf.to_str()), sort_keys=True, separators=(",", ":"),
                                   ensure_ascii=False)
            self._fingerprint = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._fingerprint

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r}, fingerprint={self.fingerprint[:12]})")
