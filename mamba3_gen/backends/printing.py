"""Printing prologue formulas (lower/lowering.py) as kernel source: one printer class, one function table per
backend. The printed text is deterministic (a build is reproducible byte for byte)."""
from __future__ import annotations

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from mamba3_gen.spec.formula import sigmoid, softplus


class PrintError(ValueError):
    pass


class KernelPrinter(sp.printing.str.StrPrinter):
    """sympy -> fp32 kernel expression text. ``functions`` maps each sympy function of the formula grammar to the
    backend's callable; ``where`` is the backend's select(cond, a, b), ``absolute`` its |x|, ``number`` wraps a
    literal (e.g. ``Float32(...)`` for CuTe)."""

    def __init__(self, functions: dict, where: str, absolute: str, number: str = "{}"):
        super().__init__()
        self._functions = functions
        self._where = where
        self._abs = absolute
        self._number = number

    def doprint(self, expr):
        # constant subexpressions (log(2) from a series, sqrt(3)) become numbers: kernels call functions on tensors
        expr = sp.sympify(expr)
        consts = {a: sp.Float(a.evalf(30)) for a in expr.atoms(sp.Function, sp.Pow) if not a.free_symbols}
        return super().doprint(expr.xreplace(consts))

    def _print_Function(self, e):
        name = self._functions.get(e.func)
        if name is None:
            raise PrintError(f"function {e.func} has no kernel lowering")
        return f"{name}({self._print(e.args[0])})"

    def _print_Away(self, e):
        x, x0, r = (self._print(a) for a in e.args)
        moved = self._print(e.args[1] + e.args[2])
        return f"{self._where}(({self._abs}({x} - {x0}) < {r}), {moved}, {x})"

    def _print_Abs(self, e):
        return f"{self._abs}({self._print(e.args[0])})"

    def _print_Rational(self, e):
        return self._number.format(repr(float(e)))

    _print_Float = _print_Rational
    _print_Integer = _print_Rational
    _print_Half = _print_Rational
    _print_One = _print_Rational
    _print_NegativeOne = _print_Rational
    _print_Zero = _print_Rational

    def _print_Pow(self, e, rational=False):
        base, ex = e.args
        b = self.parenthesize(base, 100)
        if ex.is_Rational and ex.q == 2:  # from sqrt: x**(p/2) = sqrt(x)**p
            b, ex = f"{self._functions[sp.sqrt]}({self._print(base)})", sp.Integer(ex.p)
        if ex.is_Integer and ex != 0:
            prod = " * ".join([b] * abs(int(ex)))
            return f"({prod})" if ex > 0 else f"(1.0 / ({prod}))"
        raise PrintError(f"power {e} has no kernel lowering")

    def _print_Piecewise(self, e):
        (series, cond), (body, _) = e.args
        return f"{self._where}({self._print(cond)}, {self._print(series)}, {self._print(body)})"

    def _print_StrictLessThan(self, e):
        return f"({self._print(e.args[0])} < {self._print(e.args[1])})"


def input_codes(spec, lowered, sigmoid: str = "sigmoid", suffix: str = "") -> list[tuple[str, str]]:
    """[(step symbol, code)]: how a kernel's raw inputs ``dt``, ``adt``, ``trap`` become the symbols the prologue
    reads, as the spec's ``inputs`` section encodes them (``sigmoid`` names the backend's σ; ``suffix`` is appended
    to every variable name, e.g. ``_s1`` for the inputs of token t+1)."""
    out = []
    if spec.inputs.decay == "a":
        out.append((f"adt{suffix}", f"adt{suffix} * dt{suffix}"))  # the decay input is A; the prologue reads A·Δ
    if "lam" in lowered.symbols:
        out.append((f"lam{suffix}", f"{sigmoid}(trap{suffix})" if spec.inputs.trap == "logit" else f"trap{suffix}"))
    return out


def print_prologue(lowered, printer: KernelPrinter) -> list[tuple[str, str]]:
    """[(name, code)] of a Lowered's prologue (``a``, ``c0`` … ``cJ``) printed by one backend's printer."""
    return [(name, printer.doprint(expr)) for name, expr in lowered.prologue()]


# sympy function -> the name the Triton kernels call (helpers in mamba3_gen/runtime/triton_math.py)
TRITON_FUNCTIONS = {sp.exp: "tl.exp", expm1: "expm1", sp.log: "tl.log", log1p: "log1p", sigmoid: "sigmoid",
                    softplus: "softplus", sp.tanh: "tanh", sp.sqrt: "tl.sqrt"}
# sympy function -> the helpers the CuTe DSL step template defines (fp32)
CUTE_FUNCTIONS = {sp.exp: "_exp", expm1: "_expm1", sp.log: "_log", log1p: "_log1p", sigmoid: "_sigmoid",
                  softplus: "_softplus", sp.tanh: "_tanh", sp.sqrt: "_sqrt"}


def triton_printer() -> KernelPrinter:
    return KernelPrinter(TRITON_FUNCTIONS, where="tl.where", absolute="tl.abs")


def cute_printer() -> KernelPrinter:
    return KernelPrinter(CUTE_FUNCTIONS, where="cutlass.select_", absolute="_abs", number="Float32({})")
