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
from mamba3_gen.spec.formula import FormulaError, parse_formula
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
    "dt +": r"is not a formula",
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
