"""The generation engine: batched, KV-cached decoding with sampling, stop strings and log-probs.

One engine serves ``lmforge generate``, RL rollouts (PPO/GRPO) and serving::

    results = generate(model, [[1, 2, 3], [4, 5]], GenerationConfig(max_new_tokens=32), pad_id=0)
    results[0].tokens, results[0].logprobs, results[0].raw_logprobs, results[0].finish_reason

    results = generate_text(model, tokenizer, ["Once upon a time"], GenerationConfig(temperature=0.8))
    results[0].text

How it works.  Prompts of different lengths are left-padded into one ``[B, P]`` batch and run through the
model in a single prefill forward that fills a static :class:`~lmforge.models.cache.KVCache` preallocated
to ``P + max_new_tokens`` positions.  Then every step feeds one token per row.  The attention mask is
preallocated once at full length and sliced per step; position ids come from the mask (left padding does
not shift a row's positions) and are advanced in place.  Rows that have finished keep emitting ``pad_id``
(masked out when the batch carries a mask; rows never attend to each other, so a finished row cannot
disturb the others either way) and the loop stops as soon as every row has finished.  Only the last
position's logits are ever computed (on CPU through :func:`lmforge.models.layers.few_rows_linear`, like every
projection of a decoding step).  Per step the Python work is a handful of tensor ops over the whole batch and at
most one host sync (the "all finished?" test, only when EOS or stop strings can finish a row); the only
per-row Python work is the stop-string check (only when stop strings are given) and the streaming
callback (only when one is given).

Inside a training loop (RL rollouts).  ``num_samples=G`` draws G completions of every prompt from one prefill:
the prompts are run once, then the KV cache, masks and last hidden state are repeated G times per row
(prompt-major: result ``i * G + j`` is sample ``j`` of prompt ``i``).  ``generator`` supplies the sampling
randomness (e.g. from :class:`~lmforge.eval.sampling.SamplingRNG`, whose state a checkpoint keeps), and
``grad_mode="no_grad"`` runs the engine under ``torch.no_grad`` instead of ``torch.inference_mode`` -- for a model
whose parameters a training step will use next (FSDP's gathered parameters must not become inference tensors).
The trainer's :meth:`~lmforge.train.trainer.Trainer.generate` does both, on a DDP module's inner model or an FSDP2
model with every unit gathered once for the whole call.

What both engines share -- the configuration, the result, the logits processors, the token choice, stop strings
and result assembly -- lives in :mod:`lmforge.eval.sampling`.
"""

from __future__ import annotations

from typing import IO, Any, Callable, Sequence

import torch
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.eval.sampling import (GenerationConfig, GenerationResult, StopChecker, apply_repetition_penalty,
                                   apply_top_k, apply_top_p, choose_next, collect_results, process_logits,
                                   text_decoder)
from lmforge.models.slots import INPUT, PAST_KV

__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "generate",
    "generate_text",
    "process_logits",
    "choose_next",
    "apply_repetition_penalty",
    "apply_top_k",
    "apply_top_p",
]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_context_length(model: nn.Module) -> int | None:
    """Positions a decoder can take: its config's maximum, less the positions a soft prompt or prefix occupies in
    front of the tokens (its ``input`` and ``past_kv`` slots, :mod:`lmforge.models.slots`); None when the config
    names no maximum."""
    cfg = getattr(model, "config", None)
    for name in ("max_seq_len", "max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            taken = [model.slot(kind) for kind in (INPUT, PAST_KV)] if hasattr(model, "slot_kinds") else []
            return value - sum(t.n for t in taken if t is not None)
    return None




# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


GRAD_MODES = {"inference": torch.inference_mode, "no_grad": torch.no_grad}


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig | None = None,
    *,
    pad_id: int | None = None,
    stream: Callable[[int, int], None] | None = None,
    tokenizer: Any = None,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    grad_mode: str = "inference",
) -> list[GenerationResult]:
    """Generate continuations of a batch of token-id prompts (of any lengths) with ``model``.

    ``model`` is a decoder with the lmforge interface (``forward(input_ids, attention_mask, position_ids,
    cache) -> hidden``, ``logits(hidden)``, ``new_cache(batch, max_len)``).  ``pad_id`` fills left padding
    and the tail of finished rows (default: the tokenizer's pad, then EOS, then 0; it is always masked, so
    any id works).  ``stream(row, token)`` is called for every new token of every unfinished row, in
    order.  ``tokenizer`` (anything with ``decode(ids) -> str``) is needed for stop strings and fills
    ``text``; its EOS is the default ``eos_token_id``.  ``num_samples`` completions of each prompt share one
    prefill (results prompt-major); ``generator`` (a ``torch.Generator`` on the model's device) replaces
    ``cfg.seed`` as the source of sampling randomness.  Runs under ``torch.inference_mode()`` (``grad_mode=
    "no_grad"``: ``torch.no_grad()``) with the model in eval mode (its training flag is restored afterwards).
    """
    cfg = cfg or GenerationConfig()
    if grad_mode not in GRAD_MODES:
        raise ConfigError(f"generation grad_mode={grad_mode!r} is not one of {sorted(GRAD_MODES)}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"generation num_samples={num_samples!r} must be a whole number >= 1")
    if not prompts:
        return []
    if cfg.stop and tokenizer is None:
        raise ConfigError("generation stop strings need a tokenizer to decode with; pass tokenizer=...")
    eos_ids = cfg.eos_ids()
    if cfg.eos_token_id is None and tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
        eos_ids = [int(tokenizer.eos_id)]
    if cfg.ignore_eos:
        eos_ids = []
    if pad_id is None:
        pad_id = 0
        if tokenizer is not None:
            for name in ("pad_id", "eos_id"):
                if getattr(tokenizer, name, None) is not None:
                    pad_id = int(getattr(tokenizer, name))
                    break
    prompts = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError(f"prompt {i} is empty: generation needs at least one prompt token (e.g. BOS)")

    B = len(prompts)
    lens = [len(p) for p in prompts]
    P = max(lens)
    N = cfg.max_new_tokens
    total = P + N
    max_len = model_context_length(model)
    if max_len is not None and total > max_len:
        raise ConfigError(
            f"prompt length {P} + max_new_tokens {N} = {total} exceeds the model's context of {max_len} "
            f"positions; shorten the prompt or lower max_new_tokens"
        )
    G = num_samples
    if N == 0:
        text = "" if tokenizer is not None else None
        return [GenerationResult([], [], [], "length", text, lens[i // G]) for i in range(B * G)]

    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with GRAD_MODES[grad_mode]():
            return _generate(model, prompts, lens, P, N, cfg, eos_ids, pad_id, stream, tokenizer, device, G,
                             generator)
    finally:
        model.train(was_training)


def _generate(model, prompts, lens, P, N, cfg, eos_ids, pad_id, stream, tokenizer, device, G, generator):
    total = P + N
    padded = any(n != P for n in lens)

    # --- inputs, built once on the host and moved in one copy each ----------------------------------
    ids = torch.tensor([[pad_id] * (P - n) + p for p, n in zip(prompts, lens)], dtype=torch.long)
    # Bool (True = real token): what the model's attention wants, so no per-step conversion.
    mask = torch.ones(len(prompts), total, dtype=torch.bool)
    if padded:
        for i, n in enumerate(lens):
            mask[i, : P - n] = False
    pos = (mask[:, :P].long().cumsum(-1) - 1).clamp_(min=0)
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)

    has_eos = bool(eos_ids)
    track_finish = has_eos or bool(cfg.stop)
    eos_t = torch.tensor(eos_ids, dtype=torch.long, device=device) if has_eos else None
    # Without padding no mask is passed (causal only: SDPA's fastest path).  A finished row computes
    # on, feeding pad, but rows never see each other, so its garbage reaches no other row (and is dropped).
    use_mask = padded

    cache = model.new_cache(len(prompts), total, device=device)
    gen = generator
    if gen is None and cfg.seed is not None and not cfg.greedy:
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg.seed)

    # --- prefill: each prompt once, then its G samples share the cache it filled ---------------------
    hidden = model(ids, attention_mask=mask[:, :P] if use_mask else None, position_ids=pos, cache=cache)[:, -1:, :]
    if G > 1:
        rows = torch.arange(len(prompts), device=device).repeat_interleave(G)
        cache.reorder(rows)
        ids, mask, pos, hidden = ids[rows], mask[rows], pos[rows], hidden[rows]
        lens = [n for n in lens for _ in range(G)]
    B = len(lens)

    seen = None
    if cfg.repetition_penalty != 1.0:
        # Tokens present in each prompt (padding excluded); updated with every generated token.
        seen = torch.zeros(B, _vocab_size(model), dtype=torch.bool, device=device)
        src = torch.where(mask[:, :P].bool(), ids, torch.full_like(ids, -1))
        for i, n in enumerate(lens):  # once per call, not per token
            seen[i, src[i, P - n:]] = True

    out_tok = torch.full((B, N), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros(B, N, dtype=torch.float32, device=device)
    out_raw = torch.zeros(B, N, dtype=torch.float32, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    n_new = torch.full((B,), N, dtype=torch.long, device=device)  # tokens kept per row
    eos_hit = torch.zeros(B, dtype=torch.bool, device=device)
    pad_t = torch.tensor(pad_id, dtype=torch.long, device=device)

    stop = StopChecker(cfg.stop, text_decoder(tokenizer)) if cfg.stop else None
    stopped: set[int] = set()
    done: set[int] = set()  # rows finished (host side; kept only when stop strings or streaming need it)
    need_lists = stop is not None or stream is not None
    gen_lists: list[list[int]] = [[] for _ in range(B)]

    step_pos = pos[:, -1:] + 1
    for t in range(N):
        logits = model.logits(hidden[:, -1:, :])[:, 0, :].float()
        ban = eos_t if has_eos and t < cfg.min_new_tokens else None
        tok, lp, raw = choose_next(logits, cfg, seen, ban, gen)
        if track_finish:
            tok = torch.where(finished, pad_t, tok)
        out_tok[:, t] = tok
        out_lp[:, t] = lp
        out_raw[:, t] = raw
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)

        # --- finishing -------------------------------------------------------------------------------
        if has_eos:
            just = ~finished & torch.isin(tok, eos_t)
            eos_hit |= just
            n_new.masked_fill_(just, t + 1)
            finished |= just
        if need_lists:
            row_toks = tok.tolist()
            just_l = just.tolist() if has_eos else None
            for i in range(B):
                if i in done:
                    continue
                gen_lists[i].append(row_toks[i])
                if stream is not None:
                    stream(i, row_toks[i])
                if has_eos and just_l[i]:
                    done.add(i)
                elif stop is not None and stop.found(gen_lists[i]):
                    done.add(i)
                    stopped.add(i)
                    finished[i] = True
                    n_new[i] = t + 1
        if t == N - 1:
            break
        if track_finish:
            if bool(finished.all()):
                break
            if use_mask:
                torch.logical_not(finished, out=mask[:, P + t])
        # --- next step -----------------------------------------------------------------------------
        hidden = model(
            tok[:, None],
            attention_mask=mask[:, : P + t + 1] if use_mask else None,
            position_ids=step_pos,
            cache=cache,
        )
        step_pos += 1

    return collect_results(out_tok, out_lp, out_raw, n_new, eos_hit, stopped, lens, tokenizer, stop)




def _vocab_size(model: nn.Module) -> int:
    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(head, "out_features"):
        return int(head.out_features)
    return int(model.config.vocab_size)


# --------------------------------------------------------------------------------------------------
# Text level
# --------------------------------------------------------------------------------------------------


class _TextStream:
    """Prints one row's completion as tokens arrive.

    Holds back an incomplete UTF-8 character (decoded as a trailing U+FFFD) and the last ``L - 1``
    characters (``L`` = the longest stop string), which may still turn out to start a stop string, so
    nothing printed is ever taken back; :meth:`finish` prints the rest of the final text (no newline: the
    caller decides what follows).  Decodes the
    whole completion per token: this is for one interactive stream, not the batch hot path.
    """

    def __init__(self, tokenizer: Any, out: IO[str], stops: Sequence[str]) -> None:
        self.decode = text_decoder(tokenizer)
        self.out = out
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.printed = 0  # characters of the completion already written

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return  # incomplete character: wait for the next token
        upto = len(text) - self.hold
        if upto > self.printed:
            self.out.write(text[self.printed:upto])
            self.out.flush()
            self.printed = upto

    def finish(self, final_text: str | None) -> None:
        if final_text is not None and len(final_text) > self.printed:
            self.out.write(final_text[self.printed:])
        self.out.flush()


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str] | str,
    cfg: GenerationConfig | None = None,
    stream_to: IO[str] | None = None,
) -> list[GenerationResult]:
    """Encode text prompts with ``tokenizer``, generate, and fill each result's ``text``.

    The prompt is encoded exactly as ``tokenizer.encode`` does it (BOS only if the tokenizer adds it).
    ``stream_to`` (e.g. ``sys.stdout``; single prompt only) receives the completion as it is produced.
    """
    cfg = cfg or GenerationConfig()
    if isinstance(prompts, str):
        prompts = [prompts]
    if stream_to is not None and len(prompts) != 1:
        raise ConfigError(f"streaming output needs exactly one prompt, got {len(prompts)}")
    ids = [tokenizer.encode(p) for p in prompts]
    bos = getattr(tokenizer, "bos_id", None)
    for i, p in enumerate(ids):
        if not p:
            if bos is None:
                raise ConfigError(f"prompt {i} encodes to no tokens and the tokenizer has no BOS token to start from")
            ids[i] = [int(bos)]
    streamer = _TextStream(tokenizer, stream_to, cfg.stop) if stream_to is not None else None
    results = generate(model, ids, cfg, tokenizer=tokenizer, stream=streamer)
    if streamer is not None:
        streamer.finish(results[0].text)
    return results
