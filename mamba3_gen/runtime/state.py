"""The one state layout shared by the prefill forward (initial/final states) and, later, the decode step.

NS = batch size B, or the number of sequences (len(cu_seqlens) - 1) in varlen mode.

| field | shape                                   | dtype        | present when                          |
|-------|-----------------------------------------|--------------|---------------------------------------|
| angle | (NS, H, S)   Θ, cumulative angle mod 2π | fp32         | complex state (S > 0)                 |
| ssm   | (NS, H, P, N) H, rows = value dim        | state dtype  | always                                |
| k     | (NS, [J,] [R,] H, N) keys of the last J tokens: biased, rotated by their own Θ, not scaled | state dtype | rules with lags (J ≥ 1) |
| v     | (NS, [J,] H, P) raw V of the last J tokens (not multiplied by MIMO_V) | state dtype | same as k |

J is the rule's number of lags (spec.lags: 0 for exp_euler and zoh, 1 for exp_trapezoidal, up to 3 for a custom
rule). The J axis is present only when J > 1 and the R axis only when R > 1, so for J ≤ 1 these are exactly the
official layouts; lag index 0 is the token just before the next one (t−1), index j the token t−1−j.

The state dtype is the spec's dtypes.state (fp32 or bf16); Θ stays fp32 (a bf16 angle is off by up to 0.025 rad).
These are the official Mamba-3 layouts (SISO Input_States, MIMO decode cache), so official states carry over.
The prefill forward returns its final states in this layout and the decode step reads and writes it, so
prefill → step → step … chains with no conversion.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Mamba3State(NamedTuple):
    angle: Optional[torch.Tensor]
    ssm: torch.Tensor
    k: Optional[torch.Tensor]
    v: Optional[torch.Tensor]


def state_shape(field: str, *, NS: int, H: int, N: int, P: int, R: int, S: int, J: int) -> Optional[tuple]:
    """Shape of one state field (table above), or None when the spec does not carry it."""
    lag = (J,) if J > 1 else ()
    rank = (R,) if R > 1 else ()
    return {
        "angle": (NS, H, S) if S else None,
        "ssm": (NS, H, P, N),
        "k": (NS, *lag, *rank, H, N) if J else None,
        "v": (NS, *lag, H, P) if J else None,
    }[field]


def state_layout(meta: dict, NS: int, H: int) -> dict:
    """{field: (shape, dtype)} of a spec's state, None for a field the spec does not carry."""
    dtype = TORCH_DTYPES[meta["state_dtype"]]
    out = {}
    for f in Mamba3State._fields:
        shape = state_shape(f, NS=NS, H=H, N=meta["N"], P=meta["P"], R=meta["R"], S=meta["S"], J=meta["J"])
        out[f] = None if shape is None else (shape, torch.float32 if f == "angle" else dtype)
    return out


def zero_state(meta: dict, NS: int, H: int, device) -> Mamba3State:
    """The state before the first token: all zeros (Θ = 0, H = 0, no previous token)."""
    layout = state_layout(meta, NS, H)
    return Mamba3State(*[torch.zeros(f[0], dtype=f[1], device=device) if f else None for f in layout.values()])
