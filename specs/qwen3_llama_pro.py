"""LLaMA-Pro block expansion of a Qwen3 (the built-in tiny one; use `load("Qwen/Qwen3-0.6B")` for the real
model): one identity block after each quarter, written as Qwen3ForCausalLM, its q/k norms copied."""
from compose import expand_blocks, load

model = expand_blocks(load("tiny:qwen3"), groups=4)
