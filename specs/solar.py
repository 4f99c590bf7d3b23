"""SOLAR depth up-scaling (Kim et al., 2023) on an 8-layer tiny Llama.

Two copies of the model: layers [0, n-drop) of the first, then layers [drop, n) of the second, so 8 layers
with drop=2 become 12. SOLAR 10.7B is this with n=32, drop=8.
"""
from compose import depth_upscale, load

model = depth_upscale(load("tiny:llama?layers=8"), drop=2)
