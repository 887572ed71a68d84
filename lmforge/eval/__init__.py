"""Evaluation: perplexity / bits-per-byte and the generation engine (shared by generate, RL and serving)."""

from lmforge.eval.generate import GenerationConfig, GenerationResult, generate, generate_text
from lmforge.eval.perplexity import perplexity, perplexity_of_tokens, unigram_perplexity

__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "generate",
    "generate_text",
    "perplexity",
    "perplexity_of_tokens",
    "unigram_perplexity",
]
