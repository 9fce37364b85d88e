"""Flax NNX models: the DFlash draft and the frozen target (Llama / Qwen2 / Qwen3)."""
