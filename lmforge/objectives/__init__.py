"""Objectives: each a collator (token windows or examples -> a batch) and a summed loss on a model's output.

The seam is :mod:`lmforge.objectives.base`.  Pretraining: ``causal_lm``, ``mlm`` (+ NSP), ``span`` (corruption;
its loss ``seq2seq``), registered by name in ``registry``.  Fine-tuning: ``classification``,
``token_classification``, ``text_to_text``, ``completion`` (their shared encoding and padding: ``encoding``).
Between ``models`` (which they run) and ``train`` (which drives them); their evaluators are in ``lmforge.eval``.
"""
