"""The one state layout shared by the prefill forward (initial/final states) and, later, the decode step.

NS = batch size B, or the number of sequences (len(cu_seqlens) - 1) in varlen mode.

| field | shape                                   | dtype        | present when                          |
|-------|-----------------------------------------|--------------|---------------------------------------|
| angle | (NS, H, S)   Θ, cumulative angle mod 2π | fp32         | complex state (S > 0)                 |
| ssm   | (NS, H, P, N) H, rows = value dim        | state dtype  | always                                |
| k     | (NS, H, N) if R == 1, else (NS, R, H, N) | state dtype  | rules with a lagged term (trapezoidal)|
|       | previous token's key: biased, rotated by Θ, not scaled |  |                                  |
| v     | (NS, H, P) previous token's raw V (not multiplied by MIMO_V) | state dtype | same as k           |

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


def state_layout(meta: dict, NS: int, H: int) -> dict:
    """{field: (shape, dtype)} of a spec's state, None for a field the spec does not carry."""
    dtype = TORCH_DTYPES[meta["state_dtype"]]
    k_shape = (NS, H, meta["N"]) if meta["R"] == 1 else (NS, meta["R"], H, meta["N"])
    carries = meta["carries_prev_token"]
    return {
        "angle": ((NS, H, meta["S"]), torch.float32) if meta["S"] else None,
        "ssm": ((NS, H, meta["P"], meta["N"]), dtype),
        "k": (k_shape, dtype) if carries else None,
        "v": ((NS, H, meta["P"]), dtype) if carries else None,
    }


def zero_state(meta: dict, NS: int, H: int, device) -> Mamba3State:
    """The state before the first token: all zeros (Θ = 0, H = 0, no previous token)."""
    layout = state_layout(meta, NS, H)
    return Mamba3State(*[torch.zeros(f[0], dtype=f[1], device=device) if f else None for f in layout.values()])
