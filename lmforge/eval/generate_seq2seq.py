"""Generation for encoder-decoder models (T5): the encoder runs once, the decoder step by step with a KV cache.

Same configuration, sampling, stop strings and results as the decoder-only engine in
:mod:`lmforge.eval.generate` (whose logits processors, stop checker and result type are reused)::

    results = generate_seq2seq(model, [[37, 8, 1], [5, 1]], GenerationConfig(max_new_tokens=32))
    results = generate_seq2seq_text(model, tokenizer, ["translate: ..."], GenerationConfig(temperature=0.7))

How it works.  Inputs of different lengths are right-padded into one ``[B, S]`` batch with an attention mask
(T5's relative positions make padding side irrelevant) and encoded once.  Every row's decoder starts from
``config.decoder_start_token_id`` (the pad id for T5), so decoder inputs are never padded: one token per row
per step, its self-attention keys/values appended to a static cache, the cross-attention keys/values
computed from the encoder output at the first step and reused.  Rows that finished keep feeding ``pad_id``
(their tokens are dropped); the loop stops when every row has finished.

``prompt_tokens`` of a result is the length of its encoder input.  Repetition penalty counts the decoder's
own tokens (start token included), as transformers does for encoder-decoder models.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.eval.sampling import (GenerationConfig, GenerationResult, StopChecker, choose_next, collect_results,
                                   text_decoder)

__all__ = ["generate_seq2seq", "generate_seq2seq_text"]


@torch.inference_mode()
def generate_seq2seq(model: nn.Module, inputs: Sequence[Sequence[int]], cfg: GenerationConfig | None = None, *,
                     pad_id: int | None = None, stream: Callable[[int, int], None] | None = None,
                     tokenizer: Any = None) -> list[GenerationResult]:
    """Generate a target for each encoder input (token ids, any lengths) with an encoder-decoder ``model``
    (``encode``, ``decode``, ``logits``, ``new_cache``, ``config.start_token_id``).

    ``pad_id`` pads encoder inputs and the tails of finished rows (default: the model's pad id).  EOS defaults
    to ``cfg.eos_token_id``, then the tokenizer's EOS, then the model's.  ``stream(row, token)`` and
    ``tokenizer`` work as in :func:`lmforge.eval.generate.generate`.  The model's training flag is restored.
    """
    cfg = cfg or GenerationConfig()
    if not inputs:
        return []
    if cfg.stop and tokenizer is None:
        raise ConfigError("generation stop strings need a tokenizer to decode with; pass tokenizer=...")
    mcfg = model.config
    eos_ids = cfg.eos_ids()
    if cfg.eos_token_id is None:
        eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
        eos_ids = [int(eos if eos is not None else mcfg.eos_token_id)]
    if cfg.ignore_eos:
        eos_ids = []
    pad_id = int(mcfg.pad_token_id if pad_id is None else pad_id)
    inputs = [list(map(int, x)) for x in inputs]
    for i, x in enumerate(inputs):
        if not x:
            raise ConfigError(f"input {i} is empty: an encoder-decoder model needs at least one input token (e.g. EOS)")
    lens = [len(x) for x in inputs]
    if cfg.max_new_tokens == 0:
        text = "" if tokenizer is not None else None
        return [GenerationResult([], [], [], "length", text, n) for n in lens]
    was_training = model.training
    model.eval()
    try:
        return _run(model, inputs, lens, cfg, eos_ids, pad_id, stream, tokenizer)
    finally:
        model.train(was_training)


def _run(model, inputs, lens, cfg, eos_ids, pad_id, stream, tokenizer) -> list[GenerationResult]:
    B, S, N = len(inputs), max(lens), cfg.max_new_tokens
    device = next(model.parameters()).device
    ids = torch.tensor([x + [pad_id] * (S - n) for x, n in zip(inputs, lens)], dtype=torch.long, device=device)
    mask = None
    if any(n != S for n in lens):
        mask = (torch.arange(S)[None, :] < torch.tensor(lens)[:, None]).long().to(device)
    enc = model.encode(ids, mask)  # [B, S, d], once
    cache = model.new_cache(B, N, device=device)
    gen = None
    if cfg.seed is not None and not cfg.greedy:
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg.seed)
    tok = torch.full((B,), model.config.start_token_id, dtype=torch.long, device=device)
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.lm_head.out_features, dtype=torch.bool, device=device)
        seen.scatter_(1, tok[:, None], True)
    eos_t = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
    out_tok = torch.full((B, N), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros(B, N, device=device)
    out_raw = torch.zeros(B, N, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    eos_hit = torch.zeros(B, dtype=torch.bool, device=device)
    n_new = torch.full((B,), N, dtype=torch.long, device=device)
    stop = StopChecker(cfg.stop, text_decoder(tokenizer)) if cfg.stop else None
    stopped, done = set(), set()
    lists: list[list[int]] = [[] for _ in range(B)]
    for t in range(N):
        hidden = model.decode(tok[:, None], enc, mask, cache=cache)  # [B, 1, d]
        logits = model.logits(hidden[:, -1]).float()  # [B, V]
        ban = eos_t if t < cfg.min_new_tokens else None  # None when there is no EOS
        tok, lp, raw = choose_next(logits, cfg, seen, ban, gen)
        tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
        out_tok[:, t], out_lp[:, t], out_raw[:, t] = tok, lp, raw
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        just = ~finished & torch.isin(tok, eos_t) if eos_t is not None else torch.zeros_like(finished)
        eos_hit |= just
        n_new = torch.where(just, t + 1, n_new)
        finished |= just
        if stop is not None or stream is not None:
            row_toks, just_l = tok.tolist(), just.tolist()
            for i in range(B):
                if i in done:
                    continue
                lists[i].append(row_toks[i])
                if stream is not None:
                    stream(i, row_toks[i])
                if just_l[i]:
                    done.add(i)
                elif stop is not None and stop.found(lists[i]):
                    done.add(i)
                    stopped.add(i)
                    finished[i] = True
                    n_new[i] = t + 1
        if (eos_t is not None or stop is not None) and bool(finished.all()):
            break
    return collect_results(out_tok, out_lp, out_raw, n_new, eos_hit, stopped, lens, tokenizer, stop)



def generate_seq2seq_text(model: nn.Module, tokenizer: Any, texts: Sequence[str] | str,
                          cfg: GenerationConfig | None = None) -> list[GenerationResult]:
    """Encode ``texts`` (EOS appended when the tokenizer does not add it, as T5 inputs end with EOS), generate,
    and fill each result's ``text``."""
    if isinstance(texts, str):
        texts = [texts]
    eos = getattr(tokenizer, "eos_id", None)
    ids = []
    for t in texts:
        x = list(tokenizer.encode(t))
        if eos is not None and (not x or x[-1] != eos):
            x.append(int(eos))
        ids.append(x)
    return generate_seq2seq(model, ids, cfg, tokenizer=tokenizer)
