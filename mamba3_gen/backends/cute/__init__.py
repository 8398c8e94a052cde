"""CuTe DSL (CUTLASS Python DSL) backend: the decode step kernel, rendered from templates/cute/step.py.jinja."""
from mamba3_gen.backends.cute.build import render_step, step_layout, template_hash

__all__ = ["render_step", "step_layout", "template_hash"]
