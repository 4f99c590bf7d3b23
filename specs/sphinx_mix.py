"""SPHINX's weight mix (Lin et al., 2023): theta = beta * theta_1 + (1 - beta) * theta_2, tensor by tensor.

On the built-in tiny Llama with two seeds standing in for two fine-tunes of one base; point `load` at
real folders to mix real models.
"""
from compose import load, merge

beta = 0.6
model = merge.linear([load("tiny:llama?seed=1"), load("tiny:llama?seed=2")], weights=[beta, 1 - beta])
