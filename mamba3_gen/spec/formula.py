"""Discretization formulas written in a spec, parsed into sympy without ever evaluating spec text.

A formula is an arithmetic expression over the step symbols ``dt`` (Δ_t), ``adt`` (A_t·Δ_t) and ``lam`` (λ_t):
numbers, ``+ - * /``, integer powers (``**`` or ``^``), parentheses and calls of the functions in ``FUNCTIONS``.
The text goes through :func:`ast.parse` (which only builds a syntax tree) and a walk that accepts exactly those node
kinds; anything else (attribute access, subscripts, lambdas, comprehensions, keyword arguments, unknown names) is a
:class:`FormulaError` whose message says what was found and what to write instead. Nothing from the text runs.
"""
from __future__ import annotations

import ast

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

dt, adt, lam = sp.symbols("dt adt lam", real=True)
STEP_SYMBOLS = {"dt": dt, "adt": adt, "lam": lam}
MAX_FORMULA_CHARS = 400  # a discretization weight is a one-liner; this bounds parsing work
MAX_POWER = 8


class sigmoid(sp.Function):
    """σ(x) = 1 / (1 + e^{−x}), kept as one function so that printers emit a stable sigmoid."""

    nargs = 1

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + sp.exp(-x))

    @classmethod
    def eval(cls, x):
        if x.is_Number and x == 0:
            return sp.Rational(1, 2)
        return None


class softplus(sp.Function):
    """softplus(x) = log(1 + e^{x}), kept as one function so that printers emit an overflow-safe form."""

    nargs = 1

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return sp.log(1 + sp.exp(x))

    _eval_rewrite_as_log = _eval_rewrite_as_exp


# name in a formula -> sympy function of one argument
FUNCTIONS = {
    "exp": sp.exp, "expm1": expm1, "log": sp.log, "log1p": log1p, "sigmoid": sigmoid, "softplus": softplus,
    "tanh": sp.tanh, "sqrt": sp.sqrt,
}


_LOWERED = frozenset(FUNCTIONS.values())


class FormulaError(ValueError):
    """A formula that is not in the grammar; the message ends with what to write instead."""


def parse_formula(text, symbols: dict[str, sp.Symbol] | None = None) -> sp.Expr:
    """Parse one formula into a sympy expression.

    ``text``: the formula (str; a number is accepted too). ``symbols``: the names it may use (default: dt, adt, lam).
    Raises FormulaError (a ValueError) for anything outside the grammar of this module's docstring."""
    symbols = STEP_SYMBOLS if symbols is None else symbols
    allowed = ", ".join(symbols) or "(none)"
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise FormulaError(f"expected a formula (a string such as 'lam * dt'), got {type(text).__name__}; "
                           f"try a quoted formula over {allowed}")
    text = " ".join(str(text).split()).replace("^", "**")  # a YAML block scalar may span lines
    if not text.strip():
        raise FormulaError(f"the formula is empty; try a formula over {allowed}, e.g. 'dt'")
    if len(text) > MAX_FORMULA_CHARS:
        raise FormulaError(f"the formula has {len(text)} characters (at most {MAX_FORMULA_CHARS}); try a shorter one")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        # Python reports an unfinished formula ('lam * dt +') at offset 0 or past its end
        where = f"at column {e.offset}" if e.offset and e.offset <= len(text.strip()) else "at its end"
        raise FormulaError(f"'{text}' is not a formula ({e.msg} {where}); "
                           "try operators + - * / ** and balanced parentheses") from None
    except (ValueError, RecursionError, MemoryError):
        raise FormulaError(f"'{text}' cannot be parsed; try a shorter formula with fewer nested parentheses") from None
    try:
        expr = _Converter(symbols, allowed).visit(tree.body)
    except RecursionError:
        raise FormulaError("the formula is nested too deeply; try a shorter one") from None
    expr = exact_constants(expr)
    check_lowerable(expr, f"'{text}'")
    return expr


def check_lowerable(expr: sp.Expr, shown: str, max_power: int = MAX_POWER) -> None:
    """Refuse what sympy made of a formula when no kernel can print it: sympy rewrites as it builds and simplifies
    (``(dt*dt*dt)**3`` is dt**9, ``dt**8 * dt**8`` is dt**16, ``exp(9 * log(dt))`` is dt**9, ``sqrt(sqrt(dt))`` is
    dt**(1/4), ``sqrt(dt**2)`` is Abs(dt), and simplify turns 1 - tanh(x)**2 into 1/cosh(x)**2), so the grammar's
    limits are applied to the expression itself, not only to the text as written.

    Allowed over the step symbols: + - * /, the functions of FUNCTIONS, and powers x**n or x**(n/2) (sqrt(x)**n)
    with a whole n, |n| <= ``max_power`` (a kernel prints a power as a product of n factors). Constant subexpressions
    are not looked into: kernels print them as numbers, and safe_formula refuses non-finite or complex ones.
    ``shown``: how the message names the formula. Raises FormulaError."""
    if not expr.free_symbols:
        return
    if expr.is_Symbol or isinstance(expr, (sp.Add, sp.Mul)) or expr.func in _LOWERED:
        for arg in expr.args:
            check_lowerable(arg, shown, max_power)
        return
    if isinstance(expr, sp.Pow):
        ex = expr.exp
        if ex.is_Rational and ex.q in (1, 2) and abs(ex.p) <= max_power:
            check_lowerable(expr.base, shown, max_power)
            return
        what = (f"a power beyond ±{max_power}" if ex.is_Rational and ex.q in (1, 2)
                else "a power that is neither whole nor a half")
        raise FormulaError(f"{shown} contains {formula_text(expr)} once sympy combines its factors, {what}; try "
                           f"whole-number powers within ±{max_power} (as written and combined) and sqrt(...)")
    raise FormulaError(f"{shown} becomes {formula_text(expr)} once sympy rewrites it, which no kernel computes; try "
                       f"writing it with + - * /, whole powers and {', '.join(FUNCTIONS)}")


def exact_constants(expr: sp.Expr) -> sp.Expr:
    """expr with sympy's named constants as numbers (exp(1) is E, which no printer knows)."""
    return expr.xreplace({c: sp.Float(c.evalf(30), 30) for c in expr.atoms(sp.NumberSymbol)})


class _Converter:
    _BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
               ast.Div: lambda a, b: a / b}

    def __init__(self, symbols: dict[str, sp.Symbol], allowed: str):
        self.symbols = symbols
        self.allowed = allowed

    def visit(self, node: ast.AST) -> sp.Expr:
        if isinstance(node, ast.BinOp):
            left, right = self.visit(node.left), self.visit(node.right)
            if isinstance(node.op, ast.Pow):
                if not (right.is_Integer and abs(int(right)) <= MAX_POWER):
                    fix = (f"a power within ±{MAX_POWER} (a kernel multiplies the factors out)" if right.is_Integer
                           else "sqrt(...) for a power of 1/2" if right.is_Number
                           else f"exp({ast.unparse(node.right)} * log(...))")
                    raise FormulaError(f"power '{ast.unparse(node)}' needs a whole-number exponent within "
                                       f"±{MAX_POWER}; try {fix}")
                return left ** right
            op = self._BINOPS.get(type(node.op))
            if op is None:
                raise FormulaError(f"operator '{_op_text(node.op)}' is not allowed; try + - * / or **")
            return op(left, right)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.USub):
                return -self.visit(node.operand)
            if isinstance(node.op, ast.UAdd):
                return self.visit(node.operand)
            raise FormulaError(f"operator '{_op_text(node.op)}' is not allowed; try + - * / or **")
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise FormulaError(f"{node.value!r} is not a number; try a number such as 0.5")
            return sp.Integer(node.value) if isinstance(node.value, int) else sp.Float(node.value)
        if isinstance(node, ast.Name):
            if node.id in self.symbols:
                return self.symbols[node.id]
            if node.id in FUNCTIONS:
                raise FormulaError(f"'{node.id}' is a function; try {node.id}(...) with one argument")
            raise FormulaError(f"unknown name '{node.id}'; try one of the step symbols {self.allowed}")
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if name not in FUNCTIONS:
                shown = name if name is not None else ast.unparse(node.func)
                raise FormulaError(f"'{shown}' is not an allowed function; try one of {', '.join(FUNCTIONS)}")
            if node.keywords or len(node.args) != 1 or isinstance(node.args[0], ast.Starred):
                raise FormulaError(f"{name}() takes exactly one positional argument; try {name}(adt)")
            return FUNCTIONS[name](self.visit(node.args[0]))
        if isinstance(node, ast.Attribute):
            raise FormulaError(f"attribute access '{ast.unparse(node)}' is not allowed; "
                               f"try plain function names ({', '.join(FUNCTIONS)})")
        kind = {ast.Lambda: "a lambda", ast.ListComp: "a comprehension", ast.GeneratorExp: "a comprehension",
                ast.SetComp: "a comprehension", ast.DictComp: "a comprehension", ast.Subscript: "a subscript",
                ast.Compare: "a comparison", ast.BoolOp: "a boolean operator", ast.IfExp: "a conditional"}.get(
            type(node), f"'{type(node).__name__}'")
        raise FormulaError(f"{kind} is not allowed in a formula; try arithmetic over {self.allowed} "
                           f"with the functions {', '.join(FUNCTIONS)}")


def _op_text(op: ast.AST) -> str:
    return {ast.FloorDiv: "//", ast.Mod: "%", ast.MatMult: "@", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^",
            ast.LShift: "<<", ast.RShift: ">>", ast.Invert: "~", ast.Not: "not"}.get(type(op), type(op).__name__)


def formula_text(expr: sp.Expr) -> str:
    """A formula as a user would write it back (sympy's text, with this grammar's function names)."""
    return sp.sstr(expr)
