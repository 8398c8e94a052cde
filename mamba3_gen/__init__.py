"""mamba3-gen: a compiler from declarative Mamba-3 layer specs to Triton kernels."""
from mamba3_gen.errors import BuildError, DeviceError, FileSystemError, InputError, Mamba3GenError, SpecError
from mamba3_gen.version import __version__

__all__ = ["__version__", "load", "cache_dir", "Mamba3", "Mamba3GenError", "SpecError", "BuildError",
           "FileSystemError", "InputError", "DeviceError"]


def load(spec, arch=None, *, out_dir=None, force=False):
    """Build (if needed) a spec's kernels and import them; returns the generated module (``mamba3_forward``,
    ``mamba3_step``, ``META``).

    Args:
        spec: a path to a YAML spec, YAML text, a dict (as the YAML would parse) or a ``Spec``.
        arch: the target whose limits the kernels must fit (``"sm_90a"``, ``"sm_80"``, ``"sm_89"``, ``"sm_120"``,
            ``"interpreter"``); None: the current CUDA GPU's, or the interpreter when there is no GPU.
        out_dir: None (default): build into the cache (``mamba3_gen.cache_dir()``, one folder per fingerprint of
            spec, templates, generator, library versions and arch). A folder: build into ``out_dir/<name>/`` as
            ``mamba3-gen build --out`` does.
        force: with ``out_dir``, replace a package of another spec with the same name there.

    The module is keyed on the fingerprint: loading an edited spec gives a new module (the old one is untouched),
    loading an unchanged one returns the same module, and two specs with one name never share a module.

    Raises:
        SpecError: the spec is invalid or unreadable. BuildError: it cannot be built for ``arch`` (or ``out_dir``
        holds another spec's package). FileSystemError: the cache or ``out_dir`` cannot be written. All three are
        ``Mamba3GenError`` (a ``ValueError``).
    """
    from mamba3_gen.cache import load as _load

    return _load(spec, arch, out_dir=out_dir, force=force)


def cache_dir():
    """The folder ``load`` builds into: ``$MAMBA3_GEN_CACHE_DIR``, or the user cache folder (``platformdirs``)."""
    from mamba3_gen.cache import cache_dir as _cache_dir

    return _cache_dir()


def __getattr__(name):
    # The layer imports torch: loaded on first use, so that `import mamba3_gen` stays cheap.
    if name == "Mamba3":
        from mamba3_gen.layer import Mamba3

        return Mamba3
    raise AttributeError(f"module 'mamba3_gen' has no attribute {name!r}")
