"""Evaluation: perplexity / bits-per-byte, masked-LM and span scores, task metrics, and the generation engine."""

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
