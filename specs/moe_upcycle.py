"""Mixtral-style sparse upcycling (Komatsuzaki et al., 2023) of the built-in tiny Llama.

Every FFN is copied into 8 experts behind a top-2 router. The copies are identical, so at init the model
computes the dense function (here exactly: a zero router gives top-2 weights of 1/2 and 1/2); add
`noise=...` to break the symmetry of the copies. The output is a native MixtralForCausalLM checkpoint.
"""
from compose import load, moe

dense = load("tiny:llama")
model = moe.upcycle(dense, num_experts=8, top_k=2, router=moe.zeros())
