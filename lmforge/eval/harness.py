"""lmforge's decoders inside lm-evaluation-harness (the optional extra ``harness``: lm_eval==0.4.13).

:func:`register` registers the model type ``lmforge`` with lm-eval (``register_model``): any lmforge or HF model dir
lmforge reads, run by lmforge's own code -- log-likelihoods by :func:`lmforge.eval.choice.score_requests` (each
context once for all its continuations), rolling log-likelihoods over lm-eval's disjoint windows, and
``generate_until`` by lmforge's KV-cached engine (greedy unless ``temperature`` is given, cut at the ``until``
strings).  Tokenisation and the context/continuation split are lm-eval's own (``TemplateLM``), on lmforge's
tokenizer (special tokens as its post-processor adds them, as HFLM's default).  :func:`run_harness` calls
``lm_eval.simple_evaluate`` with a model of that type.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.core.device import resolve_device
from lmforge.core.errors import ConfigError, ModelError
from lmforge.eval.choice import check_decoder, score_requests
from lmforge.eval.generate import GenerationConfig, generate_text
from lmforge.models.io import load_model

MODEL_NAME = "lmforge"
_REGISTERED: dict[str, type] = {}


def _lm_eval():
    try:
        # optional extra: pip install 'lmforge[harness]' (lm_eval==0.4.13)
        import lm_eval
        # optional extra: pip install 'lmforge[harness]'
        from lm_eval.api.model import TemplateLM
        # optional extra: pip install 'lmforge[harness]'
        from lm_eval import utils as lm_utils
    except ImportError as e:
        raise ConfigError("`lmforge eval harness` needs lm-evaluation-harness: pip install 'lmforge[harness]' "
                          f"(lm_eval==0.4.13); importing it failed: {e}") from None
    return lm_eval, TemplateLM, lm_utils


def _model_class() -> type:
    """lmforge's ``TemplateLM`` subclass (built once: lm-eval is imported only when asked for)."""
    if "cls" in _REGISTERED:
        return _REGISTERED["cls"]
    _, TemplateLM, lm_utils = _lm_eval()

    class LmforgeLM(TemplateLM):
        def __init__(self, pretrained: str, device: str = "auto", batch_tokens: int | str = 4096,
                     max_gen_toks: int | str = 256, **_: Any) -> None:
            super().__init__()
            model, tok = load_model(pretrained, device=resolve_device(device))
            check_decoder(model, pretrained, "eval harness")
            if tok is None:
                raise ModelError(f"model directory '{pretrained}' has no tokenizer.json; save the tokenizer beside "
                                 f"the model")
            self.model, self.tokenizer = model.eval(), tok
            self.batch_tokens, self.max_gen_toks = int(batch_tokens), int(max_gen_toks)

        @property
        def eot_token_id(self) -> int:
            eos = self.tokenizer.eos_id
            return eos if eos is not None else self.tokenizer.bos_id

        @property
        def max_length(self) -> int:
            return int(self.model.config.max_seq_len)

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            return self.tokenizer.encode(string, add_special_tokens=True if add_special_tokens is None
                                         else add_special_tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any):
            with torch.inference_mode():
                return score_requests(self.model, [(ctx, cont) for _, ctx, cont in requests], self.batch_tokens)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for (string,) in [r.args for r in requests]:
                windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                    self.tok_encode(string), self.prefix_token_id, self.max_length, 1)]
                with torch.inference_mode():
                    out.append(sum(ll for ll, _ in score_requests(self.model, windows, self.batch_tokens)))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for context, gen_kwargs in [r.args for r in requests]:
                kw = dict(gen_kwargs)
                until = kw.pop("until", None) or [self.tokenizer.decode([self.eot_token_id])]
                until = [until] if isinstance(until, str) else list(until)
                cfg = GenerationConfig(max_new_tokens=int(kw.pop("max_gen_toks", self.max_gen_toks)),
                                       temperature=float(kw.pop("temperature", 0.0) or 0.0), stop=until)
                with torch.inference_mode():
                    text = generate_text(self.model, self.tokenizer, [context], cfg)[0].text
                for stop in until:  # lm-eval's rule: the text before the first stop string
                    text = text.split(stop)[0]
                out.append(text)
            return out

    _REGISTERED["cls"] = LmforgeLM
    return LmforgeLM


def register() -> type:
    """Register lmforge's model type with lm-eval (once); returns the class."""
    lm_eval, _, _ = _lm_eval()
    cls = _model_class()
    # optional extra: pip install 'lmforge[harness]'
    from lm_eval.api.registry import register_model
    # lm-eval fills its registry with its own models (hf, vllm, ...) only while it is empty: load them first, or
    # registering ours would hide them (optional extra: pip install 'lmforge[harness]')
    import lm_eval.models  # noqa: F401
    if not _REGISTERED.get("done"):
        try:
            register_model(MODEL_NAME)(cls)
        except (AssertionError, ValueError):  # already registered in this process
            pass
        _REGISTERED["done"] = True
    return cls


def run_harness(model_dir: str, tasks: list[str], *, num_fewshot: int | None = None, limit: float | None = None,
                include_path: str | None = None, device: str = "auto", batch_tokens: int = 4096,
                fewshot_seed: int = 1234, log_samples: bool = False, model_type: str = MODEL_NAME,
                gen_kwargs: str | None = None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``model_dir`` as lmforge's model (``model_type="hf"``: lm-eval's own HFLM on
    the same dir, for comparison).  Tasks from lm-eval's registry or ``include_path`` (a folder of task YAMLs);
    an unknown task is one line listing where tasks were looked for."""
    lm_eval, _, _ = _lm_eval()
    # optional extra: pip install 'lmforge[harness]'
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f"lm-eval's registry and {include_path}" if include_path else "lm-eval's registry"
        raise ConfigError(f"unknown lm-eval task {', '.join(map(repr, unknown))} (looked in {where}); name a "
                          f"registered task or pass --include-path DIR holding its YAML")
    if model_type == MODEL_NAME:
        register()
        model_args = f"pretrained={model_dir},device={device},batch_tokens={batch_tokens}"
    elif model_type == "hf":
        model_args = f"pretrained={model_dir},dtype=float32"
    else:
        raise ConfigError(f"--model-type {model_type!r}: use lmforge (the default) or hf (lm-eval's HFLM)")
    return lm_eval.simple_evaluate(model=model_type, model_args=model_args, tasks=list(tasks),
                                   num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                   device=None if model_type == MODEL_NAME else "cpu",
                                   log_samples=log_samples, fewshot_random_seed=fewshot_seed, gen_kwargs=gen_kwargs)
