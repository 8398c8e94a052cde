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
        raise FormulaError(f"'{text}' is not a formula ({e.msg} at column {e.offset}); "
                           "try operators + - * / ** and balanced parentheses") from None
    except (ValueError, RecursionError, MemoryError):
        raise FormulaError(f"'{text}' cannot be parsed; try a shorter formula with fewer nested parentheses") from None
    try:
        return _Converter(symbols, allowed).visit(tree.body)
    except RecursionError:
        raise FormulaError("the formula is nested too deeply; try a shorter one") from None


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
                    raise FormulaError(f"power '{ast.unparse(node)}' needs a whole-number exponent within "
                                       f"±{MAX_POWER}; try exp({ast.unparse(node.right)} * log(...)) or a product")
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
