"""Tiny decoder model dirs and conversation files for the SFT tests (built here, nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.core.tokenizer import Tokenizer
from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.io import save_model


def arithmetic_chats(n: int, start: int = 0) -> list[dict]:
    """``What is i plus one?`` -> ``It is i+1.``: a reply a tiny model learns, and learns to end, in a few steps."""
    return [{"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                          {"role": "assistant", "content": f"It is {i + 1}."}]} for i in range(start, start + n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_model_dir(path: Path, family: str = "gpt2", special_tokens: list[str] | None = None,
                   chat_template: str | None = None, ordinary_tokens: list[str] | None = None) -> Path:
    """A random tiny decoder with a byte-level BPE trained on the chats' words, saved as an HF model dir;
    ``ordinary_tokens`` are added to its vocabulary as plain (not special) tokens."""
    texts = [f"What is {i} plus one? It is {i + 1}. Mira lives in Tovel." for i in range(60)]
    tok = Tokenizer.train(texts, vocab_size=300, special_tokens=special_tokens, chat_template=chat_template)
    if ordinary_tokens:
        tok.hf.add_tokens(ordinary_tokens)
    torch.manual_seed(0)
    kw = dict(n_kv_head=2) if family == "llama" else {}
    model = DecoderLM(DecoderConfig(family=family, vocab_size=tok.vocab_size, d_model=64, n_layer=2, n_head=4,
                                    max_seq_len=128, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, **kw))
    save_model(model, path, tokenizer=tok)
    return path
