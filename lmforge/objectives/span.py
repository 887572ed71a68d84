"""T5 span corruption (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer", §3.1.4 and the reference ``random_spans_noise_mask`` / ``random_spans_helper`` preprocessors).

For a window of ``L`` tokens: ``round(L * noise_density)`` tokens (at least 1, at most ``L - 1``) are noise, in
``round(noise / mean_noise_span_length)`` spans (at least 1).  The noise tokens and the non-noise tokens are
each split into that many non-empty parts, uniformly at random, and interleaved starting with non-noise, so a
window always ends with a noise span.  Inputs: every noise span replaced by one sentinel; targets: every
non-noise span replaced by one sentinel, i.e. ``<extra_id_0> span_0 <extra_id_1> span_1 ...``; both end with
EOS.  Sentinel ``i`` has id ``vocab_size - 1 - i``.  Example (spans "for inviting", "last")::

    tokens   Thank you for inviting me to your party last week
    inputs   Thank you <extra_id_0> me to your party <extra_id_1> week </s>     (non-noise ... noise last:
    targets  <extra_id_0> for inviting <extra_id_1> last </s>                    here "week" is the final span)

Lengths are the same for every window (they depend on ``L`` only), so batches need no padding:
:func:`compute_input_and_target_lengths` picks the largest ``L`` whose inputs fit ``inputs_length``.

Tokenizers with the sentinels on the last ids: :mod:`lmforge.data.span`; the loss:
:class:`~lmforge.objectives.seq2seq.Seq2SeqObjective`; the validation evaluator:
:func:`lmforge.eval.pretrain_eval.evaluate_span`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from lmforge.core.errors import ConfigError, DataError, RunError
from lmforge.data.loader import PackedWindows
from lmforge.data.span import check_sentinels
from lmforge.objectives.base import IGNORE_INDEX

_VAL_STREAM = 0x56414C  # numpy seed component of the validation corruption ("VAL")
_TRAIN_STREAM = 0x5350414E  # ... and of training ("SPAN")


@dataclass
class SpanConfig:
    """Span corruption settings (YAML ``span:`` section).  ``inputs_length``: encoder tokens per example
    including the final EOS; the raw window and the target length follow from the arithmetic."""

    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    inputs_length: int = 128
    full_text_fraction: float = 0.0
    """Share of windows whose target is the whole original window (+ EOS) instead of the dropped spans: BART's
    "text infilling" (Lewis et al. 2020; the T5 paper's "MASS-style" targets, Raffel et al. Table 4) -- the decoder
    then learns to reproduce its input, a copying skill span corruption alone never rewards.  0 = T5's objective;
    above 0 the targets are ``tokens_length + 1`` long (the span targets padded with -100), so steps cost more."""

    prefix_lm_fraction: float = 0.0
    """Share of windows cut at a uniformly random point into a prefix (the input, padded and masked) and its
    continuation (the target): the T5 paper's "prefix LM" objective (Raffel et al. 2020, Sec. 3.3), UL2's
    sequential S-denoiser (Tay et al. 2022) and the "LM adaptation" of T5 checkpoints (Lester et al. 2021).  Every
    target token is then predicted, and the decoder learns to continue text that the encoder read -- what
    text-to-text fine-tuning asks of it -- instead of only to fill in sentinel-marked gaps.  Drawn beside
    ``full_text_fraction`` (their sum must stay <= 1); targets are ``tokens_length + 1`` long when either is > 0."""

    def __post_init__(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"noise_density={self.noise_density} must be in (0, 1), e.g. 0.15")
        if self.mean_noise_span_length < 1.0:
            raise ValueError(f"mean_noise_span_length={self.mean_noise_span_length} must be >= 1, e.g. 3")
        if self.inputs_length < 2:
            raise ValueError(f"inputs_length={self.inputs_length} must be >= 2")
        if not 0.0 <= self.full_text_fraction <= 1.0:
            raise ValueError(f"full_text_fraction={self.full_text_fraction} must be in [0, 1], e.g. 0.5")
        if not 0.0 <= self.prefix_lm_fraction <= 1.0:
            raise ValueError(f"prefix_lm_fraction={self.prefix_lm_fraction} must be in [0, 1], e.g. 0.5")
        if self.full_text_fraction + self.prefix_lm_fraction > 1.0:
            raise ValueError(f"full_text_fraction + prefix_lm_fraction = "
                             f"{self.full_text_fraction + self.prefix_lm_fraction:g} exceeds 1; lower one of them")


# ---- length arithmetic -----------------------------------------------------------------------------

def _counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a window, clamped as the mask algorithm does."""
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    return noise, max(int(round(noise / mean_noise_span_length)), 1)


def compute_input_and_target_lengths(inputs_length: int, noise_density: float = 0.15,
                                     mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """``(tokens_length, targets_length)``: the longest raw window whose corrupted inputs (non-noise tokens, one
    sentinel per span, EOS) fit in ``inputs_length``, and the targets' length (noise tokens, one sentinel per
    span, EOS).  The reference arithmetic, unclamped; :func:`plan_spans` checks that it is servable."""
    def lengths(tokens_length: int) -> tuple[int, int]:
        noise = int(round(tokens_length * noise_density))
        spans = int(round(noise / mean_noise_span_length))
        return tokens_length - noise + spans + 1, noise + spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    targets_length = lengths(tokens_length)[1]
    if noise_density == 0.5 and targets_length > inputs_length:  # the reference's "round number" adjustment
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


@dataclass(frozen=True)
class SpanPlan:
    """The fixed shape of every corrupted window."""

    tokens_length: int
    inputs_length: int
    targets_length: int
    noise_tokens: int
    noise_spans: int


def _servable(inputs_length: int, density: float, mean: float) -> SpanPlan | None:
    tokens_length, targets_length = compute_input_and_target_lengths(inputs_length, density, mean)
    if tokens_length < 2:
        return None
    noise, spans = _counts(tokens_length, density, mean)
    ok = (noise == int(round(tokens_length * density)) and spans == int(round(noise / mean))
          and tokens_length - noise >= spans and tokens_length - noise + spans + 1 == inputs_length
          and noise + spans + 1 == targets_length)
    return SpanPlan(tokens_length, inputs_length, targets_length, noise, spans) if ok else None


def plan_spans(cfg: SpanConfig) -> SpanPlan:
    """The window/target lengths for ``cfg``; ``ConfigError`` when the arithmetic cannot give exactly
    ``inputs_length`` inputs with at least one noise span (names the nearest lengths that work)."""
    plan = _servable(cfg.inputs_length, cfg.noise_density, cfg.mean_noise_span_length)
    if plan is not None:
        return plan
    near = [n for n in range(max(2, cfg.inputs_length - 64), cfg.inputs_length + 4096)
            if _servable(n, cfg.noise_density, cfg.mean_noise_span_length)]
    below = [n for n in near if n < cfg.inputs_length][-1:]
    above = [n for n in near if n > cfg.inputs_length][:1]
    raise ConfigError(
        f"span.inputs_length={cfg.inputs_length} cannot be served with noise_density={cfg.noise_density} and "
        f"mean_noise_span_length={cfg.mean_noise_span_length} (no window gives exactly that many inputs with at "
        f"least one noise span); use span.inputs_length={' or '.join(map(str, below + above)) or 'larger'}")


# ---- the corruption itself -------------------------------------------------------------------------

def _segment(u: np.ndarray, num_items: int, num_segments: int) -> np.ndarray:
    """Random split of ``num_items`` into ``num_segments`` non-empty parts, one per row of ``u``
    (``[n, num_items - 1]`` uniforms).  A part starts after position ``j`` when ``argsort(u)[j] < num_segments
    - 1``: the reference's shuffle of ``num_segments - 1`` ones among ``num_items - 1`` gaps.  -> ``[n, S]``."""
    n = u.shape[0]
    if num_segments == 1:
        return np.full((n, 1), num_items, dtype=np.int64)
    cut = np.argsort(u, axis=1, kind="stable") < num_segments - 1  # [n, num_items - 1]
    starts = np.nonzero(cut)[1].reshape(n, num_segments - 1) + 1  # row-major: sorted within each row
    bounds = np.concatenate([np.zeros((n, 1), np.int64), starts, np.full((n, 1), num_items)], axis=1)
    return np.diff(bounds, axis=1)


def random_spans_noise_mask(n: int, length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """``[n, length]`` bool noise masks.  Row by row the generator gives ``noise - 1`` uniforms for the noise
    split, then ``length - noise - 1`` for the non-noise split (one ``rng.random((n, ...))`` draw)."""
    noise, spans = _counts(length, noise_density, mean_noise_span_length)
    if length - noise < spans:
        raise ConfigError(f"a window of {length} tokens has {length - noise} non-noise tokens, fewer than its "
                          f"{spans} noise spans; lower noise_density or raise mean_noise_span_length")
    u = rng.random((n, length - 2)) if length > 2 else np.zeros((n, 0))
    noise_lengths = _segment(u[:, :noise - 1], noise, spans)
    clean_lengths = _segment(u[:, noise - 1:], length - noise, spans)
    interleaved = np.stack([clean_lengths, noise_lengths], axis=2).reshape(n, 2 * spans)  # clean first
    starts = np.cumsum(interleaved, axis=1)[:, :-1]
    first = np.zeros((n, length), dtype=np.int64)
    np.put_along_axis(first, starts, 1, axis=1)
    return np.cumsum(first, axis=1) % 2 == 1  # odd-numbered spans are noise


def corrupt_spans(tokens: np.ndarray, noise: np.ndarray, vocab_size: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``tokens``/``noise`` ``[n, L]`` -> (inputs, targets): each noise span (inputs) or non-noise span
    (targets) becomes one sentinel, numbered in order from ``vocab_size - 1`` down; EOS appended to both."""
    return _collapse(tokens, noise, vocab_size, eos_id), _collapse(tokens, ~noise, vocab_size, eos_id)


def _collapse(tokens: np.ndarray, drop: np.ndarray, vocab_size: int, eos_id: int) -> np.ndarray:
    n = tokens.shape[0]
    prev = np.zeros_like(drop)
    prev[:, 1:] = drop[:, :-1]
    first = drop & ~prev  # first token of each dropped span -> its sentinel
    sentinel = vocab_size - np.cumsum(first, axis=1)  # vocab_size - 1 - (span index)
    out = np.where(first, sentinel, tokens)
    keep = ~(drop & prev)
    out = out[keep].reshape(n, -1)  # every row keeps the same number of tokens
    return np.concatenate([out, np.full((n, 1), eos_id, dtype=out.dtype)], axis=1)


def prefix_lm_rows(tokens: np.ndarray, inputs_length: int, eos_id: int, rng: np.random.Generator, pad_id: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw windows ``[n, L]`` cut at ``s ~ U{1, ..., min(L, inputs_length) - 1}``: inputs ``w[:s] EOS`` right-padded
    to ``inputs_length`` (``[n, inputs_length]``, with their attention mask), targets ``w[s:] EOS`` padded with
    -100 to ``L + 1``."""
    n, L = tokens.shape
    cut = rng.integers(1, min(L, inputs_length), size=n)[:, None]  # prefix tokens; + EOS fits the inputs
    pos = np.arange(inputs_length)[None, :]
    src = np.concatenate([tokens, np.zeros((n, max(0, inputs_length - L)), dtype=tokens.dtype)], axis=1)
    inputs = np.where(pos < cut, src[:, :inputs_length], np.where(pos == cut, eos_id, pad_id))
    tpos = np.arange(L + 1)[None, :]
    shifted = np.take_along_axis(tokens, np.minimum(tpos + cut, L - 1), axis=1)
    targets = np.where(tpos < L - cut, shifted, np.where(tpos == L - cut, eos_id, IGNORE_INDEX))
    return inputs.astype(tokens.dtype), (pos <= cut).astype(tokens.dtype), targets.astype(tokens.dtype)


# ---- the batch source ------------------------------------------------------------------------------

class SpanCorruptionSource:
    """Batch source of span-corrupted packed windows: ``next_batch(n) -> {input_ids [n, inputs_length],
    attention_mask (ones), labels [n, targets_length]}`` (int64; ``tokens_length + 1`` long with
    ``span.full_text_fraction`` > 0).

    Raw windows of ``tokens_length`` tokens come from :class:`PackedWindows` (``seq_len = tokens_length - 1``,
    so consecutive windows share one token); the noise masks from a numpy ``PCG64`` generator whose state is in
    ``state_dict`` -- a resumed run continues with the same windows and the same masks.  ``val_batches`` uses a
    fresh generator each call, so every evaluation sees the same corruption.
    """

    def __init__(self, tokens: np.ndarray | list[np.ndarray], cfg: SpanConfig, vocab_size: int | None = None,
                 eos_id: int | None = None, seed: int = 0, shuffle: bool = True, tokenizer: Any = None) -> None:
        self.cfg = cfg
        self.plan = plan_spans(cfg)
        if tokenizer is not None:
            check_sentinels(tokenizer, self.plan.noise_spans)
            vocab_size = tokenizer.vocab_size if vocab_size is None else vocab_size
            eos_id = tokenizer.eos_id if eos_id is None else eos_id
        if vocab_size is None or eos_id is None:
            raise ConfigError("SpanCorruptionSource needs a tokenizer or both vocab_size and eos_id")
        self.vocab_size, self.eos_id, self.seed = int(vocab_size), int(eos_id), int(seed)
        arrays = [tokens] if isinstance(tokens, np.ndarray) or torch.is_tensor(tokens) else list(tokens)
        L = self.plan.tokens_length
        if not any(len(a) >= L for a in arrays):
            raise DataError(f"the token stream has {max((len(a) for a in arrays), default=0)} tokens, too few for one span-"
                            f"corruption window of {L} tokens (span.inputs_length={cfg.inputs_length}); use more "
                            f"data or a smaller span.inputs_length")
        self.windows = PackedWindows(arrays, seq_len=L - 1, seed=seed, shuffle=shuffle)
        self.rng = np.random.Generator(np.random.PCG64([self.seed, _TRAIN_STREAM]))

    @classmethod
    def from_shards(cls, shards: Any, split: str, tokenizer: Any, cfg: SpanConfig, seed: int = 0,
                    shuffle: bool = True) -> "SpanCorruptionSource":
        """From a :class:`~lmforge.data.shards.ShardSet` split and the tokenizer (with sentinels) it was made with."""
        return cls(shards.tokens(split), cfg, seed=seed, shuffle=shuffle, tokenizer=tokenizer)

    def corrupt(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Raw windows ``[n, tokens_length]`` -> a batch."""
        c = self.cfg
        noise = random_spans_noise_mask(tokens.shape[0], tokens.shape[1], c.noise_density,
                                        c.mean_noise_span_length, rng)
        inputs, targets = corrupt_spans(tokens, noise, self.vocab_size, self.eos_id)
        mask = np.ones_like(inputs)
        if c.full_text_fraction > 0 or c.prefix_lm_fraction > 0:  # see SpanConfig: other targets for some rows
            n, L = tokens.shape
            full = np.concatenate([tokens, np.full((n, 1), self.eos_id, dtype=tokens.dtype)], axis=1)
            spans = np.full_like(full, IGNORE_INDEX)
            spans[:, :targets.shape[1]] = targets
            u = rng.random(n)
            whole = u < c.full_text_fraction
            targets = np.where(whole[:, None], full, spans)
            if c.prefix_lm_fraction > 0:
                prefix = ~whole & (u < c.full_text_fraction + c.prefix_lm_fraction)
                p_in, p_mask, p_tgt = prefix_lm_rows(tokens, inputs.shape[1], self.eos_id, rng)
                inputs = np.where(prefix[:, None], p_in, inputs)
                mask = np.where(prefix[:, None], p_mask, mask)
                targets = np.where(prefix[:, None], p_tgt, targets)
        return {"input_ids": torch.from_numpy(inputs), "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(targets)}

    @staticmethod
    def _raw(batch: dict[str, torch.Tensor]) -> np.ndarray:
        """PackedWindows' shifted pair back to the ``seq_len + 1`` raw window."""
        return torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy()

    def next_batch(self, n: int) -> dict[str, torch.Tensor]:
        return self.corrupt(self._raw(self.windows.next_batch(n)), self.rng)

    def val_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        rng = np.random.Generator(np.random.PCG64([self.seed, _VAL_STREAM]))
        for batch in self.windows.val_batches(batch_size, max_batches):
            yield self.corrupt(self._raw(batch), rng)

    def num_val_batches(self, batch_size: int, max_batches: int | None = None) -> int:
        return self.windows.num_val_batches(batch_size, max_batches)

    def state_dict(self) -> dict[str, Any]:
        return {"windows": self.windows.state_dict(), "rng": self.rng.bit_generator.state,
                "inputs_length": self.plan.inputs_length, "tokens_length": self.plan.tokens_length}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if "windows" not in sd or "rng" not in sd:
            raise RunError("data loader state lacks 'windows'/'rng'; the checkpoint is not from SpanCorruptionSource")
        if int(sd.get("inputs_length", -1)) != self.plan.inputs_length:
            raise RunError(f"cannot resume: the checkpoint used span.inputs_length={sd.get('inputs_length')}, this "
                           f"run {self.plan.inputs_length}; set it back or start a new run")
        self.windows.load_state_dict(sd["windows"])
        self.rng.bit_generator.state = sd["rng"]

    def __len__(self) -> int:
        return len(self.windows)
