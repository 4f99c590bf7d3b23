"""Passthrough stacking (mergekit's `passthrough` with `slices`): layers of two models of one family and
width, stacked. Embeddings come from the first slice's model, final norm and head from the last's."""
from compose import layers, load, stack

a = load("tiny:llama?seed=0")
b = load("tiny:llama?seed=1")
model = stack(layers(a, 0, 6), layers(b, 2, 8))
