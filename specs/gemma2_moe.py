"""DeepSeekMoE (Dai et al., 2024) of the built-in tiny Gemma 2: no transformers class holds a Gemma MoE, so
it is written as compose's generated code behind an auto_map (family `compose_moe`).

Each FFN is cut into 4 segments; 8 routed experts (segment e % 4 each) behind a top-2 router, and with
`preserve=True` the dense FFN itself as the always-on shared expert, with every routed expert's down
projection zero: at init the model is the dense Gemma 2. Load the output with
`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`; `--after target` shows the class.
"""
from compose import load, moe

dense = load("tiny:gemma2?layers=4")
model = moe.fine_grained(dense, segments=4, routed=8, shared=2, top_k=2, preserve=True)
