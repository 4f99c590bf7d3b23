"""An MoE from four dense models (mergekit-moe's construction), on built-in tiny models.

Attention, norms and embeddings come from the base; expert e of every layer is model e's FFN; each
router row is the base model's normalised hidden state on that expert's prompts (the `hidden` gate mode).
Swap in fine-tuned models of one base for real use.
"""
from compose import load, moe

base = load("tiny:llama")
experts = [load(f"tiny:llama?seed={s}") for s in (1, 2, 3, 4)]
model = moe.from_experts(base=base, experts=experts, top_k=2, router=moe.hidden_router(
    prompts=[["def f(x):", "import numpy as np"], ["Once upon a time"], ["The integral of"], ["Bonjour"]],
    negative=[[], [], [], ["Hello"]]))
