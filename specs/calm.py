"""CALM (Bansal et al., 2024) on the built-in tiny models: an 8-layer Llama anchor cross-attends to a
4-layer, wider Qwen2 augmenting model.

With every=2, augmenting layers 0 and 2 feed cross-attention layers after anchor layers 0 and 4
(lucidrains/CALM-pytorch's rule). Each new layer projects the augmenting states to the anchor's width and
starts with a zero output projection, so the composed model's logits equal the anchor's exactly until it
trains; only the cross-attention layers train. Written as generated code with an auto_map:
AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True) loads it offline.
"""
from compose import calm, load

model = calm(anchor=load("tiny:llama?layers=8"), augment=load("tiny:qwen2?layers=4&hidden=128&intermediate=256"),
             every=2, heads=4)
