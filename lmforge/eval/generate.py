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

Finishing.  ``finish_reason`` is ``'eos'`` (the EOS token is the last of ``tokens``), ``'stop'`` (the
token that completed a stop string is the last of ``tokens``; ``text`` ends before the stop string) or
``'length'`` (``max_new_tokens`` reached).

Sampling, applied in this order to the next-token logits (fp32): repetition penalty → temperature →
top-k → top-p, then argmax (``temperature == 0``) or a draw from the softmax.

Log-probs.  Each result carries two per-token arrays, aligned with ``tokens``:

* ``logprobs`` — log-prob of the chosen token under the distribution the engine actually sampled from,
  i.e. ``log_softmax`` of the processed logits (after repetition penalty, temperature, top-k and top-p).
  Under greedy decoding (``temperature == 0``) it is ``log_softmax`` of the processed logits at
  temperature 1 (the distribution whose mode greedy takes).
* ``raw_logprobs`` — log-prob of the chosen token under the model itself: ``log_softmax`` of the raw
  logits at temperature 1, no processing.  This is what a training forward over ``prompt + tokens``
  gives, so it is what RL (PPO ratios, KL to a reference) must use; ``logprobs`` is the behaviour
  distribution of the sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Sequence

import torch
from torch import nn

from lmforge.core.errors import ConfigError

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
# Config and result
# --------------------------------------------------------------------------------------------------


@dataclass
class GenerationConfig:
    """What to generate.

    * ``max_new_tokens`` — at most this many new tokens per prompt.
    * ``temperature`` — ``0`` is greedy (argmax); otherwise logits are divided by it before sampling.
    * ``top_k`` — keep only the ``k`` most likely tokens (``0`` = off).
    * ``top_p`` — nucleus: keep the smallest set of most likely tokens whose probability reaches
      ``top_p`` (``1.0`` = off).
    * ``repetition_penalty`` — CTRL/HF semantics: for every token that occurs in the prompt or in the
      tokens generated so far, a positive logit is divided by the penalty and a negative one multiplied
      by it (``1.0`` = off).  Left padding is not counted as occurring.
    * ``stop`` — stop strings: a row finishes (``finish_reason == 'stop'``) as soon as its decoded
      completion contains one; ``text`` is cut before it.  Needs a tokenizer.
    * ``eos_token_id`` — one id or a list; ``None`` = the tokenizer's EOS when a tokenizer is given.
      The EOS token is kept as the last of ``tokens`` (``finish_reason == 'eos'``), not in ``text``.
    * ``min_new_tokens`` — EOS is forbidden (logit ``-inf``) before this many new tokens.
    * ``ignore_eos`` — never finish on EOS (benchmarks: always generate ``max_new_tokens``).
    * ``seed`` — seed of a private ``torch.Generator`` for sampling: the same seed, prompts and model give
      the same tokens.  ``None`` = the global torch RNG.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    eos_token_id: int | list[int] | None = None
    min_new_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_new_tokens < 0:
            raise ConfigError(f"generation max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ConfigError(f"generation temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"generation top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"generation top_p={self.top_p} must be in (0, 1] (1 = off)")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"generation repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")
        if self.min_new_tokens < 0:
            raise ConfigError(f"generation min_new_tokens={self.min_new_tokens} must be >= 0")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ConfigError(f"generation stop={self.stop!r}: stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return [int(i) for i in self.eos_token_id]


@dataclass
class GenerationResult:
    """One generated sequence.

    ``tokens`` are the new token ids (not the prompt); when ``finish_reason == 'eos'`` the EOS token is
    the last of them, when ``'stop'`` the token that completed the stop string is the last.  ``logprobs``
    and ``raw_logprobs`` (see the module doc) are aligned with ``tokens``.  ``text`` is the decoded
    completion (stop string and everything after it removed) when a tokenizer was given, else ``None``.
    """

    tokens: list[int]
    logprobs: list[float]
    raw_logprobs: list[float]
    finish_reason: str  # 'eos' | 'stop' | 'length'
    text: str | None = None
    prompt_tokens: int = 0


# --------------------------------------------------------------------------------------------------
# Logits processors (pure functions on [B, V] logits; unit-tested on their own)
# --------------------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL/HF repetition penalty: where ``seen`` ([B, V] bool), divide positive logits by ``penalty`` and
    multiply negative ones by it."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits per row (ties with the k-th are kept), set the rest to ``-inf``."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens, in order, until their probability reaches ``p``.

    A token is kept when the total probability of the tokens ranked strictly above it is below ``p``, so
    the most likely token is always kept and the kept set is the smallest one with mass >= ``p``.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter_(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, cfg: GenerationConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Repetition penalty → temperature → top-k → top-p on fp32 ``[B, V]`` logits (what the sampler uses).

    Temperature 0 (greedy) leaves the scale unchanged.
    """
    if cfg.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.temperature > 0 and cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k > 0:
        logits = apply_top_k(logits, cfg.top_k)
    if cfg.top_p < 1.0:
        logits = apply_top_p(logits, cfg.top_p)
    return logits


def choose_next(logits: torch.Tensor, cfg: GenerationConfig, seen: torch.Tensor | None = None,
                ban: torch.Tensor | None = None, gen: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoding step's choice from fp32 ``[B, V]`` logits: ``(token [B], logprob [B], raw_logprob [B])``.

    ``ban`` (token ids, e.g. EOS before ``min_new_tokens``) get ``-inf`` first, then :func:`process_logits`;
    greedy takes the argmax, sampling a draw from the softmax by an exponential race (``argmax p / q`` with
    ``q ~ Exp(1)``, the Gumbel-max trick in another form: no host sync, seeded by ``gen``).  ``logprob`` is
    under the processed distribution, ``raw_logprob`` under the model's own (module doc).
    """
    proc = logits if ban is None else logits.index_fill(1, ban, float("-inf"))
    proc = process_logits(proc, cfg, seen)
    if cfg.greedy:
        tok = proc.argmax(dim=-1, keepdim=True)
    else:
        probs = torch.softmax(proc, dim=-1)
        # The clamp keeps a (rare) exact 0 draw from turning 0/0 into NaN for a filtered-out token.
        q = torch.empty_like(probs).exponential_(generator=gen).clamp_(min=torch.finfo(probs.dtype).tiny)
        tok = (probs / q).argmax(dim=-1, keepdim=True)
    # log_softmax + gather: one fused pass over the vocabulary (logsumexp takes several)
    raw = torch.log_softmax(logits, dim=-1).gather(1, tok)
    lp = raw if proc is logits else torch.log_softmax(proc, dim=-1).gather(1, tok)
    return tok[:, 0], lp[:, 0], raw[:, 0]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_context_length(model: nn.Module) -> int | None:
    """Positions a decoder can take: its config's maximum, less the positions a soft prompt or prefix occupies in
    front of the tokens (:mod:`lmforge.models.prompt`); None when the config names no maximum."""
    cfg = getattr(model, "config", None)
    for name in ("max_seq_len", "max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            taken = [getattr(model, slot, None) for slot in ("soft_prompt", "prefix")]
            return value - sum(t.n for t in taken if t is not None)
    return None


class _StopChecker:
    """Finds stop strings in each row's completion, decoding only a short tail of tokens per step.

    Checked after every token, so a stop string is caught at the step that completes it; it then ends
    inside the newest token's text and starts at most ``L - 1`` characters (``L`` = the longest stop
    string) before it.  A character takes at most 4 byte-level tokens, so the last ``4·L + 8`` tokens
    always cover it, with margin for a partial character decoded as U+FFFD at the tail's start.
    """

    def __init__(self, stops: Sequence[str], decode: Callable[[list[int]], str]) -> None:
        self.stops = list(stops)
        self.decode = decode
        self.width = 4 * max(len(s) for s in self.stops) + 8

    def found(self, ids: list[int]) -> bool:
        text = self.decode(ids[-self.width:])
        return any(s in text for s in self.stops)

    def truncate(self, text: str) -> str:
        cut = len(text)
        for s in self.stops:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
        return text[:cut]


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig | None = None,
    *,
    pad_id: int | None = None,
    stream: Callable[[int, int], None] | None = None,
    tokenizer: Any = None,
) -> list[GenerationResult]:
    """Generate continuations of a batch of token-id prompts (of any lengths) with ``model``.

    ``model`` is a decoder with the lmforge interface (``forward(input_ids, attention_mask, position_ids,
    cache) -> hidden``, ``logits(hidden)``, ``new_cache(batch, max_len)``).  ``pad_id`` fills left padding
    and the tail of finished rows (default: the tokenizer's pad, then EOS, then 0; it is always masked, so
    any id works).  ``stream(row, token)`` is called for every new token of every unfinished row, in
    order.  ``tokenizer`` (anything with ``decode(ids) -> str``) is needed for stop strings and fills
    ``text``; its EOS is the default ``eos_token_id``.  Runs under ``torch.inference_mode()`` with the
    model in eval mode (its training flag is restored afterwards).
    """
    cfg = cfg or GenerationConfig()
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
    if N == 0:
        text = "" if tokenizer is not None else None
        return [GenerationResult([], [], [], "length", text, lens[i]) for i in range(B)]

    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompts, lens, P, N, cfg, eos_ids, pad_id, stream, tokenizer, device)
    finally:
        model.train(was_training)


def _generate(model, prompts, lens, P, N, cfg, eos_ids, pad_id, stream, tokenizer, device):
    B = len(prompts)
    total = P + N
    padded = any(n != P for n in lens)

    # --- inputs, built once on the host and moved in one copy each ----------------------------------
    ids = torch.tensor([[pad_id] * (P - n) + p for p, n in zip(prompts, lens)], dtype=torch.long)
    # Bool (True = real token): what the model's attention wants, so no per-step conversion.
    mask = torch.ones(B, total, dtype=torch.bool)
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

    cache = model.new_cache(B, total, device=device)
    gen = None
    if cfg.seed is not None and not cfg.greedy:
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg.seed)

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

    stop = _StopChecker(cfg.stop, _decoder(tokenizer)) if cfg.stop else None
    stopped: set[int] = set()
    done: set[int] = set()  # rows finished (host side; kept only when stop strings or streaming need it)
    need_lists = stop is not None or stream is not None
    gen_lists: list[list[int]] = [[] for _ in range(B)]

    # --- prefill ------------------------------------------------------------------------------------
    hidden = model(ids, attention_mask=mask[:, :P] if use_mask else None, position_ids=pos, cache=cache)
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


def collect_results(out_tok, out_lp, out_raw, n_new, eos_hit, stopped, lens, tokenizer, stop
                    ) -> list[GenerationResult]:
    """Per-row :class:`GenerationResult` from the engine's output buffers (shared with the seq2seq path)."""
    toks, lps, raws, keep, eos_rows = (out_tok.tolist(), out_lp.tolist(), out_raw.tolist(), n_new.tolist(),
                                       eos_hit.tolist())
    results = []
    for i in range(len(lens)):
        k = keep[i]
        reason = "stop" if i in stopped else ("eos" if eos_rows[i] else "length")
        text = None
        if tokenizer is not None:
            text = _decoder(tokenizer)(toks[i][:k])
            if stop is not None:
                text = stop.truncate(text)
        results.append(GenerationResult(toks[i][:k], lps[i][:k], raws[i][:k], reason, text, lens[i]))
    return results


def _decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """``ids -> text`` without special tokens (EOS/pad never show up in completions)."""

    def decode(ids: list[int]) -> str:
        try:
            return tokenizer.decode(ids, skip_special_tokens=True)
        except TypeError:
            return tokenizer.decode(ids)

    return decode


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
        self.decode = _decoder(tokenizer)
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
