"""Model Stock: interpolate between the base (pre-trained) model and the average of k >= 2 fine-tuned
models, with a ratio set by the angle between their task vectors (Jang et al., Model Stock: All we need
is just a few fine-tuned models, https://arxiv.org/abs/2403.19522), as mergekit 0.1.5 computes it.

With B the base and M_1..M_k the other models (k >= 2), d_i = M_i - B:

    cos  = mean over pairs i < j of <d_i, d_j> / max(|d_i| |d_j|, 1e-6)    (each clamped to [-1, 1])
    t    = k cos / (1 + (k - 1) cos)                    (0, i.e. the base, when |1 + (k-1) cos| < 1e-6)
    out  = t * mean_i(M_i) + (1 - t) * B

over the whole tensor flattened, or with filter_wise one t per slice along the last dim (per row of a
matrix; a 1-D tensor is one row). Computed in the inputs' dtype.
"""
from __future__ import annotations

from compose.merges.api import Method, Param


def model_stock(tensors, base, *, seed=None, name="", filter_wise=False):
    import torch

    if base is None:
        raise ValueError("model_stock needs a base model (base_model)")
    w0 = tensors[base]
    ws = [x for i, x in enumerate(tensors) if i != base]
    if len(ws) < 2:
        raise ValueError(f"model_stock needs at least two models besides the base; got {len(ws)}")
    shape = w0.shape
    if not filter_wise:
        w0, ws = w0.reshape(-1), [x.reshape(-1) for x in ws]
    elif w0.dim() == 1:
        w0, ws = w0.unsqueeze(0), [x.unsqueeze(0) for x in ws]

    deltas = [x - w0 for x in ws]
    cosines = []
    for i, da in enumerate(deltas):
        for db in deltas[i + 1:]:
            norms = torch.linalg.vector_norm(da, dim=-1) * torch.linalg.vector_norm(db, dim=-1)
            cosines.append(((da * db).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denominator = 1 + (k - 1) * cos
    # At cos = -1/(k-1) the ratio has a pole: keep the base there rather than amplify opposing updates.
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    (k * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    average = ws[0]
    for x in ws[1:]:
        average = average + x
    average = average / k
    return (t * average + (1 - t) * w0).reshape(shape)


METHODS = [Method("model_stock", model_stock, base="required", params=(Param("filter_wise", "shared", False, bool),),
                  min_inputs=3, reference="https://arxiv.org/abs/2403.19522")]
