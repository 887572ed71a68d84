"""lmforge: a language model through its whole life, in one small PyTorch-native code base."""

__version__ = "0.1.0"
