"""Model families: one module per family registers its :class:`Family`; the registry is :mod:`.base`'s.

Built in, in this order: ``gpt2``, ``llama`` (model_types llama, qwen2, mistral), ``bert``, ``t5``.  A new family
is one :func:`register_family` call, from anywhere (see ``docs/ARCHITECTURE.md`` for what it provides).
"""

from lmforge.models.families.base import Family, families, family_for_hf_config, family_of, get_family, register_family
from lmforge.models.families import gpt2, llama, bert, t5  # noqa: E402, F401, I001  (registers them, in this order)

__all__ = ["Family", "families", "family_for_hf_config", "family_of", "get_family", "register_family"]
