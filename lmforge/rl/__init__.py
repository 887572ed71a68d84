"""Loops that generate (PPO, GRPO): rollouts on the generation engine, rewards, and what each algorithm adds.

Layer: between train/eval (which it uses) and recipes (which wire it); see docs/ARCHITECTURE.md."""
