"""The one state layout shared by the prefill forward (initial/final states) and, later, the decode step.

NS = batch size B, or the number of sequences (len(cu_seqlens) - 1) in varlen mode.

| field | shape                                   | dtype | present when                          |
|-------|-----------------------------------------|-------|---------------------------------------|
| angle | (NS, H, S)   Θ, cumulative angle mod 2π | fp32  | complex state (S > 0)                 |
| ssm   | (NS, H, P, N) H, rows = value dim        | fp32  | always                                |
| k     | (NS, H, N) if R == 1, else (NS, R, H, N) | fp32  | rules with a lagged term (trapezoidal)|
|       | previous token's key: biased, rotated by Θ, not scaled |  |                                  |
| v     | (NS, H, P) previous token's raw V (not multiplied by MIMO_V) | fp32 | same as k              |

These are the official Mamba-3 layouts (SISO Input_States, MIMO decode cache), so official states carry over.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Mamba3State(NamedTuple):
    angle: Optional[torch.Tensor]
    ssm: torch.Tensor
    k: Optional[torch.Tensor]
    v: Optional[torch.Tensor]
