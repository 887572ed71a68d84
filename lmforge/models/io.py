"""``load_model`` / ``save_model``: any model directory, whatever the family.

A language model's directory goes to its family (by ``model_type`` in ``config.json``, or by ``config.family``
of the model); classifiers (``*ForSequenceClassification`` / ``*ForTokenClassification`` directories, and
:mod:`lmforge.models.task`'s models) to :mod:`lmforge.models.hf_task`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.core.errors import ModelError
from lmforge.core.finite import first_nonfinite
from lmforge.models.families import family_for_hf_config, family_of
from lmforge.models.hf_task import load_task_model, save_task_model, task_of_config
from lmforge.models.model_dir import require_model_dir, unwrap_model
from lmforge.models.task import SequenceClassifier, TokenClassifier


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32
               ) -> tuple[torch.nn.Module, Any]:
    """Any supported model directory -> ``(model in eval mode, Tokenizer or None)``: by ``model_type``, the
    registered family that loads it (gpt2; llama, qwen2, mistral; bert; t5), and classification directories
    as lmforge's classifiers.  ``dtype=None`` keeps the stored dtype."""
    d = Path(path)
    hf_config = require_model_dir(d)
    if task_of_config(hf_config) is not None:
        return load_task_model(d, device=device, dtype=dtype)
    return family_for_hf_config(hf_config, source=str(d)).load(d, device=device, dtype=dtype)


def save_model(model: torch.nn.Module, path: str | Path, tokenizer: Any = None,
               generation_config: dict[str, Any] | None = None) -> Path:
    """Write any lmforge model as a HF checkpoint directory (atomically), by the model's family;
    classifiers (:mod:`lmforge.models.task`) as transformers' task models.  A model holding a NaN or an infinity
    is refused (a ModelError naming the tensor; nothing is written): no model dir lmforge writes is non-finite."""
    bad = first_nonfinite(model.state_dict())
    if bad is not None:
        raise ModelError(f"weight '{bad}' of the model to save holds NaN or infinite values; nothing was written to "
                         f"{path} — the model diverged or was built from non-finite weights: save an earlier "
                         f"checkpoint's weights instead")
    if isinstance(unwrap_model(model), (SequenceClassifier, TokenClassifier)):
        return save_task_model(model, path, tokenizer=tokenizer)
    family = family_of(model)
    if family is None:  # the words of the decoder saver, which got every other model before the registry
        raise ModelError(f"save_decoder expects a DecoderLM, got {type(unwrap_model(model)).__name__}")
    return family.save(model, path, tokenizer=tokenizer, generation_config=generation_config)
