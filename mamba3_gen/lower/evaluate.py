"""Numeric evaluation of prologue formulas in float64 torch, for the oracles and the lowering's checks.

A recursive walk over the sympy tree with one torch function per node kind: the formula is data, never turned into
Python source. Piecewise (the series at a removable singularity) becomes torch.where.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from mamba3_gen.spec.formula import sigmoid, softplus

_FUNCS = {sp.exp: torch.exp, expm1: torch.expm1, sp.log: torch.log, log1p: torch.log1p, sigmoid: torch.sigmoid,
          softplus: F.softplus, sp.tanh: torch.tanh, sp.sqrt: torch.sqrt}


def evaluate(expr: sp.Expr, values: dict[str, torch.Tensor | float], like: torch.Tensor | None = None,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """expr evaluated elementwise over ``values`` ({symbol name: tensor or float}, broadcast together) in ``dtype``
    (float64 for the oracles; float32 to see what a kernel's arithmetic does with a formula).

    ``like``: a tensor giving the result's shape for a constant expr (default: a 0-d tensor). Raises ValueError for
    a node kind no kernel lowers either (the grammar of spec/formula.py cannot produce one)."""
    vals = {k: torch.as_tensor(v, dtype=dtype) for k, v in values.items()}
    out = _eval(sp.sympify(expr), vals)
    if like is not None:
        out = out.expand(like.shape) if out.dim() == 0 else torch.broadcast_to(out, like.shape)
    return out


def evaluate_float(expr: sp.Expr, values: dict[str, float], dtype: torch.dtype = torch.float64) -> float:
    """expr at one point, computed in ``dtype``, as a Python float (nan or inf where the formula is not finite)."""
    with torch.no_grad():
        return float(evaluate(expr, values, dtype=dtype))


def _eval(e, v: dict) -> torch.Tensor:
    if e.is_Symbol:
        if e.name not in v:
            raise ValueError(f"no value for symbol {e.name}")
        return v[e.name]
    if e.is_number:  # a constant (2, log(2), 2**(1/3)): one number, as the kernel printers write it
        dtype = next(iter(v.values())).dtype if v else torch.float64
        try:
            return torch.tensor(float(e if e.is_Number else e.evalf(30)), dtype=dtype)
        except TypeError:  # zoo, nan or a complex constant: not a real number
            return torch.tensor(float("nan"), dtype=dtype)
    if isinstance(e, sp.Add):
        out = _eval(e.args[0], v)
        for a in e.args[1:]:
            out = out + _eval(a, v)
        return out
    if isinstance(e, sp.Mul):
        out = _eval(e.args[0], v)
        for a in e.args[1:]:
            out = out * _eval(a, v)
        return out
    if isinstance(e, sp.Pow):
        base, ex = e.args
        if ex.is_Integer:
            return _eval(base, v) ** int(ex)
        if ex.is_Rational and ex.q == 2:  # from sqrt: x**(p/2) = sqrt(x)**p
            return torch.sqrt(_eval(base, v)) ** int(ex.p)
        raise ValueError(f"power {e} has no lowering")
    if isinstance(e, sp.Piecewise):
        (series, cond), (body, _) = e.args
        return torch.where(_eval_cond(cond, v), _eval(series, v), _eval(body, v))
    if type(e).__name__ == "Away":  # lowering.Away(x, x0, r): x moved off a removable singularity
        x, x0, r = (_eval(a, v) for a in e.args)
        return torch.where((x - x0).abs() < r, x0 + r, x)
    fn = _FUNCS.get(e.func)
    if fn is not None:
        return fn(_eval(e.args[0], v))
    raise ValueError(f"{e.func} has no lowering")


def _eval_cond(c, v: dict) -> torch.Tensor:
    if isinstance(c, sp.StrictLessThan):
        lhs, rhs = c.args
        return _eval_abs(lhs, v) < _eval(rhs, v)
    raise ValueError(f"condition {c} has no lowering")


def _eval_abs(e, v: dict) -> torch.Tensor:
    if isinstance(e, sp.Abs):
        return _eval(e.args[0], v).abs()
    return _eval(e, v)
