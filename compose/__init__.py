"""compose: a declarative graph-IR compiler for composing large language models.

    from compose import load, expand_blocks, depth_upscale, layers, stack
    model = expand_blocks(load("tiny:llama"), groups=4)

Importing compose is cheap: torch and transformers load only when a build runs.
"""
__version__ = "0.1.0"

from compose import merge, moe  # noqa: E402
from compose.dsl import calm, depth_upscale, expand_blocks, layers, load, stack, visual_expert  # noqa: E402
from compose.errors import ComposeError  # noqa: E402
from compose.training import freeze, trainable_summary  # noqa: E402  (torch loads lazily)


def build(spec, out, **kwargs):
    """Build a spec (a DSL object, a BuildSpec, or a spec file path) into the folder `out`."""
    from compose.pipeline import build as _build

    return _build(spec, out, **kwargs)


__all__ = ["calm", "visual_expert", "load", "expand_blocks", "depth_upscale", "layers", "stack", "merge", "moe", "build", "freeze", "trainable_summary", "ComposeError",
           "__version__"]
