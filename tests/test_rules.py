"""Discretization rules as data: the formula grammar, its refusals, the lowering's safety checks, and the promise
that no template names a rule.

Kernel and oracle agreement for drawn formula rules lives with the other property tests (test_forward.py,
test_step.py, test_reference.py draw rules from tests/strategies.formula_rules); here the trapezoid written as
formulas is checked against the preset, and ZOH at its removable singularity.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import sympy as sp
import torch
from typer.testing import CliRunner

from mamba3_gen.cli import app
from mamba3_gen.lower.evaluate import evaluate_float
from mamba3_gen.lower.lowering import SERIES_RADIUS, LoweringError, lower_discretization
from mamba3_gen.reference import make_inputs, naive_recurrence, rel_err, to_float64
from mamba3_gen.spec.formula import FormulaError, dt as dt_sym, parse_formula
from mamba3_gen.spec.loader import SpecError, load_spec_text
from mamba3_gen.spec.rules import PRESETS, preset_rule
from tests.cases import make_spec
from tests.strategies import interpreter_only

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = REPO_ROOT / "templates"


def _custom(weights, log_decay=None, extra="") -> str:
    lines = ["name: formula_test", "discretization:", "  rule: custom"]
    if log_decay is not None:
        lines.append(f"  log_decay: {log_decay!r}")
    lines.append("  weights:")
    lines += [f"    - {w!r}" for w in weights]
    return "\n".join(lines) + "\n" + extra


# ------------------------------------------------------------------------------------------------ grammar refusals
BAD_FORMULAS = {
    "__import__('os').system('touch /tmp/mamba3_gen_pwned')": r"not an allowed function",
    "os.system('ls')": r"not an allowed function",
    "dt.real": r"attribute access",
    "(lambda: 1)()": r"not an allowed function",
    "lambda x: x": r"a lambda is not allowed",
    "[x for x in dt]": r"a comprehension is not allowed",
    "(x for x in dt)": r"a comprehension is not allowed",
    "dt[0]": r"a subscript is not allowed",
    "foo": r"unknown name 'foo'",
    "gamma(dt)": r"'gamma' is not an allowed function",
    "exp": r"'exp' is a function",
    "exp(dt, adt)": r"exactly one positional argument",
    "exp(x=dt)": r"exactly one positional argument",
    "dt ** 0.5": r"whole-number exponent",
    "dt ** lam": r"whole-number exponent",
    "dt // 2": r"operator '//' is not allowed",
    "dt % 2": r"operator '%' is not allowed",
    "dt if lam else adt": r"a conditional is not allowed",
    "dt < adt": r"a comparison is not allowed",
    "dt and lam": r"a boolean operator is not allowed",
    "'dt'": r"is not a number",
    "True": r"is not a number",
    "dt +": r"is not a formula \((?!.*column 0)",  # where Python says offset 0: "at its end"
    "dt + ) * 2": r"is not a formula \(unmatched '\)' at column \d",
    "(" * 200 + "dt" + ")" * 200: r"too deeply|cannot be parsed|characters",
    "dt + " * 200 + "dt": r"at most 400",
    "": r"empty",
}


@pytest.mark.parametrize("text", list(BAD_FORMULAS), ids=lambda t: re.sub(r"\W+", "_", t)[:40] or "empty")
def test_bad_formula_is_refused_with_file_line_and_field(text):
    src = _custom(["dt", text])
    with pytest.raises(SpecError) as e:
        load_spec_text(src, filename="rules.yaml")
    msg = str(e.value)
    assert msg.startswith("rules.yaml:6: discretization.weights[1]: "), msg
    assert re.search(BAD_FORMULAS[text], msg), msg
    assert "; try " in msg, msg


def test_formula_text_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    src = _custom(["dt", f"__import__('os').system('touch {marker}')"])
    with pytest.raises(SpecError):
        load_spec_text(src)
    with pytest.raises(FormulaError):
        parse_formula(f"__import__('pathlib').Path('{marker}').touch()")
    assert not marker.exists()


def test_bad_log_decay_and_weight_counts():
    with pytest.raises(SpecError, match=r":4: discretization.log_decay: unknown name 'A'"):
        load_spec_text(_custom(["dt"], log_decay="A * dt"), filename="f.yaml")
    with pytest.raises(SpecError, match=r"discretization.weights: a rule has 1 to 4 weights"):
        load_spec_text(_custom(["dt"] * 5))
    with pytest.raises(SpecError, match=r"discretization.weights: rule: custom needs its weights"):
        load_spec_text("name: x\ndiscretization:\n  rule: custom\n")
    with pytest.raises(SpecError, match=r"discretization.weights: only read with rule: custom"):
        load_spec_text("name: x\ndiscretization:\n  rule: zoh\n  weights: [dt]\n")
    with pytest.raises(SpecError, match=r"discretization.lambda_value: the rule custom does not use"):
        load_spec_text(_custom(["dt * exp(adt)"]).replace("  rule: custom\n", "  rule: custom\n  lambda_value: 0.5\n"))


def test_cli_refuses_a_bad_formula_with_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(_custom(["dt", "os.getcwd()"]))
    res = CliRunner().invoke(app, ["check", str(path), "--no-aot"])
    assert res.exit_code == 2, res.output
    assert f"{path}:6: discretization.weights[1]: 'os.getcwd' is not an allowed function" in res.output
    assert "Traceback" not in res.output


# --------------------------------------------------------------------------------------------- lowering refusals
UNSAFE = {
    "dt / adt": r"unbounded at adt = 0 \(not a removable singularity\)",
    "dt / (1 + adt)": r"unbounded at adt = -1",
    "log(dt)": r"unbounded as dt -> 0 and adt -> 0 \(what padding tokens feed the kernels\)",
    "sqrt(adt)": r"not finite \(in fp32\) at adt = -1000",
    "dt * log(adt)": r"not finite \(in fp32\) at",
    "exp(-100 * adt) * dt": r"not finite \(in fp32\) at",
    "dt * exp(-adt)": r"not finite \(in fp32\) at dt = 0.0001, adt = -1000",  # unbounded as A·Δ → −∞
    "exp(dt)": r"not finite \(in fp32\) at dt = 100",
    "log(0) * dt": r"not a finite real number",
    "sqrt(-1) * dt": r"not a finite real number",
    "dt / (adt - adt)": r"not a finite real number",
    "dt * expm1(lam * adt) / (lam * adt)": r"singularity in several variables at once",
}


@pytest.mark.parametrize("text", list(UNSAFE))
def test_unsafe_formula_is_refused_at_build(text, tmp_path):
    spec = load_spec_text(_custom(["dt", text]))
    with pytest.raises(LoweringError, match=r"^discretization\.weights\[1\]: .*" + UNSAFE[text]) as e:
        lower_discretization(spec)
    assert "; try " in str(e.value)
    path = tmp_path / "unsafe.yaml"
    path.write_text(_custom(["dt", text]))
    res = CliRunner().invoke(app, ["build", str(path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert f"{path}:6: discretization.weights[1]: " in res.output
    assert not (tmp_path / "out" / "formula_test").exists()


@pytest.mark.parametrize("log_decay", ["-adt", "adt + dt", "0.1"])
def test_growing_log_decay_is_refused(log_decay):
    spec = load_spec_text(_custom(["dt"], log_decay=log_decay))
    with pytest.raises(LoweringError, match=r"^discretization\.log_decay: .* > 0 at .*must be <= 0"):
        lower_discretization(spec)


def test_higher_order_singularity_is_accurate_around_its_series():
    """A fifth-order cancellation: the series radius and order are chosen per formula, so that fp32 arithmetic (what
    a kernel does) is within 2e-6 of the exact value on both sides of the radius and far from it."""
    import mpmath

    text = "dt * (exp(adt) - 1 - adt - adt**2/2 - adt**3/6 - adt**4/24) / adt**5"
    (c0,) = lower_discretization(load_spec_text(_custom([text]))).weights
    mpmath.mp.dps = 250  # the quotient cancels 150 digits at x = -1e-30
    for x in (0.0, -1e-30, -1e-3, -0.06, -0.07, -0.2, -0.5, -1.0, -1.99, -2.01, -3.0, -8.0):
        if x == 0.0:
            exact = 1 / 120
        else:
            X = mpmath.mpf(x)
            exact = float((mpmath.exp(X) - 1 - X - X**2 / 2 - X**3 / 6 - X**4 / 24) / X**5)
        got = evaluate_float(c0, {"dt": 1.0, "adt": x}, dtype=torch.float32)
        assert abs(got - exact) <= 2e-6 * max(1.0, abs(exact)), (x, got, exact)


def test_oracle_evaluates_removable_singularities_by_their_series():
    """The float64 oracle reads the rule's own formula, ZOH written as a plain quotient included: at A·Δ = −1e-30 it
    gives the limit (Δ), not the cancelled 0/tiny."""
    spec = load_spec_text(_custom(["dt * (exp(adt) - 1) / adt"]).replace("name: formula_test", "name: zoh_plain")
                          + "state: {kind: real}\ndims: {d_state: 4, headdim: 4}\n")
    kw = to_float64(make_inputs(spec, 1, 3, 1, adt_range=(-1.0, 0.0)))
    kw["adt"][..., 1] = -1e-30
    a = naive_recurrence(spec, **kw)[0]
    kw["adt"][..., 1] = 0.0
    b = naive_recurrence(spec, **kw)[0]
    assert rel_err(a, b) <= 1e-14


# -------------------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_formulas_in_the_same_schema(name, tmp_path):
    rule = preset_rule(name)
    _, log_decay, weights = PRESETS[name]
    custom = load_spec_text(_custom(list(weights), log_decay)).rule
    assert custom.weights == rule.weights and custom.log_decay == rule.log_decay
    path = tmp_path / "preset.yaml"
    path.write_text(f"name: p\ndiscretization:\n  rule: {name}\n")
    shown = CliRunner().invoke(app, ["check", "--no-aot", str(path)])
    assert shown.exit_code == 0, shown.output
    for w in rule.weights:
        assert sp.sstr(w) in shown.output


def test_zoh_removable_singularity_is_evaluated_as_its_limit():
    low = lower_discretization(make_spec(rule="zoh", kind="real"))
    (c0,) = low.weights
    assert isinstance(c0, sp.Piecewise)
    for dt in (1e-3, 0.5):
        assert evaluate_float(c0, {"dt": dt, "adt": 0.0}) == pytest.approx(dt, rel=1e-15)
        for x in (-SERIES_RADIUS * (1 - 1e-9), -SERIES_RADIUS * (1 + 1e-9), -1e-12, -1.0, -30.0):
            exact = dt * math.expm1(x) / x
            assert evaluate_float(c0, {"dt": dt, "adt": x}) == pytest.approx(exact, rel=1e-10)
    # the naive oracle evaluates the rule's own formula (not the lowering) and still gets the limit at A·Δ = 0
    spec = make_spec(rule="zoh", kind="real", N=4, P=4)
    kw = to_float64(make_inputs(spec, 1, 3, 1, adt_range=(-1.0, 0.0)))
    kw["adt"][..., 1] = 0.0
    out, st_ = naive_recurrence(spec, **kw)
    assert torch.isfinite(out).all() and torch.isfinite(st_.ssm).all()


# ----------------------------------------------------------------------------------------- templates name no rule
RULE_WORDS = sorted(set(PRESETS) | {"custom", "trapezoid", "euler", "lam_source", "carries_prev_token", "has_shift",
                                    "lambda_value", "beta", "gamma", "init_shift", "zero-order"})


def test_no_template_names_a_rule_or_branches_on_one():
    found = []
    for path in sorted(TEMPLATES.rglob("*.jinja")):
        text = path.read_text(encoding="utf-8").lower()
        for word in RULE_WORDS:
            if re.search(rf"\b{re.escape(word.lower())}\b", text):
                found.append(f"{path.relative_to(REPO_ROOT)}: {word}")
        for branch in re.findall(r"{%-?\s*(?:if|elif)\s+([^%]*)%}", text):
            if re.search(r"\blam\b|lambda|rule", branch):
                found.append(f"{path.relative_to(REPO_ROOT)}: branches on '{branch.strip()}'")
    assert not found, "templates must read the rule only through the lowered prologue:\n" + "\n".join(found)


# ------------------------------------------------------------------------------- formulas == presets, in kernels
@interpreter_only
def test_trapezoid_as_formulas_equals_the_preset(interp_kernels):
    kernels = interp_kernels
    preset = make_spec(rule="exp_trapezoidal", N=16, P=8, R=2, chunk=8, init=True, varlen=True, rotation="halved")
    _, log_decay, weights = PRESETS["exp_trapezoidal"]
    custom = make_spec(rule="custom", weights=weights, log_decay=log_decay, N=16, P=8, R=2, chunk=8, init=True,
                       varlen=True, rotation="halved")
    kw = make_inputs(preset, 2, 21, 2, seed=3, with_initial_states=True)
    a, sa = kernels(preset).mamba3_forward(**kw, return_final_states=True)
    b, sb = kernels(custom).mamba3_forward(**kw, return_final_states=True)
    assert rel_err(b, a) <= 1e-6
    for f in ("angle", "ssm", "k", "v"):
        assert rel_err(getattr(sb, f), getattr(sa, f)) <= 1e-6, f


# ------------------------------------------------------------------------------- review: fields written in vain
@pytest.mark.parametrize("rule", ["zoh", "exp_euler", "custom"])
@pytest.mark.parametrize("written", ["lambda: data", "lambda: constant", "lambda_value: null", "lambda_value: 0.5"])
def test_lambda_written_on_a_rule_without_lam_is_refused(rule, written, tmp_path):
    """'lambda: data' is the default, yet written by hand on a rule that reads no λ it is refused like any other λ
    setting there: the user believes it matters. Defaults (nothing written) and whole-section dumps still load."""
    weights = "  weights: ['dt * exp(adt)']\n" if rule == "custom" else ""
    src = f"name: x\ndiscretization:\n  rule: {rule}\n{weights}  {written}\n"
    key = written.split(":")[0]
    fix = "weights that use lam" if rule == "custom" else "rule: exp_trapezoidal"
    with pytest.raises(SpecError) as e:
        load_spec_text(src, filename="f.yaml")
    line = 5 if rule == "custom" else 4
    assert str(e.value) == (f"f.yaml:{line}: discretization.{key}: the rule {rule} does not use λ (its formulas "
                            f"have no lam); try removing '{key}', or {fix}"
                            + (", e.g. ['lam * dt', '(1 - lam) * dt * exp(adt)']" if rule == "custom" else ""))
    path = tmp_path / "lam.yaml"
    path.write_text(src)
    res = CliRunner().invoke(app, ["check", str(path), "--no-aot"])
    assert res.exit_code == 2 and f"{path}:{line}: discretization.{key}: the rule {rule}" in res.output, res.output
    assert "Traceback" not in res.output


def test_lambda_defaulted_or_dumped_still_loads():
    """What no person wrote is never refused: the default, and a section that spells out every field as model_dump
    writes it (a Spec passed back to mamba3_gen.load, a package's spec.json, the CuTe AOT's temporary YAML)."""
    import io

    from ruamel.yaml import YAML

    from mamba3_gen.spec.sources import resolve_spec
    from tests.helpers import respec

    spec = load_spec_text("name: x\ndiscretization:\n  rule: zoh\n")
    assert spec.discretization.lambda_ == "data" and "lambda_" not in spec.discretization.model_fields_set
    dump = spec.model_dump(mode="json", by_alias=True)
    assert dump["discretization"]["lambda"] == "data"
    assert resolve_spec(spec)[0] == spec and resolve_spec(dump)[0] == spec
    text = io.StringIO()
    YAML(typ="safe", pure=True).dump(dump, text)  # as backends/cute/aot.py writes a Spec for its subprocess
    assert load_spec_text(text.getvalue()) == spec
    assert respec(spec, dtypes={"compute": "fp32"}).discretization == spec.discretization
    assert lower_discretization(spec).lam_source == "none"
    with pytest.raises(SpecError, match=r"^<dict>: discretization.lambda: the rule zoh does not use λ"):
        resolve_spec({"name": "x", "discretization": {"rule": "zoh", "lambda": "data"}})


WRONG_TYPES = {
    "weights: dt * lam": ("weights", "'dt * lam' (a string); try weights: ['dt * lam']"),
    "weights: {c0: lam * dt, c1: dt}": ("weights", "a mapping (keys c0, c1); try weights: ['lam * dt', 'dt']"),
    "weights: 0.5": ("weights", "0.5 (a number); try weights: ['0.5']"),
    "weights: true": ("weights", "true (a boolean); try weights: ['lam * dt', '(1 - lam) * dt * exp(adt)']"),
}


@pytest.mark.parametrize("line", list(WRONG_TYPES))
def test_weights_not_a_list_is_named_with_its_type_and_an_example(line):
    field, tail = WRONG_TYPES[line]
    with pytest.raises(SpecError) as e:
        load_spec_text(f"name: x\ndiscretization:\n  rule: custom\n  {line}\n", filename="f.yaml")
    assert str(e.value) == (f"f.yaml:4: discretization.{field}: expected a list of 1 to 4 formulas (c_0 for token t, "
                            f"c_1 for token t-1, ...), got {tail}")


@pytest.mark.parametrize("body, field, got", [
    ("  weights:\n    - dt\n    - [lam]\n", "weights[1]", "a list"),
    ("  weights:\n    - dt\n    -\n", "weights[1]", "nothing (null)"),
    ("  weights:\n    - dt\n    - c1: lam\n", "weights[1]", "a mapping (keys c1)"),
    ("  log_decay: [adt]\n  weights: [dt]\n", "log_decay", "a list"),
    ("  log_decay: true\n  weights: [dt]\n", "log_decay", "true (a boolean)"),
])
def test_formula_items_of_the_wrong_type_are_named(body, field, got):
    with pytest.raises(SpecError) as e:
        load_spec_text(f"name: x\ndiscretization:\n  rule: custom\n{body}", filename="f.yaml")
    line = 6 if field == "weights[1]" else 4
    example = "'lam * dt'); try one formula per item, quoted: weights: ['dt']" if field != "log_decay" else (
        "'adt - 0.1 * dt'); try log_decay: 'adt'")
    assert str(e.value) == (f"f.yaml:{line}: discretization.{field}: expected a formula (a string such as "
                            f"{example.split(');')[0]}), got {got};{example.split(');')[1]}")


# --------------------------------------------------------------------- review: the power limit after sympy
COMBINED = {
    "(dt*dt*dt)**3": "dt**9", "dt**8 * dt**8": "dt**16", "exp(9 * log(dt))": "dt**9", "(dt**8)**8": "dt**64",
    "((dt**8)**8)**8": "dt**512", "dt*" * 60 + "dt": "dt**61", "sqrt(dt)**8 * sqrt(dt)": "dt**(9/2)",
    "exp(-9 * log(1 + dt))": "(dt + 1)**(-9)",
}
NOT_LOWERABLE = {"sqrt(sqrt(dt))": "dt**(1/4)", "exp(0.3 * log(dt))": "dt**0.3", "dt * sqrt(dt**2)": "Abs(dt)"}


@pytest.mark.parametrize("text", list(COMBINED) + list(NOT_LOWERABLE), ids=lambda t: re.sub(r"\W+", "_", t)[:30])
def test_power_limit_holds_for_what_sympy_combines(text):
    """sympy folds powers as it builds an expression: the ±8 limit (a kernel prints x**n as n factors; dt**512 would
    be 512) and the grammar's functions are checked on the result, not only on the text as written."""
    with pytest.raises(SpecError) as e:
        load_spec_text(_custom(["dt", text]), filename="f.yaml")
    msg = str(e.value)
    assert msg.startswith(f"f.yaml:6: discretization.weights[1]: '{text}' "), msg
    if text in COMBINED:
        assert f"contains {COMBINED[text]} once sympy combines its factors, a power beyond ±8; try " in msg, msg
    else:
        assert f" {NOT_LOWERABLE[text]} once sympy " in msg and "; try " in msg, msg


def test_power_limit_holds_after_a_constant_lambda_is_substituted():
    """exp(18·lam·log(1 + dt)) is not a power as written; with λ = 0.5 it is (1 + dt)**9: refused by the lowering,
    naming the formula and λ. A whole exponent from λ is made exact ((1 + dt)**1.0 would print nowhere)."""
    def const(weight):
        return load_spec_text(_custom([weight], extra="").replace(
            "  rule: custom\n", "  rule: custom\n  lambda: constant\n  lambda_value: 0.5\n"))

    with pytest.raises(LoweringError) as e:
        lower_discretization(const("dt * exp(18 * lam * log(1 + dt))"))
    assert str(e.value).startswith("discretization.weights[0]: 'dt*exp(18*lam*log(dt + 1))' with lam = 0.5 contains "
                                   "(dt + 1)**9 once sympy combines its factors, a power beyond ±8; try "), e.value
    (c0,) = lower_discretization(const("dt * exp(2 * lam * log(1 + dt))")).weights
    assert sp.expand(c0 - dt_sym * (1 + dt_sym)) == 0


def test_simplify_never_leaves_the_grammar():
    """sympy's simplify writes 1 - tanh(x)**2 as 1/cosh(x)**2, which no kernel computes: the formula is then kept
    as written; exp(1) (sympy's E) is a number. Both evaluate to the formula's value."""
    low = lower_discretization(load_spec_text(_custom(["dt * (1 - tanh(dt)**2) * exp(1)"])))
    (c0,) = low.weights
    assert not c0.has(sp.cosh) and not c0.has(sp.E)
    assert all(not d.has(sp.cosh) for d in low.derivatives.values())
    assert evaluate_float(c0, {"dt": 0.7}) == pytest.approx(0.7 * (1 - math.tanh(0.7) ** 2) * math.e, rel=1e-15)


def test_powers_within_the_limit_still_lower():
    # a derivative may hold one more power than the limit (d/dadt of (1 - adt)**-8 has (1 - adt)**-9)
    low = lower_discretization(load_spec_text(_custom(["dt**8", "sqrt(dt)**7 / (1 - adt)**8"])))
    assert set(low.derivatives) == {"adt a", "dt c0", "dt c1", "adt c1"}
    assert evaluate_float(low.derivatives["adt c1"], {"dt": 1.0, "adt": -1.0}) == pytest.approx(8 / 2**9, rel=1e-15)


# ------------------------------------------------------------------------ review: derivatives are made safe too
def test_zoh_derivatives_are_finite_at_and_near_zero():
    """The backward's ∂c0/∂adt = Δ·(a·e^a − expm1(a))/a² and ∂c0/∂dt = expm1(a)/a are 0/0 at a = 0: they get the
    values' guard (series near 0). Checked against exact values (mpmath, 250 digits; sympy's limit at 0) in float64
    (within 1e-9: the series is cut for fp32, at PRECISIONS["fp32"] series tolerance 1e-9) and in fp32 (within 2e-6,
    the fp32 closed-form tolerance the radius is chosen for), and against a float64 central difference of the
    lowered value c0 (h = 1e-6: rounding ~2e-16/h = 2e-10, truncation ~h² = 1e-12)."""
    import mpmath

    from mamba3_gen.lower.lowering import PRECISIONS

    low = lower_discretization(make_spec(rule="zoh", kind="real"))
    (c0,) = low.weights
    d_adt, d_dt = low.derivatives["adt c0"], low.derivatives["dt c0"]
    assert isinstance(d_adt, sp.Piecewise) and isinstance(d_dt, sp.Piecewise)
    radius = float(d_adt.args[0][1].args[1])
    x = sp.Symbol("x", real=True)
    at_zero = sp.limit(sp.diff((sp.exp(x) - 1) / x, x), x, 0)  # ∂c0/∂adt / dt at adt = 0
    assert at_zero == sp.Rational(1, 2)
    mpmath.mp.dps = 250
    _, closed_tol, series_tol = PRECISIONS["fp32"]
    dt_ = 0.7
    for a in (0.0, -1e-30, -1e-12, -1e-6, -1e-3, -radius * (1 - 1e-9), -radius * (1 + 1e-9), -0.3, -1.0, -30.0):
        A = mpmath.mpf(a)
        exact_adt = dt_ * float(at_zero) if a == 0 else float(dt_ * (A * mpmath.exp(A) - mpmath.expm1(A)) / A**2)
        exact_dt = 1.0 if a == 0 else float(mpmath.expm1(A) / A)
        p = {"dt": dt_, "adt": a}
        for d, exact in ((d_adt, exact_adt), (d_dt, exact_dt)):
            got64 = evaluate_float(d, p)
            got32 = evaluate_float(d, p, dtype=torch.float32)
            assert math.isfinite(got64) and abs(got64 - exact) <= series_tol * max(1.0, abs(exact)), (a, got64, exact)
            assert abs(got32 - exact) <= closed_tol * max(1.0, abs(exact)), (a, got32, exact)
        h = 1e-6
        if abs(abs(a) - SERIES_RADIUS) > 2 * h:  # both points on one side of c0's own series radius
            up, down = (evaluate_float(c0, {"dt": dt_, "adt": a + s * h}) for s in (1, -1))
            fd = (up - down) / (2 * h)
            assert fd == pytest.approx(exact_adt, rel=1e-8, abs=1e-8), (a, fd, exact_adt)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_derivatives_are_finite_on_the_domain_and_at_padding(name):
    low = lower_discretization(make_spec(rule=name, kind="real"))
    assert low.derivatives, name
    for d in low.derivatives.values():
        for p in ({"dt": 0.0, "adt": 0.0, "lam": 0.0}, {"dt": 1e-4, "adt": -1e-30, "lam": 1.0},
                  {"dt": 100.0, "adt": -1e3, "lam": 0.5}):
            assert math.isfinite(evaluate_float(d, p, dtype=torch.float32)), (name, d, p)


def test_unbounded_derivative_refuses_the_backward_only(tmp_path):
    """dt·sqrt(−adt) is finite, its ∂/∂adt = −dt/(2·sqrt(−adt)) is not at adt = 0: the spec builds (its forward and
    step need no derivative), and the lowering records why its backward is refused, which `check` prints."""
    path = tmp_path / "deriv.yaml"
    path.write_text(_custom(["dt * sqrt(-adt)"]))
    low = lower_discretization(load_spec_text(path.read_text()))
    assert low.backward_refusal == (
        "discretization.weights[0]: the derivative d/dadt of dt*sqrt(-adt), -dt/(2*sqrt(-adt)), is unbounded at "
        "adt = 0 (not a removable singularity); the backward reads this derivative, so a gradient is refused (the "
        "forward and the decode step are not affected); try a formula whose denominator never vanishes for adt <= 0")
    assert low.derivatives == {}
    res = CliRunner().invoke(app, ["check", str(path), "--no-aot"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "refused: discretization.weights[0]: the derivative d/dadt" in text
    assert "backward: refused (discretization.weights[0]:" in text and "dot operands;" not in text


@interpreter_only
def test_a_rule_whose_derivative_is_refused_still_runs_forward(interp_kernels):
    """A rule whose values are fine but one of whose derivatives has a singularity no one-variable series covers
    (log1p(−adt)/(1 − adt) + expm1(adt)/adt at a constant λ: its d/dadt is 0/0 at adt = 0 in a way that depends on dt
    too) builds: the forward equals the float64 recurrence, `check` says the backward is refused and why, and a
    gradient request raises InputError naming the weight (hypothesis drew this rule in CI)."""
    from mamba3_gen.errors import InputError

    weights = ["dt * lam", "0.5 * (dt * log1p(-adt) / (1 - adt) + dt * expm1(adt) / adt)"]
    spec = make_spec(rule="custom", weights=weights, lam="constant", lam_value=1.0, N=16, P=8, chunk=8)
    spec = spec.model_copy(update={"dtypes": spec.dtypes.model_copy(update={"input": "fp32", "compute": "fp32"})})
    low = lower_discretization(spec)
    assert low.backward_refusal and low.backward_refusal.startswith("discretization.weights[1]")
    assert "refused" in low.describe()["backward"]
    module = interp_kernels(spec)
    kw = make_inputs(spec, 1, 11, 2, seed=0)
    out = module.mamba3_forward(**kw)
    assert rel_err(out.double(), naive_recurrence(spec, **kw)[0]) <= 1e-4  # fp32 kernel vs float64 (test_forward)
    kw["q"].requires_grad_(True)
    with pytest.raises(InputError, match=r"discretization\.weights\[1\].*a gradient is refused"):
        module.mamba3_forward(**kw)
