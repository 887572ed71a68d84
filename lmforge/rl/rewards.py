"""Rewards of rollouts: the world's verifiers, a user function ``module:function``, a reward model dir -- weighted.

Each reward scores a batch of rollouts (the prompt record, its prompt text, the answer's text and token rows) and
returns one float per answer; :class:`Rewards` sums them with their weights.  Failures are one line:

* a user function that raises or returns a non-finite value is named with the prompt it was scoring;
* a record without the field a verifier reads (``answer``, ``check``) is named by its index and the missing field;
* a reward model whose tokenizer gives some token of the policy's another id is refused unless ``retokenize: true``
  (the conversion rule: the answer's text is rendered again with the reward model's own chat format and tokenizer);
  added tokens (``lmforge reward``'s pad token) are fine.

A reward model's score is read on the last real token of ``prompt + answer`` (its EOS, or the last token of a
length-cut answer) -- :func:`lmforge.models.task.last_token` by the attention mask of right-padded rows, never a pad.
``normalize: true`` standardises its scores by running statistics over every batch so far (Welford; kept in the
checkpoint).
"""

from __future__ import annotations

import importlib
import os
import sys
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from lmforge.core.config import require
from lmforge.core.errors import ConfigError, DataError, ModelError
from lmforge.data.chat import ChatFormat
from lmforge.data.world.verifiers import CHECKS, reward as verifier_reward
from lmforge.models.io import load_model
from lmforge.models.task import SequenceClassifier

KINDS = ("verifier", "function", "model")


@dataclass
class RewardConfig:
    kind: str = "verifier"
    """verifier (the world's: 1 for a right first line, else 0), function (``module:function``), model (a dir)."""
    weight: float = 1.0
    function: Optional[str] = None
    """``module:function`` called as ``fn(prompt, answer, record) -> float`` (kind function)."""
    model: Optional[str] = None
    """A reward model dir, ``lmforge reward``'s ``model/`` (kind model)."""
    normalize: bool = False
    """Reward model: scores standardised by running mean/std over all batches so far."""
    retokenize: bool = False
    """Reward model with another tokenizer: render the answer again with its own chat format and tokenizer."""

    def __post_init__(self) -> None:
        require(self.kind in KINDS, "rewards[].kind", self.kind, f"one of {', '.join(KINDS)}")
        if self.kind == "function" and not self.function:
            raise ConfigError("rewards[].kind=function needs rewards[].function='module:function'")
        if self.kind == "model" and not self.model:
            raise ConfigError("rewards[].kind=model needs rewards[].model=DIR (a reward model dir)")


@dataclass
class Rollouts:
    """What a reward sees: per answer its record, prompt text, answer text, and the ``prompt + answer`` rows."""

    records: list[dict[str, Any]]
    prompts: list[str]
    answers: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    messages: list[list[dict[str, Any]]] = field(default_factory=list)


def load_function(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"rewards[].function={spec!r} must be 'module:function'")
    if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m` would: the working directory first,
        sys.path.insert(0, os.getcwd())                     # so `lmforge grpo` finds a rewards.py beside the config
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"rewards[].function={spec!r} cannot be imported ({e}); put the module on PYTHONPATH")
    if not callable(fn):
        raise ConfigError(f"rewards[].function={spec!r} is not callable")
    return fn


def _short(text: str, n: int = 60) -> str:
    one = " ".join(text.split())
    return one if len(one) <= n else one[: n - 3] + "..."


def check_verifier_fields(records: Sequence[dict[str, Any]], source: str) -> None:
    """Every record carries what the verifier reads; else a one-line error naming the first that does not."""
    for i, r in enumerate(records):
        for key in ("answer", "check"):
            if r.get(key) is None:
                raise DataError(f"{source} record {i}: no '{key}' field, which the verifier reward reads; give "
                                f"every prompt record 'answer' and 'check' (one of {', '.join(CHECKS)}) or use "
                                f"another reward")
        if r["check"] not in CHECKS:
            raise DataError(f"{source} record {i}: check={r['check']!r} is not one of {', '.join(CHECKS)}")


class RunningMoments:
    """Running mean and variance over every value seen (Chan et al.'s parallel Welford update)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, xs: torch.Tensor) -> None:
        n = int(xs.numel())
        if n == 0:
            return
        mean, var = float(xs.double().mean()), float(xs.double().var(unbiased=False))
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += var * n + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def same_ids(policy: Any, other: Any) -> bool:
    """Does ``other`` give every token of ``policy`` the same id?  (The reward model ``lmforge reward`` writes is the
    SFT tokenizer plus a pad token: the policy's rows are its rows.)"""
    if policy.fingerprint == other.fingerprint:
        return True
    theirs = other.hf.get_vocab(with_added_tokens=True)
    return all(theirs.get(t) == i for t, i in policy.hf.get_vocab(with_added_tokens=True).items())


class _Verifier:
    name = "verifier"

    def __call__(self, r: Rollouts) -> torch.Tensor:
        return torch.tensor([verifier_reward(rec, a) for rec, a in zip(r.records, r.answers)], dtype=torch.float32)


class _Function:
    def __init__(self, spec: str) -> None:
        self.name, self.fn = spec, load_function(spec)

    def __call__(self, r: Rollouts) -> torch.Tensor:
        out = []
        for rec, p, a in zip(r.records, r.prompts, r.answers):
            fields = {k: v for k, v in rec.items() if k != "messages"}
            try:
                v = float(self.fn(p, a, fields))
            except Exception as e:  # the user's code: any failure becomes one line naming it and the prompt
                raise DataError(f"reward function {self.name} raised {type(e).__name__}: {e} on prompt "
                                f"{_short(p)!r}; fix the function") from None
            if not math.isfinite(v):
                raise DataError(f"reward function {self.name} returned {v} on prompt {_short(p)!r}; a reward must "
                                f"be a finite float")
            out.append(v)
        return torch.tensor(out, dtype=torch.float32)


class _RewardModel:
    def __init__(self, cfg: RewardConfig, policy_tokenizer: Any, device: torch.device) -> None:
        self.name = f"model:{cfg.model}"
        path = Path(cfg.model)
        if (path / "model").is_dir() and not (path / "config.json").is_file():
            path = path / "model"
        model, tok = load_model(path)
        if not isinstance(model, SequenceClassifier) or not model.scalar:
            raise ModelError(f"rewards[].model='{cfg.model}' is not a reward model (a scalar sequence classifier "
                             f"`lmforge reward` writes); train one with `lmforge reward`")
        same = tok is not None and policy_tokenizer is not None and same_ids(policy_tokenizer, tok)
        if not same and not cfg.retokenize:
            raise ConfigError(f"rewards[].model='{cfg.model}' has another tokenizer than the policy (fingerprint "
                              f"{getattr(tok, 'fingerprint', 'none')[:12]} vs "
                              f"{getattr(policy_tokenizer, 'fingerprint', 'none')[:12]}); train it from the same "
                              f"model or set rewards[].retokenize=true to score the answers' text re-rendered")
        self.model = model.to(device).eval().requires_grad_(False)
        self.format = None if same else ChatFormat(tok)
        self.pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
        self.device = device
        self.normalize = cfg.normalize
        self.moments = RunningMoments()

    @torch.no_grad()
    def scores(self, r: Rollouts) -> torch.Tensor:
        if self.format is None:
            ids, attn = r.input_ids, r.attention_mask
        else:
            rows = [self.format.encode(m + [{"role": "assistant", "content": a}]).ids for m, a in
                    zip(r.messages, r.answers)]
            width = max(len(x) for x in rows)
            ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
            attn = torch.zeros(len(rows), width, dtype=torch.bool)
            for i, x in enumerate(rows):
                ids[i, : len(x)], attn[i, : len(x)] = torch.tensor(x), True
        out = []
        for s in range(0, ids.shape[0], 32):
            logits = self.model(ids[s:s + 32].to(self.device), attention_mask=attn[s:s + 32].to(self.device))
            out.append(logits[:, 0].float().cpu())
        return torch.cat(out)

    def __call__(self, r: Rollouts) -> torch.Tensor:
        s = self.scores(r)
        if not self.normalize:
            return s
        self.moments.update(s)
        return (s - self.moments.mean) / (self.moments.std + 1e-8)


class Rewards:
    """The weighted sum of the configured rewards; ``last`` holds each one's scores of the last batch."""

    def __init__(self, cfgs: Sequence[RewardConfig], policy_tokenizer: Any = None,
                 device: torch.device | str = "cpu") -> None:
        if not cfgs:
            raise ConfigError("rewards is empty; give at least one reward (e.g. rewards=[{kind: verifier}])")
        self.items: list[tuple[float, Any]] = []
        for c in cfgs:
            fn = _Verifier() if c.kind == "verifier" else (
                _Function(c.function) if c.kind == "function" else _RewardModel(c, policy_tokenizer,
                                                                                torch.device(device)))
            self.items.append((float(c.weight), fn))
        self.last: dict[str, torch.Tensor] = {}

    @property
    def uses_verifier(self) -> bool:
        return any(isinstance(fn, _Verifier) for _, fn in self.items)

    def __call__(self, r: Rollouts) -> torch.Tensor:
        total = torch.zeros(len(r.answers), dtype=torch.float32)
        self.last = {}
        for w, fn in self.items:
            s = fn(r)
            self.last[fn.name] = s
            total += w * s
        return total

    def state_dict(self) -> dict[str, Any]:
        return {str(i): fn.moments.state_dict() for i, (_, fn) in enumerate(self.items) if hasattr(fn, "moments")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, (_, fn) in enumerate(self.items):
            if hasattr(fn, "moments") and str(i) in state:
                fn.moments.load_state_dict(state[str(i)])
