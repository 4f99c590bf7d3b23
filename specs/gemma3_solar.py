"""SOLAR depth up-scaling of a Gemma 3 (the built-in tiny one; use `load("google/gemma-3-1b-pt")` for the real
model): two copies, the top 2 layers cut from one and the bottom 2 from the other, stacked, written as
Gemma3ForCausalLM. Each layer keeps its sliding or global kind (and rope) from its source layer, and
layer_types is written to match."""
from compose import depth_upscale, load

model = depth_upscale(load("tiny:gemma3"), drop=2)
