"""Symbolic lowering: spec + discretization rule -> the per-token quantities of the chunked algorithm.

Unrolling the recurrence of a rule (see ``rules.py``), token s enters the state of every later step t with weight

    Σ_j c_j(s+j) · exp(Σ_{r=s+j+1..t} a_r)   =   scale_s · exp(cs_t - cs_s)      for t ≥ s + lags,

    scale_s = c_0(s) + Σ_{j≥1} c_j(s+j) · exp(-Σ_{r=s+1..s+j} a_r)            (the per-token key scale)

and at t = s (the diagonal) the weight is c_0(s) alone. The lag-j terms read step s+j's Δ, λ, a even across chunk
boundaries. Before the first token, the carried previous token enters the initial state with weight
c_1(0)·exp(-a_0) (the initial-state correction). sympy derives, simplifies and prints each of these as a Triton
expression over the kernel's per-token vectors; their derivatives are kept for the backward kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from mamba3_gen.lower.rules import RULES, Rule, adt, dt, lam
from mamba3_gen.spec.model import Spec

# Symbols of the next token (t+1) and of the first token of a sequence, as the kernel names them.
dt_next, adt_next, lam_next = sp.symbols("dt_next adt_next lam_next", real=True)
dt0, adt0, lam0 = sp.symbols("dt0 adt0 lam0", real=True)


class LoweringError(ValueError):
    pass


def triton_expr(expr: sp.Expr, exp: str = "tl.exp") -> str:
    """Print a sympy expression as kernel source (fp32 values; ``exp`` names the backend's exponential, e.g.
    ``tl.exp`` for Triton); deterministic text."""
    return _KernelPrinter(exp).doprint(expr)


class _KernelPrinter(sp.printing.str.StrPrinter):
    def __init__(self, exp: str = "tl.exp"):
        super().__init__()
        self._exp = exp

    def _print_Function(self, e):
        if isinstance(e, sp.exp):
            return f"{self._exp}({self._print(e.args[0])})"
        raise LoweringError(f"function {e.func} has no kernel lowering")

    def _print_Rational(self, e):
        return repr(float(e))

    def _print_Float(self, e):
        return repr(float(e))

    def _print_Pow(self, e, rational=False):
        base, ex = e.args
        if ex == -1:
            return f"(1.0 / {self.parenthesize(base, 100)})"
        if ex.is_Integer and 1 < int(ex) <= 4:
            b = self.parenthesize(base, 100)
            return " * ".join([b] * int(ex))
        raise LoweringError(f"power {e} has no Triton lowering")


@dataclass(frozen=True)
class Lowered:
    """What the templates need from the discretization, as Triton expressions (kernel variable names)."""

    rule: Rule
    lam_source: str  # "data", "constant" or "none"
    gamma: sp.Expr  # diagonal weight c_0(t), over dt, lam, adt
    beta: sp.Expr  # weight c_1(t) of the previous token in step t (0 for lag-free rules): the decode step's lagged term
    shift: sp.Expr  # lag-1 part of the key scale, over dt_next, lam_next, adt_next (0 for lag-free rules)
    init_shift: sp.Expr  # weight of the carried previous token in the initial state, over dt0, lam0, adt0
    derivatives: dict[str, sp.Expr] = field(default_factory=dict)

    @property
    def has_shift(self) -> bool:
        return self.shift != 0

    def code(self) -> dict[str, str]:
        return {
            "gamma": triton_expr(self.gamma),
            "shift": triton_expr(self.shift),
            "init_shift": triton_expr(self.init_shift),
        }

    def step_code(self, exp: str = "tl.exp") -> dict[str, str]:
        """The decode step H_t = alpha·H_{t-1} + beta·v_{t-1}k̂_{t-1}ᵀ + gamma·v_t k̂_tᵀ, over the kernel's scalars
        ``dt``, ``adt`` (A·Δ) and ``lam``, printed with the backend's exponential."""
        return {"alpha": f"{exp}(adt)", "beta": triton_expr(self.beta, exp), "gamma": triton_expr(self.gamma, exp)}

    def describe(self) -> dict[str, str]:
        out = {
            "rule": self.rule.summary,
            "lambda": self.lam_source,
            "diagonal weight gamma_t": str(self.gamma),
            "shifted term g_t (from token t+1)": str(self.shift),
            "key scale_t": str(sp.simplify(self.gamma + self.shift)),
            "initial-state correction": str(self.init_shift),
        }
        out.update({f"d/d{k}": str(v) for k, v in self.derivatives.items()})
        return out


def lower_discretization(spec: Spec) -> Lowered:
    rule = RULES[spec.discretization.rule]
    if rule.lags > 1:
        raise LoweringError(
            f"rule {rule.name} has {rule.lags} lagged terms; the templates implement at most one (band width 1)"
        )
    coeffs = list(rule.coefficients)
    if not rule.uses_lambda:
        lam_source = "none"
    elif spec.discretization.lambda_ == "constant":
        lam_source = "constant"
        value = sp.Float(spec.discretization.lambda_value)
        coeffs = [c.subs(lam, value) for c in coeffs]
    else:
        lam_source = "data"

    gamma = sp.simplify(coeffs[0])
    beta = sp.simplify(coeffs[1]) if rule.lags else sp.Integer(0)
    if rule.lags == 0:
        shift = sp.Integer(0)
    else:
        # c_1 of step s+1, pulled back through that step's decay so it rides on token s's key.
        shift = sp.simplify((coeffs[1] * sp.exp(-adt)).subs({dt: dt_next, adt: adt_next, lam: lam_next}, simultaneous=True))
    init_shift = shift.subs({dt_next: dt0, adt_next: adt0, lam_next: lam0}, simultaneous=True)

    derivatives = {}
    for sym in (dt, lam):
        if gamma.has(sym):
            derivatives[f"{sym} gamma"] = sp.simplify(sp.diff(gamma, sym))
    for sym in (dt_next, lam_next):
        if shift.has(sym):
            derivatives[f"{sym} shift"] = sp.simplify(sp.diff(shift, sym))
    return Lowered(rule, lam_source, gamma, beta, shift, init_shift, derivatives)
