"""Discretization rules as data: sympy formulas, no kernel code.

A rule states how one step of the continuous SSM is discretized. With a_t = A_t·Δ_t (the log-decay of step t),

    H_t = exp(a_t)·H_{t-1} + Σ_{j=0..lags} c_j(t) · v_{t-j} k̂_{t-j}ᵀ

where c_j(t) is the weight that step t gives to the input of token t-j. Each c_j is a sympy expression in the
symbols of step t: ``dt`` (Δ_t), ``adt`` (a_t) and ``lam`` (λ_t). Everything the chunked kernels need (per-token
key scale, diagonal weight, initial-state correction) is derived from these formulas in ``lowering.py``; adding a
rule means adding an entry here.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

dt, adt, lam = sp.symbols("dt adt lam", real=True)
STEP_SYMBOLS = (dt, adt, lam)


@dataclass(frozen=True)
class Rule:
    name: str
    summary: str
    coefficients: tuple[sp.Expr, ...]  # c_0 (current token), c_1 (previous token), ...

    @property
    def lags(self) -> int:
        return len(self.coefficients) - 1

    @property
    def uses_lambda(self) -> bool:
        return any(c.has(lam) for c in self.coefficients)


RULES: dict[str, Rule] = {
    "exp_euler": Rule(
        "exp_euler",
        "exponential-Euler (Mamba-2/SSD): H_t = e^{a_t} H_{t-1} + Δ_t v_t k_tᵀ",
        (dt,),
    ),
    "exp_trapezoidal": Rule(
        "exp_trapezoidal",
        "exponential-trapezoidal (Mamba-3): H_t = e^{a_t} H_{t-1} + (1-λ_t)Δ_t e^{a_t} v_{t-1}k_{t-1}ᵀ + λ_t Δ_t v_t k_tᵀ",
        (lam * dt, (1 - lam) * dt * sp.exp(adt)),
    ),
}
