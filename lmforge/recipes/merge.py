"""`lmforge merge`: a base model + a delta (LoRA/DoRA in PEFT's format, or lmforge's BitFit/modules format)
-> one plain Hugging Face model directory with the delta baked in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open

from lmforge.core.errors import ConfigError, ModelError
from lmforge.core.outputs import check_output_dir
from lmforge.core.io import read_json
from lmforge.delta import load_delta, merge_delta, read_delta_meta
from lmforge.models.families import family_of
from lmforge.models.io import load_model, save_model
from lmforge.models.task import SequenceClassifier, TokenClassifier, ensure_pad_token
from lmforge.recipes.finetune import resolve_model_dir
from lmforge.train.rundir import has_run


def _task_model(base: Any, tokenizer: Any, adapter: Path, meta: dict[str, Any]) -> Any:
    """Wrap ``base`` in the classifier the delta was trained with (its head is part of the delta)."""
    task_type = {"SequenceClassifier": "SEQ_CLS", "TokenClassifier": "TOKEN_CLS"}.get(meta.get("model_class", ""))
    if task_type is None and (adapter / "adapter_config.json").is_file():
        peft_config = read_json(adapter / "adapter_config.json", ModelError, "restore the adapter dir")
        task_type = peft_config.get("task_type") if isinstance(peft_config, dict) else None
    labels = meta.get("id2label")
    if task_type not in ("SEQ_CLS", "TOKEN_CLS"):
        want, family = meta.get("vocab_size"), family_of(base)
        if want and family is not None and family.needs_pad_token and tokenizer is not None \
                and base.config.vocab_size < want:
            ensure_pad_token(base, tokenizer)  # the completion run added a pad token (one more embedding row)
        return base
    if not labels:  # a PEFT classifier adapter without lmforge's metadata: transformers' LABEL_i names
        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
            rows = [f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(("score.weight", "classifier.weight"))]
        if not rows:
            raise ModelError(f"'{adapter}' is a {task_type} adapter without its head weights; it cannot be merged "
                             f"into a classifier")
        labels = [f"LABEL_{i}" for i in range(rows[0])]
    elif isinstance(labels, dict):
        labels = [labels[str(i)] for i in range(len(labels))]
    cls = TokenClassifier if task_type == "TOKEN_CLS" else SequenceClassifier
    if isinstance(base, cls) and base.num_labels == len(labels):
        base.id2label = {i: name for i, name in enumerate(labels)}  # the delta's labels, with its head
        base.label2id = {name: i for i, name in base.id2label.items()}
        return base
    model = cls(getattr(base, "backbone", base), labels)
    if family_of(model).needs_pad_token and tokenizer is not None:
        ensure_pad_token(model, tokenizer)  # as fine-tuning did, so the base matches the one the delta saw
    return model


def check_out(out: Path, base: Path, base_dir: Path, adapter: Path, force: bool) -> None:
    """``--out`` must be a directory of its own: not the base model or the adapter, nor inside or around either of
    them, nor a run dir (even with ``--force``); one holding other files only with ``--force``."""
    where = out.resolve()
    # a run dir given as --base may hold the merged model (RUN_DIR/merged); its model/ and the adapter may not
    for flag, given, inside in (("--base", base, False), ("--base", base_dir, True), ("--adapter", adapter, True)):
        p = given.resolve()
        if where == p or where in p.parents or (inside and p in where.parents):
            how = "is" if where == p else ("holds" if where in p.parents else "is inside")
            raise ConfigError(f"--out '{out}' {how} {flag} '{given}'; merge writes a new model dir next to its inputs, "
                              f"never over them: choose another --out (e.g. '{base_dir.parent / 'merged'}')")
    if has_run(out):
        raise ConfigError(f"--out '{out}' is a run dir (it holds config.yaml / metrics.jsonl / checkpoints); merge "
                          f"writes a model dir: choose another --out (e.g. '{out / 'merged'}')")
    check_output_dir(out, force=force, what=f"--out '{out}'")


def merge(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, check_base: bool = True,
          force: bool = False) -> Path:
    """Base + delta -> ``out_dir``, a plain model dir.  ``force``: write into an ``out_dir`` that holds files
    (only the merged model's files are replaced)."""
    base, adapter, out = Path(base_dir), Path(adapter_dir), Path(out_dir)
    base_dir = resolve_model_dir(str(base))
    check_out(out, base, base_dir, adapter, force)  # before loading anything: a refused --out costs no time
    base, tokenizer = load_model(base_dir)
    meta = read_delta_meta(adapter)
    model = _task_model(base, tokenizer, adapter, meta)
    load_delta(model, adapter, check_base=check_base)
    merge_delta(model)
    model.requires_grad_(False)
    return save_model(model.eval(), out, tokenizer=tokenizer)
