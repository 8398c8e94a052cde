"""mamba3-gen: a compiler from declarative Mamba-3 layer specs to Triton kernels."""
from mamba3_gen.version import __version__

__all__ = ["__version__", "load"]


def load(spec_path, out_dir=None):
    """Build (if needed) the spec's kernels and return the generated module (its ``mamba3_forward`` is the op)."""
    from mamba3_gen.backends.triton.build import load_module

    return load_module(spec_path, out_dir=out_dir)
