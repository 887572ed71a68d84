"""Decoding policy shared by the decoder-only engine (:mod:`lmforge.eval.generate`) and the encoder-decoder one
(:mod:`lmforge.eval.generate_seq2seq`): what to generate (:class:`GenerationConfig`), what comes back
(:class:`GenerationResult`), how the next token is chosen from the logits, when a stop string ends a row, and how
the engines' output buffers become results.

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
  logits at temperature 1, no processing.

Which one RL uses.  A teacher-forced pass of :func:`lmforge.objectives.logprobs.token_logprobs` over ``prompt +
tokens`` gives ``raw_logprobs`` at ``temperature=1`` and, when the sampler applies a temperature only (no top-k,
top-p or repetition penalty), ``logprobs`` at ``temperature=T`` -- TRL's convention for PPO ratios and GRPO's KL,
so the first update's ratio is 1.  Top-k/top-p make ``logprobs`` the truncated behaviour distribution, which no
training forward reproduces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from lmforge.core.errors import ConfigError


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


class SamplingRNG:
    """The sampling randomness of a training loop that generates (RL rollouts), as state a checkpoint can keep.

    Every call of :meth:`generator` returns a fresh ``torch.Generator`` seeded from ``(seed, rank, calls)`` and
    counts the call, so the state is two integers that are the same on every rank: rank 0's checkpoint restores
    every rank, and a resumed run samples exactly the tokens an uninterrupted one would.  ``rank`` keeps ranks'
    samples independent (each rank generates for its own prompts).  Counting calls rather than saving the
    generator's internal state also holds across devices (a CUDA generator's state cannot seed a CPU one).
    """

    def __init__(self, seed: int, rank: int = 0) -> None:
        self.seed, self.rank, self.calls = int(seed), int(rank), 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        # SeedSequence mixes the three integers (a plain sum would give seed+1 at call 0 the stream of seed at call 1)
        words = np.random.SeedSequence([self.seed, self.rank, self.calls]).generate_state(2)
        self.calls += 1
        gen = torch.Generator(device=device)
        gen.manual_seed((int(words[0]) << 31) ^ int(words[1]))  # < 2**63
        return gen

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "calls": self.calls}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ConfigError(f"the checkpoint's sampling seed {state['seed']} is not this run's {self.seed}; "
                              f"resume with the seed the run started with")
        self.calls = int(state["calls"])


def completion_batch(prompts: Sequence[Sequence[int]], results: Sequence[GenerationResult], pad_id: int,
                     num_samples: int = 1) -> dict[str, torch.Tensor]:
    """Prompt + completion rows for a teacher-forced pass (the policy's and the reference's log-probs in RL).

    ``results`` are :func:`~lmforge.eval.generate.generate`'s (``num_samples`` per prompt, prompt-major).  Returns
    right-padded ``input_ids`` ``[R, L]``, ``attention_mask`` (bool) and ``score_mask`` (True on the completion's
    tokens: what :func:`lmforge.objectives.logprobs.token_logprobs` scores, aligned with the inputs).
    """
    if len(results) != len(prompts) * num_samples:
        raise ConfigError(f"{len(results)} results for {len(prompts)} prompts x {num_samples} samples")
    rows = [(list(prompts[i // num_samples]), list(r.tokens)) for i, r in enumerate(results)]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(rows), width, dtype=torch.bool)
    score = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attn[i, : len(p) + len(c)] = True
        score[i, len(p): len(p) + len(c)] = True
    return {"input_ids": ids, "attention_mask": attn, "score_mask": score}


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
# Stop strings and results
# --------------------------------------------------------------------------------------------------


class StopChecker:
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
            text = text_decoder(tokenizer)(toks[i][:k])
            if stop is not None:
                text = stop.truncate(text)
        results.append(GenerationResult(toks[i][:k], lps[i][:k], raws[i][:k], reason, text, lens[i]))
    return results


def text_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """``ids -> text`` without special tokens (EOS/pad never show up in completions)."""

    def decode(ids: list[int]) -> str:
        try:
            return tokenizer.decode(ids, skip_special_tokens=True)
        except TypeError:
            return tokenizer.decode(ids)

    return decode
