"""DeepSeekMoE fine-grained and shared experts (Dai et al., 2024), upcycled from the built-in tiny Llama.

Each FFN (intermediate 128) is cut into 4 segments of width 32; 16 routed experts are copies of the
segments (seeded noise breaks their symmetry), 4 are active per token. With preserve=True the dense FFN
itself is the always-on shared part (2 shared experts of width 64) and the routed experts' down
projections start at zero, so the model computes the dense function exactly at init. The first layer
stays dense. Written as a Qwen2MoeForCausalLM checkpoint (shared-expert gate 0, shared down doubled).
"""
from compose import load, moe

dense = load("tiny:llama")
model = moe.fine_grained(dense, segments=4, routed=16, shared=2, top_k=4, preserve=True, noise=0.01, seed=0,
                         first_k_dense=1)
