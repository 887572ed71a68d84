"""Models: decoder LMs (GPT-2, Llama), shared layers, LM-head losses, FLOP counts.

The model families (``lmforge.models.families``) and ``load_model`` / ``save_model`` (``lmforge.models.io``) are
imported on use, not here, to keep imports light.
"""

from lmforge.models.cache import KVCache
from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.flops import config_params, count_params, flops_per_token
from lmforge.models.heads import chunked_cross_entropy, cross_entropy_sum

__all__ = [
    "KVCache", "DecoderConfig", "DecoderLM", "chunked_cross_entropy", "cross_entropy_sum",
    "count_params", "config_params", "flops_per_token",
]
