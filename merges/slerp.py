"""SLERP: spherical linear interpolation between a base model and one other model (Shoemake 1985,
https://en.wikipedia.org/wiki/Slerp), as mergekit 0.1.5 computes it.

Each output tensor is flattened to one vector per model, v0 (the base) and v1 (the other):

    cos(theta) = <v0 / |v0|, v1 / |v1|>                 # a norm <= eps counts as 1; clamped to [-1, 1]
    out = sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1
    out = (1 - t) v0 + t v1                             # instead, when |cos(theta)| > 0.9995

so t = 0 gives the base and t = 1 the other model. The angle comes from the directions, but the
coefficients multiply the tensors as they are: inputs of equal norm give a result of that norm. The
tensor's name plays no part (embeddings and norms are merged like any other tensor). Computed in float32
(float64 for float64 inputs) in chunks of 2**20 elements, and returned in the inputs' dtype; norms and
the dot product are accumulated chunk by chunk as mergekit does (the norm of the chunks' norms), so the
results agree bit for bit.
"""
from __future__ import annotations

from compose.merges.api import Method, Param

CHUNK = 1 << 20
"""Elements per chunk of full-precision scratch (mergekit's _CHUNK_ELEMENTS for one output tensor)."""
DOT_THRESHOLD = 0.9995
"""Above this |cos(theta)| the two vectors are taken as colinear and interpolated linearly."""
EPS = 1e-8


def slerp(tensors, base, *, seed=None, name="", t):
    import torch

    if len(tensors) != 2 or base is None:
        raise ValueError(f"slerp interpolates a base model and exactly one other model; got {len(tensors)} "
                         f"input(s){' and no base' if base is None else ''}")
    v0, v1 = tensors[base], tensors[1 - base]
    if not v0.is_floating_point():
        raise ValueError(f"slerp needs floating-point tensors, got {v0.dtype}")
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    t = torch.tensor(float(t), dtype=dtype, device=v0.device)
    a, b = v0.reshape(-1), v1.reshape(-1)
    if a.numel() == 0:
        return v0.clone()
    spans = [(s, min(s + CHUNK, a.numel())) for s in range(0, a.numel(), CHUNK)]
    # Two float32 chunk buffers, reused for every pass (fresh temporaries per chunk fragment the allocator's
    # heap: about the size of the tensor again in anonymous memory at 3B). In-place ops on the same values
    # round as the expressions they replace, so the results are mergekit's bit for bit.
    n = min(CHUNK, a.numel())
    buf_a = torch.empty(n, dtype=dtype, device=v0.device)
    buf_b = torch.empty(n, dtype=dtype, device=v0.device)

    def part(buf, x, span):
        return buf[:span[1] - span[0]].copy_(x[span[0]:span[1]])

    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(part(buf_a, a, s)) for s in spans]))
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(part(buf_b, b, s)) for s in spans]))
    norm_a = torch.where(norm_a > EPS, norm_a, 1)                   # a zero vector keeps its values
    norm_b = torch.where(norm_b > EPS, norm_b, 1)
    # each chunk is normalised before multiplying, so large weights cannot overflow the dot product
    dot = torch.stack([part(buf_a, a, s).div_(norm_a).mul_(part(buf_b, b, s).div_(norm_b)).sum()
                       for s in spans]).sum().clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)

    out = torch.empty_like(a)                                        # in the inputs' dtype
    for s in spans:
        out[s[0]:s[1]] = part(buf_a, a, s).mul_(coef_a).add_(part(buf_b, b, s).mul_(coef_b))
    return out.reshape(v0.shape)


METHODS = [Method("slerp", slerp, base="required", params=(Param("t", "shared"),), min_inputs=2, max_inputs=2,
                  reference="https://en.wikipedia.org/wiki/Slerp")]
