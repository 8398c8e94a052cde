"""The prologue's derivatives in the form a backward kernel prints them (issue 12).

The lowering (lowering.py) keeps ∂a/∂sym and ∂c_j/∂sym for the step symbols dt, adt, lam, made safe as the values
are (series at removable singularities, unbounded ones refused). This groups them per symbol, in a fixed order, so
that a template writes d_sym = Σ_name d_name·∂name/∂sym for each symbol the rule reads, with no rule named.
"""
from __future__ import annotations

import sympy as sp

from mamba3_gen.lower.lowering import Lowered

__all__ = ["prologue_derivatives"]


def prologue_derivatives(lowered: Lowered) -> list[tuple[str, list[tuple[str, sp.Expr]]]]:
    """[(symbol, [(name, ∂name/∂symbol), ...]), ...]: symbols in the order dt, adt, lam, names in the prologue's order
    (``a``, ``c0`` … ``cJ``); a symbol no formula reads is left out, as is a name whose formula does not read it."""
    out = []
    for sym in ("dt", "adt", "lam"):
        terms = [(name, lowered.derivatives[f"{sym} {name}"]) for name, _ in lowered.prologue()
                 if f"{sym} {name}" in lowered.derivatives]
        if terms:
            out.append((sym, terms))
    return out
