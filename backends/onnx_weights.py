"""ONNX weights stored in half precision: a bf16 or fp16 build's graphs hold float16 initializers, cast to
float32 inside the graph, instead of the float32 copy the exporter writes (twice the checkpoint's size).

The graph computes in float32 either way (onnxruntime's CPU provider runs float16 and bfloat16 matmuls
for few ops and no bfloat16 ones), so what changes is the file, not the arithmetic. A tensor is stored
as float16 only when float16 holds it: every bfloat16 or float16 weight does, to within float16's
subnormal spacing for magnitudes under 6.1e-5 (an error of at most 2**-25). A float32 constant of the
computation itself (rope frequencies, a mask's fill value) does not, and stays float32.
"""
from __future__ import annotations

HALF_DTYPES = ("bfloat16", "float16")
_TOLERANCE = 2.0 ** -25


def store_half(model) -> dict:
    """Rewrite the float32 initializers of `model` (an onnx_ir Model) that float16 holds as float16
    initializers behind a Cast to float32; return what was stored how."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    first = graph[0]
    half = kept = 0
    for name, value in list(graph.initializers.items()):
        if value.const_value is None or value.dtype != ir.DataType.FLOAT or not value.uses():
            continue
        arr = value.const_value.numpy()
        with np.errstate(over="ignore"):
            small = arr.astype(np.float16)
        if not np.isfinite(small).all() or np.abs(small.astype(np.float32) - arr).max(initial=0) > _TOLERANCE:
            kept += 1
            continue
        stored = ir.Value(name=f"{name}.float16", shape=value.shape, type=ir.TensorType(ir.DataType.FLOAT16),
                          const_value=ir.tensor(small, name=f"{name}.float16"))
        graph.register_initializer(stored)
        cast = ir.Node("", "Cast", [stored], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)], name=f"{name}.cast")
        ir.convenience.replace_all_uses_with(value, cast.outputs[0])
        graph.initializers.pop(name)
        cast.outputs[0].name = name
        graph.insert_before(first, cast)
        half += 1
    return {"float16": half, "float32": kept}
