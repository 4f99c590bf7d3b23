"""Code generation: jinja2 templates and the code that fills them with a Graph's hyper-parameters."""
from compose.codegen.render import render_files, render_modeling

__all__ = ["render_modeling", "render_files"]
