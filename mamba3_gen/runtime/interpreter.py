"""Make the Triton CPU interpreter (TRITON_INTERPRET=1) compute bf16 the way a GPU does, or say so.

Triton 3.6's interpreter keeps bf16 values as raw uint16 bits in numpy arrays, which breaks two things the
kernels use:

- ``tl.dot`` on bf16 operands multiplies the raw bit patterns as integers: a ``dtypes.compute: bf16`` forward came
  out ~1e10 off with no error (issue 10, item 5). Here bf16 operands are widened to fp32 first (exactly: every bf16
  value is an fp32 value) and multiplied with fp32 accumulation, which is what the tensor cores compute on bf16
  operands. A :class:`InterpreterPrecisionWarning` says so once per process.
- fp32 -> bf16 conversions truncate (the default cast has no rounding mode there) and its round-to-nearest
  carries a rounded-up mantissa into the wrong bits; a GPU rounds to nearest even. Here both directions go through
  torch's conversion (round to nearest even, NaN and inf kept); an explicit round-toward-zero still truncates.

:func:`install` is idempotent and is called by ``runtime/forward.py`` when the interpreter is on; on a GPU nothing
here runs.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["InterpreterPrecisionWarning", "install", "installed"]

_STATE = {"installed": False, "warned": False}


class InterpreterPrecisionWarning(UserWarning):
    """The Triton interpreter computes something at another precision than the spec asks (said once)."""


def installed() -> bool:
    """Whether :func:`install` has patched the interpreter in this process."""
    return _STATE["installed"]


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16).float().numpy()


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    # torch rounds to nearest even and keeps NaN / inf, as the GPU's cvt.rn.bf16.f32 does
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(
        np.uint16)


def install() -> None:
    """Patch the interpreter's bf16 conversions and bf16 dot products (see the module docstring). Idempotent."""
    if _STATE["installed"]:
        return
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    convert = interpreter._convert_float
    builder = interpreter.InterpreterBuilder
    create_dot = builder.create_dot

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.bfloat16 and output_dtype == tl.float32:
            return _bf16_bits_to_f32(input).view(np.uint32).reshape(input.shape)
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and rounding_mode != ir.ROUNDING_MODE.RTZ:
            return _f32_to_bf16_bits(input).reshape(input.shape)
        return convert(input, input_dtype, output_dtype, rounding_mode)

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            if not _STATE["warned"]:
                _STATE["warned"] = True
                warnings.warn(
                    "the Triton interpreter cannot multiply bf16 operands (it keeps them as raw bits); mamba3-gen "
                    "widens them to fp32 (exactly) and multiplies with fp32 accumulation, as a GPU's tensor cores "
                    "do on bf16 operands. Results match a GPU up to summation order.",
                    InterpreterPrecisionWarning, stacklevel=2)
            a = _widened(a)
            b = _widened(b)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def _widened(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interpreter.TensorHandle(_bf16_bits_to_f32(h.data), tl.float32)

    interpreter._convert_float = convert_float
    builder.create_dot = dot
    _STATE["installed"] = True
