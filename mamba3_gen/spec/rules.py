"""Discretization rules as data: formulas, no kernel code.

A rule says how one step of the continuous SSM is discretized. With a_t the log of step t's decay,

    H_t = exp(a_t)·H_{t-1} + Σ_{j=0..J} c_j(t) · v_{t-j} k̂_{t-j}ᵀ

where c_j(t) is the weight step t gives to the input of token t−j (J ≤ 3 lags). a_t and every c_j are formulas over
step t's symbols ``dt`` (Δ_t), ``adt`` (A_t·Δ_t) and ``lam`` (λ_t), in the grammar of ``formula.py``. A preset is
one entry of ``PRESETS``, written exactly as a user writes a custom rule in a spec (``discretization.weights``):
adding a preset is adding an entry here, and everything a kernel or an oracle needs follows from these formulas.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy as sp

from mamba3_gen.spec.formula import adt, dt, formula_text, lam, parse_formula

MAX_LAGS = 3

# name -> (summary, log_decay, weights c_0, c_1, ...)
PRESETS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "exp_euler": (
        "exponential-Euler (Mamba-2/SSD): H_t = e^{a_t} H_{t-1} + Δ_t v_t k_tᵀ",
        "adt", ("dt",),
    ),
    "exp_trapezoidal": (
        "exponential-trapezoidal (Mamba-3): H_t = e^{a_t} H_{t-1} + (1-λ_t)Δ_t e^{a_t} v_{t-1}k_{t-1}ᵀ + λ_t Δ_t v_t k_tᵀ",
        "adt", ("lam * dt", "(1 - lam) * dt * exp(adt)"),
    ),
    "zoh": (
        "zero-order hold: H_t = e^{a_t} H_{t-1} + Δ_t (e^{a_t} − 1)/a_t v_t k_tᵀ",
        "adt", ("dt * expm1(adt) / adt",),
    ),
}
CUSTOM = "custom"


@dataclass(frozen=True)
class Rule:
    """A discretization rule: the log-decay a_t and the lag weights c_0(t) … c_J(t), as sympy expressions over
    dt, adt, lam (before λ is resolved: a constant λ is substituted by the lowering)."""

    name: str
    summary: str
    log_decay: sp.Expr
    weights: tuple[sp.Expr, ...]  # c_0 (current token), c_1 (previous token), ...

    @property
    def lags(self) -> int:
        return len(self.weights) - 1

    @property
    def uses_lambda(self) -> bool:
        return any(e.has(lam) for e in (self.log_decay, *self.weights))

    def formulas(self) -> dict[str, str]:
        """{'log_decay': ..., 'weights[0]': ..., ...} as a user would write them."""
        out = {"log_decay": formula_text(self.log_decay)}
        out.update({f"weights[{j}]": formula_text(w) for j, w in enumerate(self.weights)})
        return out


def make_rule(name: str, log_decay, weights, summary: str | None = None) -> Rule:
    """A Rule from formula texts (cached: a spec's rule is asked for often). Raises FormulaError (a ValueError)
    whose message starts with the offending field (``log_decay: ...`` or ``weights[j]: ...``) and says what to write
    instead."""
    key = tuple(weights) if isinstance(weights, (list, tuple)) else weights
    return _make_rule(name, log_decay, key, summary)


@functools.lru_cache(maxsize=256)
def _make_rule(name: str, log_decay, weights, summary: str | None) -> Rule:
    from mamba3_gen.spec.formula import FormulaError

    if not isinstance(weights, (list, tuple)) or not 1 <= len(weights) <= MAX_LAGS + 1:
        raise FormulaError(f"weights: a rule has 1 to {MAX_LAGS + 1} weights (c_0 for the current token, c_j for "
                           f"token t-j), got {len(weights) if isinstance(weights, (list, tuple)) else weights!r}; "
                           "try weights: [dt]")
    parsed = []
    for j, text in enumerate(weights):
        try:
            parsed.append(parse_formula(text))
        except FormulaError as e:
            raise FormulaError(f"weights[{j}]: {e}") from None
    try:
        a = parse_formula(log_decay)
    except FormulaError as e:
        raise FormulaError(f"log_decay: {e}") from None
    if summary is None:
        terms = " + ".join(f"({formula_text(w)})·v_{{t-{j}}}k_{{t-{j}}}ᵀ" if j else f"({formula_text(w)})·v_t k_tᵀ"
                           for j, w in enumerate(parsed))
        summary = f"{name}: H_t = exp({formula_text(a)})·H_{{t-1}} + {terms}"
    return Rule(name, summary, a, tuple(parsed))


def preset_rule(name: str) -> Rule:
    summary, log_decay, weights = PRESETS[name]
    return make_rule(name, log_decay, weights, summary)


__all__ = ["PRESETS", "CUSTOM", "MAX_LAGS", "Rule", "make_rule", "preset_rule", "dt", "adt", "lam"]
