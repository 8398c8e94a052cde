"""Float64 reference implementations of the Mamba-3 forward (docs/mamba3-math.md), used as test oracles.

- `naive_recurrence`: the per-token recurrence (§2 SISO, §4 MIMO).
- `chunked_reference`: the chunked SSD-style algorithm (§5), an independent second oracle.
- `make_inputs`: random keyword arguments in the common calling convention; `to_float64` casts such a dict.
"""
from __future__ import annotations

import torch

from .chunked import chunked_reference
from .inputs import make_inputs, to_float64
from .naive import naive_recurrence

__all__ = ["naive_recurrence", "chunked_reference", "make_inputs", "to_float64", "rel_err", "max_abs"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius norms, in float64 on the CPU); b is the reference. 0 when both are zero."""
    a = torch.as_tensor(a).detach().to("cpu", torch.float64)
    b = torch.as_tensor(b).detach().to("cpu", torch.float64)
    num = torch.linalg.vector_norm(a - b).item()
    den = torch.linalg.vector_norm(b).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| in float64 (0 for empty tensors)."""
    a = torch.as_tensor(a).detach().to("cpu", torch.float64)
    b = torch.as_tensor(b).detach().to("cpu", torch.float64)
    d = (a - b).abs()
    return d.max().item() if d.numel() else 0.0
