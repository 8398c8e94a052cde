"""Symbolic lowering: a spec's discretization rule -> the per-token coefficients every kernel and oracle reads.

A rule (``spec/rules.py``) gives a_t (log-decay) and the lag weights c_0(t) … c_J(t) as formulas over Δ_t, A_t·Δ_t
and λ_t. The lowering resolves λ (per-token data, a constant, or unused), makes every formula safe to evaluate on
its whole domain, validates it, and hands the kernels one *prologue*: per token, ``a`` and ``c0 … cJ``. The chunked
forward, both decode steps and the float64 oracles read only that prologue, so none of them ever sees a rule.

Making a formula safe: where a denominator vanishes inside the domain (Δ ≥ 0, A·Δ ≤ 0, λ ∈ [0, 1]) sympy finds the
limit there; a finite limit (a removable singularity, e.g. ZOH's Δ·expm1(a)/a at a = 0) becomes a Piecewise that
evaluates a Taylor series near the point, with a radius and an order chosen per formula so that both forms are
accurate in the target precision (fp32 for the kernels, fp64 for the oracles); an infinite one is refused. A formula
that is not finite in fp32 at sample points of the domain (its ends included: A·Δ = −1000, Δ = 100), unbounded at
padding (Δ → 0, a → 0), or a log-decay that is positive somewhere, is refused too. sympy's simplified form is kept
only when it stays in what kernels print (formula.check_lowerable: powers within ±8, the grammar's functions).
Derivatives of the prologue with respect to Δ, A·Δ, λ are kept for the backward, made safe the same way (ZOH's
∂c0/∂adt gets its own series at adt = 0); a derivative that is unbounded is refused, naming it.

How the chunked kernel uses the prologue (the math doc §5 generalised to J lags; every exponent is ≤ 0, so the
weights are finite for every decay down to −inf): token s enters the output of token t ≥ s with weight

    W(t, s) = Σ_{j ≤ t−s} c_j(s+j) · exp(cs_t − cs_{s+j})        (cs: cumsum of a)

which for t − s ≥ J is exp(cs_t − cs_{s+J}) · Σ_j c_j(s+j)·exp(cs_{s+J} − cs_{s+j}) (a per-token key scale times a
decay), and for t − s < J a per-token band weight. The state carried between chunks (and between calls) is the
true H_t plus the last J tokens' (k̂, v): their remaining lagged terms are applied by the next chunk.
"""
from __future__ import annotations

import functools
import math

import torch
from dataclasses import dataclass, field

import sympy as sp

from mamba3_gen.lower.evaluate import evaluate_float
from mamba3_gen.spec.formula import (MAX_POWER, FormulaError, adt, check_lowerable, dt, exact_constants, formula_text,
                                     lam)
from mamba3_gen.spec.model import Spec
from mamba3_gen.spec.rules import Rule

# Removable singularities: the series is used within a radius chosen per formula so that, outside it, the closed
# form computed in the target precision is within CLOSED_TOL of the exact value, and its order so that, at the
# radius, the truncated series is within SERIES_TOL (higher-order singularities need wider radii and more terms).
RADII = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0)
MAX_SERIES_ORDER = 24
PRECISIONS = {"fp32": (torch.float32, 2e-6, 1e-9), "fp64": (torch.float64, 1e-12, 1e-14)}  # dtype, CLOSED, SERIES
SERIES_ORDER = 6  # the fewest terms a series gets
SERIES_RADIUS = RADII[0]  # the smallest radius (ZOH's)
DOMAIN = {dt: sp.Interval(0, sp.oo), adt: sp.Interval(-sp.oo, 0), lam: sp.Interval(0, 1)}
# sample points of the domain where a formula must be finite in fp32 (a kernel's arithmetic), the ends included
SAMPLES = {dt: (1e-4, 1e-2, 0.5, 3.0, 100.0), adt: (-1e3, -30.0, -2.0, -0.3, -1e-3, 0.0), lam: (0.0, 0.3, 1.0)}


class Away(sp.Function):
    """Away(x, x0, r) = x0 + r where |x − x0| < r, else x: where a formula's series is used, the formula itself is
    evaluated at a point off its singularity (no 0/0 in any lane of a select, no NaN gradient). Kept unevaluated so
    that sympy does not push divisions through it."""

    nargs = 3

    def fdiff(self, argindex=1):
        return sp.Integer(1) if argindex == 1 else sp.Integer(0)


class LoweringError(ValueError):
    """A rule the kernels cannot evaluate safely; the message starts with the field and says what to do."""


@dataclass(frozen=True)
class Lowered:
    """The discretization as the kernels read it: per-token ``a`` and ``c0 … cJ`` over the step symbols dt, adt
    (A·Δ as the kernel computes it from its input) and lam (only when λ is per-token data)."""

    rule: Rule
    lam_source: str  # "data", "constant" or "none"
    log_decay: sp.Expr  # a_t
    weights: tuple[sp.Expr, ...]  # c_j(t), safe (removable singularities as Piecewise series)
    derivatives: dict[str, sp.Expr] = field(default_factory=dict)  # "adt c0": ∂c0/∂adt, safe as the values are
    # why the backward is refused (a derivative the kernels cannot evaluate safely), None when it has one; the
    # forward and the decode step do not read derivatives and are built all the same
    backward_refusal: str | None = None

    @property
    def lags(self) -> int:
        return len(self.weights) - 1

    @property
    def symbols(self) -> tuple[str, ...]:
        """The step symbols the prologue reads, in a fixed order."""
        used = set().union(*(e.free_symbols for e in (self.log_decay, *self.weights)))
        return tuple(s.name for s in (dt, adt, lam) if s in used)

    def prologue(self) -> list[tuple[str, sp.Expr]]:
        """[(name, expr)]: ``a`` then ``c0`` … ``cJ``; a backend prints each expr with its own printer."""
        return [("a", self.log_decay)] + [(f"c{j}", w) for j, w in enumerate(self.weights)]

    def chunk_terms(self) -> list[tuple[str, sp.Expr]]:
        """[(name, expr)]: the per-token quantities of the chunked forward (module docstring), over the step symbols of
        token t+s named ``dt_s<s>``, ``adt_s<s>``, ``lam_s<s>`` (s = 0..J), simplified by sympy so that equal decay
        factors are taken once (the trapezoid's key scale needs one exp, not two):

        - ``a0``: a_t (the template zeroes it past the chunk for the cumsum);
        - ``scale_tok``: Σ_j c_j(t+j)·exp(Σ_{r=j+1..J} a_{t+r}), token t's whole input carried to step t+J;
        - ``band<d>_tok`` (d < J): Σ_{j≤d} c_j(t+j)·exp(Σ_{r=j+1..d} a_{t+r}), token t's weight in output t+d;
        - ``a_s<m>`` (1 ≤ m ≤ J): a_{t+m}, which turns the chunk's cumsum at token t into the one at t+J (where token
          t's whole input has landed) without shifting a vector.
        """
        J = self.lags
        shift = [{sym: sp.Symbol(f"{sym.name}_s{k}", real=True) for sym in (dt, adt, lam)} for k in range(J + 1)]
        a = [self.log_decay.subs(shift[k], simultaneous=True) for k in range(J + 1)]
        cw = [self.weights[j].subs(shift[j], simultaneous=True) for j in range(J + 1)]

        def carried(j: int, to: int) -> sp.Expr:  # c_j(t+j) carried from step t+j to step t+to
            return cw[j] * sp.exp(sp.Add(*a[j + 1:to + 1]))

        def tidy(e: sp.Expr) -> sp.Expr:
            return sp.powsimp(sp.factor_terms(e), combine="exp")

        out = [("a0", a[0]), ("scale_tok", tidy(sp.Add(*[carried(j, J) for j in range(J + 1)])))]
        out += [(f"band{d}_tok", tidy(sp.Add(*[carried(j, d) for j in range(d + 1)]))) for d in range(J)]
        out += [(f"a_s{m}", a[m]) for m in range(1, J + 1)]
        return out

    def describe(self) -> dict[str, str]:
        out = {"rule": self.rule.summary, "lambda": self.lam_source, "lags J": str(self.lags),
               "log-decay a_t": formula_text(self.log_decay)}
        for j, w in enumerate(self.weights):
            out[f"weight c_{j}(t) (token t-{j})"] = _show(w)
        for key, d in self.derivatives.items():  # key "adt c0": ∂c0/∂adt
            sym, name = key.split()
            out[f"∂{name}/∂{sym}"] = _show(d)
        if self.backward_refusal:
            out["backward"] = f"refused: {self.backward_refusal}"
        return out


def _show(e: sp.Expr) -> str:
    if isinstance(e, sp.Piecewise):
        (series, cond), (body, _) = e.args
        body = body.replace(lambda x: isinstance(x, Away), lambda x: x.args[0])
        return f"{formula_text(body)}   [series {formula_text(series)} where {formula_text(cond)}]"
    return formula_text(e)


def lower_discretization(spec: Spec) -> Lowered:
    """Lower spec.discretization; raises LoweringError naming ``discretization.weights[j]`` or ``.log_decay``.
    Cached per discretization section (sympy's limits and series take up to a second per formula)."""
    return _lower_cached(spec.discretization.model_dump_json(by_alias=True))


@functools.lru_cache(maxsize=256)
def _lower_cached(discretization_json: str) -> Lowered:
    from mamba3_gen.spec.model import Discretization

    disc = Discretization.model_validate_json(discretization_json)
    rule = disc.resolved_rule()
    subs = {}
    if not rule.uses_lambda:
        lam_source = "none"
    elif disc.lambda_ == "constant":
        lam_source = "constant"
        subs = {lam: sp.Float(disc.lambda_value)}
    else:
        lam_source = "data"
    with_lam = f" with lam = {disc.lambda_value:g}" if subs else ""
    fields = [("a", "discretization.log_decay", rule.log_decay)]
    fields += [(f"c{j}", f"discretization.weights[{j}]", w) for j, w in enumerate(rule.weights)]
    simple, safe, derivatives = {}, {}, {}
    for name, where, written in fields:
        simple[name] = _simplified(written.subs(subs), where, f"'{formula_text(written)}'{with_lam}")
        safe[name] = safe_formula(simple[name], where)
        if name == "a":
            _check_decay(safe[name], where, formula_text(written))
    # The backward's derivatives get the values' guard (series at removable singularities, refusals), after every
    # value is known to be fine. One derivative lowers an exponent by one (by two halves: d/dx x**(-8/2)). A
    # derivative that fails it refuses the backward only (a gradient request names the field); nothing is printed
    # for the backward's chain rule then.
    refusal = None
    for name, where, written in fields:
        for sym in (dt, adt, lam):
            if simple[name].has(sym) and refusal is None:
                shown = f"the derivative d/d{sym} of {formula_text(written)}{with_lam}"
                try:
                    d = _simplified(sp.diff(simple[name], sym), where, shown, MAX_POWER + 2)
                    derivatives[f"{sym} {name}"] = safe_formula(d, where, shown=f"{shown}, {formula_text(d)},")
                except LoweringError as e:  # the value is fine: say why its derivative matters
                    head, _, fix = str(e).partition("; try ")
                    refusal = (f"{head}; the backward reads this derivative, so a gradient is refused (the forward "
                               f"and the decode step are not affected); try {fix}")
    if refusal is not None:
        derivatives = {}
    weights = tuple(safe[f"c{j}"] for j in range(len(rule.weights)))
    return Lowered(rule, lam_source, safe["a"], weights, derivatives, refusal)


def _exact_exponents(expr: sp.Expr) -> sp.Expr:
    """Float exponents that are whole or half made exact: a constant λ substituted into exp(2*lam*log(1 + dt))
    gives (1 + dt)**1.0, which no printer lowers; (1 + dt)**1 is 1 + dt."""
    def exact(p):
        n = 2 * float(p.exp)
        return sp.Pow(p.base, sp.Rational(int(n), 2)) if n == int(n) else p
    return expr.replace(lambda p: isinstance(p, sp.Pow) and p.exp.is_Float, exact)


def _simplified(expr: sp.Expr, where: str, shown: str, max_power: int = MAX_POWER) -> sp.Expr:
    """expr (a rule's formula with a constant λ substituted, or a derivative) simplified by sympy, and still in what
    the kernels print (formula.check_lowerable, powers within ±``max_power``): simplify and a substituted λ may fold
    factors into a higher power, or rewrite into functions outside the grammar (1 - tanh(x)**2 -> 1/cosh(x)**2).
    When simplifying is what leaves the grammar, expr is kept as it is. Raises LoweringError starting with ``where``
    and naming the formula (``shown``)."""
    expr = _exact_exponents(exact_constants(expr))
    simple = _exact_exponents(exact_constants(sp.simplify(expr)))
    error = None
    for candidate in (simple, expr):
        try:
            check_lowerable(candidate, shown, max_power)
            return candidate
        except FormulaError as e:
            error = error or e
    raise LoweringError(f"{where}: {error}") from None


@functools.lru_cache(maxsize=1024)
def safe_formula(expr: sp.Expr, where: str, precision: str = "fp32", shown: str | None = None) -> sp.Expr:
    """expr made safe to evaluate in ``precision`` ("fp32" for the kernels, "fp64" for the oracles) on the whole
    domain: each removable singularity becomes a Piecewise (Taylor series near the point, the formula away from it).
    ``shown``: how messages name expr (default: its text; a derivative says whose derivative it is).
    Raises LoweringError, starting with ``where`` and the user's formula, for a value that is not a finite real
    number, a singularity that is not removable, or one whose neighbourhood neither form computes accurately."""
    shown = formula_text(expr) if shown is None else shown
    expr = sp.sympify(expr)
    if expr.has(sp.zoo, sp.nan, sp.oo, -sp.oo, sp.I):
        raise LoweringError(f"{where}: {shown} is not a finite real number (it simplifies to {formula_text(expr)}); "
                            "try a formula without log(0), sqrt of a negative number or a division by zero")
    closed = expr
    for sym in sorted(closed.free_symbols, key=lambda s: s.name):
        for z0 in _poles(closed, sym, where, shown):
            # functions of the other symbols stay as they are (a series must not turn tanh(dt) into exps of dt)
            frozen = {f: sp.Dummy(f"f{i}") for i, f in enumerate(sorted(closed.atoms(sp.Function), key=sp.sstr))
                      if not f.has(sym)}
            smooth = closed.xreplace(frozen).rewrite(sp.exp)
            try:
                lim = sp.limit(smooth, sym, z0, dir=_side(sym, z0))
            except (NotImplementedError, ValueError):
                lim = sp.nan
            if not _bounded(lim):
                raise LoweringError(
                    f"{where}: {shown} is unbounded at {sym} = {z0} (not a removable singularity); "
                    f"try a formula whose denominator never vanishes for {_domain_text(sym)}")
            radius, series = _series_guard(closed, smooth, {v: k for k, v in frozen.items()}, sym, z0, where, shown,
                                           precision)
            near = sp.Abs(sym - z0) < radius
            # the formula itself is evaluated away from z0 even where the series is chosen: no 0/0 in any lane
            expr = sp.Piecewise((series, near), (expr.subs(sym, Away(sym, z0, radius)), True))
    _check_samples(expr, where, shown)
    _check_padding(expr, where, shown)
    return expr


GUARD_SAMPLES = {dt: (1e-4, 0.5, 100.0), adt: (-1e3, -2.0, -1e-3), lam: (0.0, 0.3, 1.0)}  # the other symbols


def _series_guard(closed, smooth, thaw: dict, sym, z0, where: str, shown: str, precision: str):
    """(radius, series) for the removable singularity of ``closed`` at sym = z0 (module comment above RADII), checked
    at every combination of GUARD_SAMPLES of the other symbols: a singularity whose series in sym alone is not
    accurate for all of them (e.g. expm1(lam·adt)/(lam·adt) near lam = 0 with a large |adt|) is refused."""
    dtype, closed_tol, series_tol = PRECISIONS[precision]
    other_syms = [s for s in (dt, adt, lam) if s is not sym and closed.has(s)]
    combos = [{}]
    for s in other_syms:
        combos = [{**c, s: v} for c in combos for v in GUARD_SAMPLES[s]]
    sides = [-1, 1] if z0 not in (DOMAIN[sym].inf, DOMAIN[sym].sup) else [1 if z0 == DOMAIN[sym].inf else -1, ]

    smooth = smooth.xreplace(thaw)  # the exact values and the series see the frozen functions again

    def exact(expr, others, x):  # evalf with subs= keeps the precision through cancellations (subs first does not)
        try:
            value = expr.evalf(40, subs={**{k: sp.Float(v, 40) for k, v in others.items()}, sym: sp.Float(x, 40)})
            return complex(value).real
        except (ZeroDivisionError, TypeError, ValueError):  # another symbol's singularity at this sample
            return math.nan

    def close(got, ref, tol):
        return math.isfinite(got) and math.isfinite(ref) and abs(got - ref) <= tol * max(1.0, abs(ref))

    chosen = None
    for r in RADII:
        points = [float(z0) + d * r * f for d in sides for f in (1.0, 1.5, 3.0)]
        if all(close(evaluate_float(closed, {**{k.name: v for k, v in c.items()}, sym.name: x}, dtype=dtype),
                     exact(smooth, c, x), closed_tol) for c in combos for x in points):
            chosen = r
            break
    if chosen is None:
        raise LoweringError(f"{where}: {shown} cannot be computed accurately in {precision} near its removable "
                            f"singularity at {sym} = {z0} (even {RADII[-1]} away, for every value of the other symbols: "
                            "a singularity in several variables at once, or a cancellation too strong); try a "
                            "formula whose denominator depends on one symbol, written with expm1/log1p")
    edge = [float(z0) + d * chosen for d in sides]
    for n in range(SERIES_ORDER, MAX_SERIES_ORDER + 1):
        series = sp.expand(sp.series(smooth, sym, z0, n=n).removeO())
        if all(close(exact(series, c, x), exact(smooth, c, x), series_tol)
               for c in combos for x in edge):
            return chosen, series
    raise LoweringError(f"{where}: {shown} has a removable singularity at {sym} = {z0} whose series in {sym} alone "
                        f"is not accurate for every value of {', '.join(s.name for s in other_syms) or 'the inputs'} "
                        "(a singularity in several variables at once); try a formula whose denominator depends on "
                        f"{sym} only, e.g. with a constant λ")


def _poles(expr: sp.Expr, sym: sp.Symbol, where: str, shown: str) -> list:
    """Points of sym's domain where a denominator of expr vanishes (other symbols generic)."""
    _, den = sp.fraction(sp.together(expr))
    if not den.has(sym):
        return []
    try:
        zeros = sp.solveset(den, sym, domain=DOMAIN[sym])
    except (NotImplementedError, ValueError, TypeError):
        zeros = None
    if zeros == sp.S.EmptySet:
        return []
    if not isinstance(zeros, sp.FiniteSet) or any(z.free_symbols for z in zeros):
        raise LoweringError(f"{where}: {shown}: cannot tell where its denominator {formula_text(den)} vanishes "
                            f"for {_domain_text(sym)} (a singularity along a curve, or in two variables at once); "
                            f"try a formula whose denominators vanish only at fixed values of one symbol")
    return sorted(zeros, key=float)


def _side(sym: sp.Symbol, z0) -> str:
    """The side(s) of z0 inside sym's domain, for sympy's limit."""
    if z0 == DOMAIN[sym].inf:
        return "+"
    if z0 == DOMAIN[sym].sup:
        return "-"
    return "+-"


def _bounded(e: sp.Expr) -> bool:
    return not e.has(sp.oo, -sp.oo, sp.zoo, sp.nan)


def _domain_text(sym: sp.Symbol) -> str:
    return {dt: "dt >= 0", adt: "adt <= 0", lam: "0 <= lam <= 1"}[sym]


def _sample_points(syms: list) -> list[dict]:
    """Every combination of SAMPLES of the given symbols, as {name: value} points."""
    points = [{}]
    for sym in syms:
        points = [{**p, sym.name: v} for p in points for v in SAMPLES[sym]]
    return points


def _check_samples(expr: sp.Expr, where: str, shown: str) -> None:
    """Finite real values in fp32 (a kernel's arithmetic) at sample points of the domain, its ends included
    (catches log or sqrt of a negative, overflow as A·Δ → −∞ or for a large Δ, a singularity sympy did not see)."""
    syms = [s for s in (dt, adt, lam) if expr.has(s)]
    for p in _sample_points(syms):
        value = evaluate_float(expr, p, dtype=torch.float32)
        if not math.isfinite(value):
            at = ", ".join(f"{k} = {v:g}" for k, v in p.items())
            raise LoweringError(f"{where}: {shown} is not finite (in fp32) at {at}; try a formula that stays bounded "
                                f"on the whole domain ({', '.join(_domain_text(s) for s in syms)})")


def _check_decay(expr: sp.Expr, where: str, shown: str) -> None:
    """a_t is the log of a decay: ≤ 0 at every sample point of the domain."""
    for p in _sample_points([s for s in (dt, adt, lam) if expr.has(s)]):
        value = evaluate_float(expr, p)
        if value > 1e-12:
            at = ", ".join(f"{k} = {v:g}" for k, v in p.items()) or "every input"
            raise LoweringError(f"{where}: {shown} is {value:g} > 0 at {at}, but a_t is the log of step t's decay "
                                "and must be <= 0 for dt >= 0, adt <= 0, 0 <= lam <= 1; try adt, or adt minus a "
                                "non-negative term such as 0.1 * dt")


def _check_padding(expr: sp.Expr, where: str, shown: str) -> None:
    """Bounded as Δ → 0+ and a → 0− (what padding tokens past a sequence end feed a kernel)."""
    e = expr.args[-1][0] if isinstance(expr, sp.Piecewise) else expr  # the limit of the body is the series' value
    e = e.rewrite(sp.exp)
    for sym in (adt, dt):
        if e.has(sym):
            try:
                e = sp.limit(e, sym, 0, _side(sym, 0))
            except (NotImplementedError, ValueError):
                return  # sympy cannot tell; the sample check above still holds
    if not _bounded(e):
        raise LoweringError(f"{where}: {shown} is unbounded as dt -> 0 and adt -> 0 (what padding "
                            "tokens feed the kernels); try a formula that stays finite there, e.g. multiply by dt")


__all__ = ["Away", "Lowered", "LoweringError", "lower_discretization", "safe_formula", "SERIES_RADIUS"]
