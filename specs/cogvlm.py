"""CogVLM visual experts (Wang et al., 2023) on the built-in tiny Llama.

Every layer gets vision QKV, output projection and FFN copied from its language weights, used for image
tokens only (token_type_ids 1: begin-of-image and patches); image features of width 96 come in through
a two-layer MLP adapter. Text-only input gives the language model's logits exactly; only the visual
experts and the adapter train. Written as generated code with an auto_map.
"""
from compose import load, visual_expert

model = visual_expert(load("tiny:llama"), vision_width=96)
