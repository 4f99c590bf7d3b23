"""Karcher mean: the Riemannian (Frechet) mean of the models' directions on the unit hypersphere, scaled
by their mean norm (https://arxiv.org/abs/2603.04972; mergekit 0.1.5's "karcher"). Every input counts
equally, the base model too when one is given (mergekit ignores the base role for this method).

With x_i the n inputs flattened and alpha = 1/n:

    u_i = x_i / |x_i|, keeping only inputs with |x_i| > tol (their alphas renormalised to sum to 1)
    m   = normalise(sum_i alpha_i u_i)                (u_0 of the kept inputs when that sum is ~0)
    repeat up to max_iter times (Riemannian gradient descent):
        theta_i = arccos(<m, u_i>)                    (inputs with theta_i < tol contribute nothing)
        v = sum_i alpha_i theta_i / sin(theta_i) * (u_i - cos(theta_i) m)     # log map, averaged
        stop when |v| < tol
        m = normalise(cos|v| m + sin|v| v / |v|)                              # exponential map
    out = (sum_i |x_i| / n) * m

Norms are taken in float32 (float64 for float64 inputs); the directions and iterates stay in the inputs'
dtype, as in mergekit.
"""
from __future__ import annotations

from compose.merges.api import Method, Param


def karcher_mean(tensors, alphas, max_iter: int = 10, tol: float = 1e-5):
    import torch

    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(dtype)) for x in tensors]          # 0-dim, full precision
    kept = [i for i, n in enumerate(norms) if n.item() > tol]
    if not kept:
        return torch.zeros_like(tensors[0])
    units = [(tensors[i] / norms[i]).to(tensors[i].dtype) for i in kept]
    alpha_sum = sum(alphas[i] for i in kept)
    weights = [alphas[i] / alpha_sum for i in kept]

    mean = torch.zeros_like(units[0])
    for a, u in zip(weights, units):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, units):
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - cos * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        norm = torch.linalg.vector_norm(mean.to(dtype))
        if norm.item() > tol:
            mean = (mean / norm).to(mean.dtype)

    scale = sum(a * n for a, n in zip(alphas, norms))              # every input's norm, dropped ones too
    return scale * mean


def karcher(tensors, base, *, seed=None, name="", max_iter=10, tol=1e-5):
    if not tensors:
        raise ValueError("karcher needs at least one model")
    return karcher_mean(tensors, [1.0 / len(tensors)] * len(tensors), max_iter=int(max_iter), tol=float(tol))


METHODS = [Method("karcher", karcher, base="ignored",
                  params=(Param("max_iter", "shared", 10, int), Param("tol", "shared", 1e-5)),
                  min_inputs=1, reference="https://arxiv.org/abs/2603.04972")]
