"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691): the backbone stays frozen and ``n`` soft-prompt vectors
in front of its input embeddings train.  The backbone's ``input`` slot does the prepending
(:mod:`lmforge.models.slots`); this module builds and initialises the prompt:

* ``vocab`` (default): the embeddings of ``n`` vocabulary tokens drawn at random -- the paper's "sampled
  vocabulary" init, which the paper found better than random init at small model sizes;
* ``text``: the embeddings of ``prompt_init_text``'s tokens, repeated or cut to ``n`` (PEFT's TEXT init);
* ``random``: N(0, s^2) with s the embedding matrix's own standard deviation, so the prompt starts at the
  scale of real words (PEFT's RANDOM init is N(0, 1), far off that scale for most models).

Saved in PEFT's PROMPT_TUNING format (``prompt_embeddings [n, d]``) except on a bare BERT, and never merged (the
prompt is an extra input, not a weight change).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.core.errors import ConfigError, ModelError
from lmforge.delta.config import DeltaConfig
from lmforge.delta.peft_format import (PROMPT_PREFIX, head_names, head_state, load_prompt_learning, prompt_table,
                                       task_type, virtual_tokens)
from lmforge.delta.registry import DeltaMethod, register
from lmforge.delta.surgery import backbone_of, slot_of, start_token_ids
from lmforge.models.slots import INPUT

SLOT_NAME = "soft_prompt"  # the backbone's submodule: parameters ``soft_prompt.weight``


class SoftPrompt(nn.Module):
    """``weight [n, d]``; ``prompt(batch_size, dtype) -> [B, n, d]`` (the ``input`` slot's contract)."""

    def __init__(self, n: int, d: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, d, device=device, dtype=dtype))
        self.reset_parameters()

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)  # the delta method re-initialises (vocabulary, text or random)

    def forward(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype).expand(batch_size, -1, -1)

    def extra_repr(self) -> str:
        return f"n={self.n}, d={self.weight.shape[1]}"


def add_soft_prompt(model: nn.Module, n: int, init: str = "vocab", text: str | None = None,
                    tokenizer: Any = None) -> SoftPrompt:
    """Put a trainable ``n``-vector soft prompt into ``model``'s backbone, initialised by ``init``."""
    backbone = backbone_of(model)
    if backbone.slot(INPUT) is not None:
        raise ConfigError("this model already carries a soft prompt; start from the base model")
    if n < 1:
        raise ConfigError(f"peft.num_virtual_tokens={n} must be >= 1")
    table = backbone.get_input_embeddings().weight  # [V, d]
    if init not in ("vocab", "text", "random"):
        raise ConfigError(f"peft.prompt_init={init!r}; valid: vocab, text, random")
    with torch.no_grad():
        if init == "random":
            start = torch.randn(n, table.shape[1], device=table.device, dtype=table.dtype) * table.float().std()
        else:
            start = table[start_token_ids(n, init, text, tokenizer, table.shape[0], table.device)]
    prompt = SoftPrompt(n, table.shape[1], device=table.device, dtype=table.dtype)
    with torch.no_grad():
        prompt.weight.copy_(start)
    backbone.fill_slot(INPUT, SLOT_NAME, prompt)
    return prompt


def _prompt(model: nn.Module) -> SoftPrompt | None:
    prompt = slot_of(model, INPUT)
    return prompt if isinstance(prompt, SoftPrompt) else None


class PromptTuning(DeltaMethod):
    """``prompt``: a soft prompt in the backbone's ``input`` slot."""

    name = "prompt"
    order = 20  # before LoRA: the prompt's random start is drawn first
    peft_type = "PROMPT_TUNING"
    # Lester et al.'s 0.3 is Adafactor's; with AdamW (seed 0, 600 steps, the 2000-step GPT-2 on world sentiment)
    # 2e-2 -> 0.728 beat 5e-2 -> 0.706 (benchmarks/RESULTS.md, "Per-method defaults")
    train_defaults = {"lr": 2e-2}

    def apply(self, model: nn.Module, cfg: DeltaConfig, tokenizer: Any) -> list[str]:
        add_soft_prompt(model, cfg.num_virtual_tokens, cfg.prompt_init, cfg.prompt_init_text, tokenizer)
        return []

    def present(self, model: nn.Module) -> bool:
        return _prompt(model) is not None

    def owns(self, name: str) -> bool:
        return SLOT_NAME in name.split(".")

    def disable(self, model: nn.Module, cfg: DeltaConfig, off: bool) -> None:
        backbone_of(model).switch_slot(INPUT, SLOT_NAME, not off)

    # ---- PEFT's PROMPT_TUNING format --------------------------------------------------------------------------
    def peft_supported(self, model: nn.Module) -> bool:
        return type(model).__name__ != "EncoderLM"  # transformers' bare BertModel has no prompt-tuning task type

    def peft_files(self, model: nn.Module, cfg: DeltaConfig, base_model: str | None
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """PEFT's PROMPT_TUNING config for the model's soft prompt: one transformer submodule (the prompt is the
        encoder's for T5, as PEFT's ``generate`` uses it); the init is recorded as RANDOM, since PEFT would fetch a
        tokenizer for TEXT and the vectors are trained anyway."""
        prompt = _prompt(model)
        c = model.config
        config = {"peft_type": "PROMPT_TUNING", "task_type": task_type(model), "num_virtual_tokens": prompt.n,
                  "token_dim": prompt.weight.shape[1], "num_transformer_submodules": 1,
                  "num_attention_heads": getattr(c, "n_head", getattr(c, "num_heads", None)),
                  "num_layers": getattr(c, "n_layer", getattr(c, "num_layers", None)),
                  "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
                  "inference_mode": True, "base_model_name_or_path": base_model, "modules_to_save": head_names(model)}
        return config, {"prompt_embeddings": prompt.weight, **head_state(model, PROMPT_PREFIX)}

    def config_from_peft(self, pc: dict[str, Any], where: str) -> DeltaConfig:
        return DeltaConfig(method="prompt", num_virtual_tokens=virtual_tokens(pc, where), prompt_init="random")

    def load_peft(self, model: nn.Module, state: dict[str, torch.Tensor], d: Path, pc: dict[str, Any]) -> None:
        """``prompt_embeddings [k * n, d]``: k transformer submodules (T5 adapters from PEFT default to 2, encoder
        rows first; lmforge prompts the encoder, as PEFT's ``generate`` does), so the first ``n`` rows."""
        table = prompt_table(state, d)
        target = _prompt(model).weight
        rows, dim = target.shape
        if table.ndim != 2 or table.shape[1] != dim or table.shape[0] % rows:
            raise ModelError(f"'{d}': prompt_embeddings has shape {tuple(table.shape)}; this model needs "
                             f"[{rows}·k, {dim}] (token_dim {dim}); load it onto the model it was trained for")
        load_prompt_learning(model, state, d, target, table[:rows])


register(PromptTuning())
