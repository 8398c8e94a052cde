"""One exception hierarchy for everything mamba3-gen reports to its users, so that one ``except`` catches them all::

    Mamba3GenError (ValueError)
    ├── SpecError        the spec is invalid: one ``file:line: field: problem; try fix`` line per problem
    ├── BuildError       a valid spec cannot be built: lowering, target limits, a package of another spec in the way
    ├── FileSystemError  a file or folder cannot be read or written (the path, the OS's reason, what to do)
    └── InputError       tensors given to a generated op do not fit the spec (names the tensor and what it expects)
        └── DeviceError  the tensors' device cannot run the kernels here (CPU without the interpreter, CuTe on CPU)

``Mamba3GenError`` derives from ``ValueError`` so that code written against the earlier ``ValueError``\\ s keeps working.
This module imports nothing heavy: ``import mamba3_gen.errors`` is cheap.
"""
from __future__ import annotations

import os

__all__ = ["Mamba3GenError", "SpecError", "BuildError", "FileSystemError", "InputError", "DeviceError"]


class Mamba3GenError(ValueError):
    """Base class of every error mamba3-gen raises for a problem the user can fix (spec, files, inputs, device)."""


class SpecError(Mamba3GenError):
    """One or more problems with a spec, each a ``file:line: field: message; try ...`` line (``problems``)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(self.problems)  # args = (problems,), so that copies and pickles rebuild the same error

    def __str__(self) -> str:
        return "\n".join(self.problems)


class BuildError(Mamba3GenError):
    """A valid spec that cannot be built: its kernel does not fit the target, its lowering fails, or its output
    folder holds the package of another spec."""


class FileSystemError(Mamba3GenError):
    """A file-system operation failed. ``path`` is the file or folder, ``reason`` the OS's words; the message also
    says what to try."""

    def __init__(self, path: str | os.PathLike[str], action: str, reason: str, hint: str):
        self.path = os.fspath(path)
        self.action = action
        self.reason = reason
        self.hint = hint
        super().__init__(path, action, reason, hint)

    def __str__(self) -> str:
        return f"{self.path}: cannot {self.action}: {self.reason}; try {self.hint}"

    @classmethod
    def wrap(cls, err: OSError, path: str | os.PathLike[str], action: str, hint: str) -> "FileSystemError":
        """The FileSystemError for an OSError raised while doing ``action`` on ``path`` (raise it ``from err``)."""
        reason = err.strerror or type(err).__name__
        return cls(path, action, reason, hint)


class InputError(Mamba3GenError):
    """Tensors given to a generated op that do not fit its spec (shape, dtype, device, a state of another spec)."""


class DeviceError(InputError):
    """The kernels cannot run on the tensors' device in this process (CPU tensors without the Triton interpreter,
    the CuTe DSL backend without CUDA)."""
