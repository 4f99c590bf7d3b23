"""LLaMA-Pro block expansion (Wu et al., 2024) on the built-in tiny Llama.

The 8 layers split into 4 groups of 2; after each group comes one new block, a copy of the block before
it with o_proj and down_proj zeroed, so the 12-layer result computes exactly the original function.
Only the new blocks are trainable (see compose.json's "trainable").
"""
from compose import expand_blocks, load

base = load("tiny:llama")          # swap in a local HF folder or hub id for a real model
model = expand_blocks(base, groups=4, per_group=1)
