"""TIES-Merging (Yadav et al., 2023): trim each task vector to its largest `density` fraction, elect a
sign per parameter, and average the agreeing entries onto the base. Tiny stand-ins for base and fine-tunes."""
from compose import load, merge

base = load("tiny:llama")
model = merge.ties(base=base, models=[load("tiny:llama?seed=1"), load("tiny:llama?seed=2")],
                   density=[0.3, 0.6], weights=[1.0, 0.5])
