"""Kernel-test strategies and fixtures shared by the forward and the decode-step tests: which backend runs (the
Triton interpreter on CPU-only machines, compiled kernels on CUDA), random specs and input sizes (hypothesis), and
the tolerances (justified in tests/test_forward.py's docstring)."""
from __future__ import annotations

import os

import pytest
import torch
import triton
from hypothesis import assume, settings
from hypothesis import strategies as st

from mamba3_gen.backends.triton.build import lower
from mamba3_gen.lower.lowering import LoweringError, lower_discretization
from mamba3_gen.reference import make_inputs
from tests.helpers import KernelCache, Tol, env_examples, env_spec, make_spec, respec

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
ENV_SPEC = env_spec()
EXAMPLES = env_examples()

CPU_TOL = Tol(rel=1e-4, atol=1e-5)  # justified in tests/test_forward.py's docstring
GPU_TOL = {torch.float32: Tol(rel=2e-3, atol=1e-4), torch.bfloat16: Tol(rel=1e-2, atol=1e-3)}
LOW_PRECISION = ("q", "k", "v", "z")  # what the official wrappers take in bf16; the rest stays fp32

interpreter_only = pytest.mark.skipif(
    not INTERPRET,
    reason="CUDA is present, so Triton compiles for the GPU: the interpreter tests run on CPU-only machines "
    "(or with TRITON_INTERPRET=1); the tests marked gpu cover this device",
)
gpu_only = pytest.mark.skipif(
    not HAS_CUDA or INTERPRET,
    reason="no CUDA device" if not HAS_CUDA else "TRITON_INTERPRET=1 is set: kernels would not be compiled",
)
not_in_spec_mode = pytest.mark.skipif(
    ENV_SPEC is not None, reason="MAMBA3_GEN_SPEC is set: only the property tests of that spec run"
)


def examples(default: int, ci: int | None = None):
    """max_examples: MAMBA3_GEN_EXAMPLES if set; else `ci` under the derandomized CI profile (CI=true, where the same
    examples run every time and the whole suite must finish on two CPU cores within CI's 90 minutes); else `default`
    (a developer's run, which draws new examples each time)."""
    if EXAMPLES:
        return settings(max_examples=EXAMPLES)
    return settings(max_examples=ci if (ci is not None and os.environ.get("CI")) else default)


def requires_option(option: str):
    """Skip a property test that needs `option` when MAMBA3_GEN_SPEC names a spec without it."""
    off = ENV_SPEC is not None and not getattr(ENV_SPEC.options, option)
    return pytest.mark.skipif(off, reason=f"MAMBA3_GEN_SPEC's spec has options.{option}: false")


def gpu_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return {(8, 0): "sm_80", (8, 9): "sm_89", (12, 0): "sm_120"}.get((major, minor), "sm_90a")


def pinned(kernels: KernelCache, spec, config_index: int):
    """The spec's module with its autotuner pinned to one of the configs the build chose (drawn by the test, so
    that BLOCK_P < P, i.e. several programs per head, is exercised too; a single config also skips benchmarking)."""
    module = kernels(spec)
    cfgs = lower(spec, kernels.arch).configs
    c = cfgs[config_index % len(cfgs)]
    module.mamba3_fwd_kernel.configs = [
        triton.Config({"BLOCK_P": c.block_p}, num_warps=c.num_warps, num_stages=c.num_stages,
                      maxnreg=getattr(c, "maxnreg", None))
    ]
    return module


# ------------------------------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------------------------------
def _interpretable(spec):
    """The interpreter runs bf16 dots on raw bits: test a bf16-compute spec with fp32 dot operands instead."""
    if INTERPRET and spec.dtypes.compute == "bf16":
        return respec(spec, dtypes={"compute": "fp32"})
    return spec


# A small grammar of discretization formulas: terms over dt, adt, lam using every whitelisted function (finite on
# the whole domain dt >= 0, adt <= 0, lam in [0, 1]; ZOH's removable singularity at adt = 0 included).
WEIGHT_TERMS = (
    "dt", "dt * exp(adt)", "dt * lam", "dt * (1 - lam)", "(1 - lam) * dt * exp(adt)", "dt * expm1(adt) / adt",
    "dt * sigmoid(adt)", "dt * tanh(dt)", "dt * exp(0.5 * adt)", "-expm1(adt)", "dt * log1p(-adt) / (1 - adt)",
    "dt * softplus(adt)", "sqrt(dt) * dt", "dt * lam ** 2", "dt / (1 + dt)", "dt * log(1 + dt)",
)
LOG_DECAYS = (None, "adt", "0.5 * adt", "adt - 0.1 * dt", "-softplus(-adt)", "2 * adt")


@st.composite
def formula_rules(draw, max_lags: int = 3) -> dict:
    """make_spec keywords of a custom rule: 1 to max_lags + 1 weights, each a coefficient times one or two terms of
    WEIGHT_TERMS, and an optional log-decay."""
    weights = []
    for _ in range(draw(st.integers(0, max_lags)) + 1):
        terms = draw(st.lists(st.sampled_from(WEIGHT_TERMS), min_size=1, max_size=2))
        coef = draw(st.sampled_from(["1", "0.5", "0.25", "1.5", "-0.5"]))
        weights.append(f"{coef} * (" + " + ".join(terms) + ")")
    return {"rule": "custom", "weights": weights, "log_decay": draw(st.sampled_from(LOG_DECAYS))}


@st.composite
def specs(draw, *, gpu=False, init=None, varlen=None, final=None):
    """A spec: MAMBA3_GEN_SPEC's if set, else a random one. init/varlen/final force those options when not None."""
    if ENV_SPEC is not None:
        return ENV_SPEC if gpu else _interpretable(ENV_SPEC)
    rule = draw(st.sampled_from(["euler", "trap_data", "trap_const", "zoh", "formula", "formula"]))
    lam_value = None
    if rule in ("trap_const", "formula"):
        lam_value = draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0)))
    rule_kw = {"rule": {"euler": "exp_euler", "zoh": "zoh", "trap_data": "exp_trapezoidal",
                        "trap_const": "exp_trapezoidal"}.get(rule, "custom")}
    if rule == "formula":
        rule_kw = draw(formula_rules())
    R = draw(st.sampled_from([1, 2, 4, 8]))
    if gpu:
        N = draw(st.sampled_from([32, 64, 128]))
        P = draw(st.sampled_from([32, 48, 64]))  # 48 pads to a 64-wide tile
        chunk = draw(st.sampled_from([c for c in (8, 16, 32, 64) if 16 <= c * R <= 64]))
    else:
        N = draw(st.sampled_from([16, 32]))
        P = draw(st.sampled_from([8, 16, 24]))  # 24 pads to a 32-wide tile
        chunk = draw(st.sampled_from([c for c in (4, 8, 16) if c * R <= 64]))
    lam_source = "data" if rule == "trap_data" else "constant" if rule == "trap_const" else draw(
        st.sampled_from(["data", "constant"]))
    spec = make_spec(
        **rule_kw, lam=lam_source, lam_value=lam_value,
        kind=draw(st.sampled_from(["real", "complex"])), rope=draw(st.sampled_from([0.5, 1.0])),
        rotation=draw(st.sampled_from(["pairwise", "halved"])),
        N=N, P=P, R=R, G=draw(st.sampled_from([1, 2])), chunk=chunk,
        d_skip=draw(st.booleans()), z_gate=draw(st.booleans()),
        init=draw(st.booleans()) if init is None else init,
        varlen=draw(st.booleans()) if varlen is None else varlen,
    )
    if rule == "formula":
        # a drawn rule whose value the lowering refuses (tests/test_rules.py holds those refusals) is not a kernel
        # test case (one whose derivative it refuses is: its forward is built, its backward refused)
        try:
            lower_discretization(spec)
        except LoweringError:
            assume(False)
    final_states = draw(st.booleans()) if final is None else final
    compute = draw(st.sampled_from(["tf32", "fp32"] + (["bf16"] if gpu else [])))
    inputs = {"trap": draw(st.sampled_from(["logit", "lambda"])), "decay": draw(st.sampled_from(["a_dt", "a"]))}
    return respec(spec, options={"final_states": final_states}, dtypes={"compute": compute}, inputs=inputs)


def _lengths(draw, C: int, gpu: bool):
    short = st.integers(1, max(1, C - 1))  # shorter than a chunk
    longer = st.integers(1, (5 if gpu else 2) * C + 3)
    empty = st.just(0)  # serving engines pack empty sequences too: their final state is their initial one
    lengths = draw(st.lists(st.one_of(short, longer, empty), min_size=1, max_size=3))
    if not any(lengths):
        lengths[0] = 1  # keep at least one token: whole batches of nothing are tested in test_inputs.py
    return lengths


@st.composite
def input_kwargs(draw, spec, *, gpu=False, varlen=None, init=None, extreme=False):
    """make_inputs keyword arguments: sizes (L = 1, L off the chunk grid, several chunks), Δ in [1e-4, 1],
    A·Δ down to −20 (or near 0, or with a few tokens at −inf, −1e4 or 0: ``extreme_decays``, written in by
    ``draw_inputs``, when ``extreme``), λ over all of [0, 1], with or without initial states, packed or batched.
    The backward's tests leave the extremes out: at A·Δ = −inf the gradient through A·Δ is 0·∞ in the float64
    oracle too."""
    C, G = spec.dims.chunk_size, spec.dims.ngroups
    H = G * draw(st.sampled_from([1, 2]))
    use_varlen = spec.options.varlen and (draw(st.booleans()) if varlen is None else varlen)
    use_init = spec.options.initial_states and (draw(st.booleans()) if init is None else init)
    kw = dict(
        H=H, seed=draw(st.integers(0, 2**31 - 1)), with_initial_states=use_init,
        dt_range=(1e-4, 1.0),
        lam_logit_range=draw(st.sampled_from([(-30.0, 30.0), (-4.0, 4.0)])),  # all of [0, 1] / the middle
    )
    decay = draw(st.sampled_from(["adt", "a", "tiny"] + (["extreme"] if extreme else [])))
    if decay in ("adt", "extreme"):
        kw["adt_range"] = (-20.0, 0.0)  # A·Δ down to −20 independently of Δ
    elif decay == "a":
        kw["a_range"] = (-20.0, -1e-3)  # A·Δ = A·Δ, down to −20 with Δ = 1
    else:
        kw["adt_range"] = (-0.05, 0.0)  # near 0: removable singularities (ZOH's at A·Δ = 0) are evaluated there
    if use_varlen:
        kw.update(B=1, nseq_lengths=_lengths(draw, C, gpu))
        kw["L"] = sum(kw["nseq_lengths"])
    else:
        kw["B"] = draw(st.sampled_from([1, 2]))
        most = (6 if gpu else 3) * C + 3
        kw["L"] = draw(st.one_of(st.just(1), st.integers(2, most), st.sampled_from([C, 2 * C])))
    if decay == "extreme":  # a few tokens decay to exactly zero, very strongly, or not at all (every head and row)
        kw["extreme_decays"] = draw(st.lists(st.tuples(st.integers(0, kw["L"] - 1), st.sampled_from(_EXTREME)),
                                             min_size=1, max_size=3))
    return kw


_EXTREME = (float("-inf"), -1e4, 0.0)


def _finite_at(spec, adt: float) -> bool:
    """Whether the rule's log-decay and weights are finite at A·Δ = adt (Δ = 0.5, λ = 0.5, float64): at −inf some
    formula rules give 0·inf = NaN, as their recurrence itself does; those take −1e4 there instead."""
    from mamba3_gen.reference.inputs import rule_coefficients

    one = torch.tensor([0.5], dtype=torch.float64)
    a, ws = rule_coefficients(spec.discretization.resolved_rule(), one, torch.tensor([adt], dtype=torch.float64), one)
    return all(bool(torch.isfinite(x).all()) for x in (a, *ws))


def draw_inputs(spec, size: dict, dtype=torch.float32, device="cpu") -> dict:
    size = dict(size)
    B, L, H = size.pop("B"), size.pop("L"), size.pop("H")
    extreme = size.pop("extreme_decays", ())
    kw = make_inputs(spec, B, L, H, dtype=torch.float32, device=device, **size)
    for t, value in extreme:
        if value == float("-inf") and not _finite_at(spec, value):
            value = -1e4
        kw["adt"][:, :, t] = value  # with inputs.decay "a" the entry holds A: A·Δ is then value·Δ
    if dtype != torch.float32:
        for key in LOW_PRECISION:
            if key in kw:
                kw[key] = kw[key].to(dtype)
    return kw


_DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])


def _gpu_spec_ok(spec, dtype) -> None:
    """fp32 inputs are held to tf32 accuracy, which bf16 dot operands cannot meet: such pairs are not drawn (a
    MAMBA3_GEN_SPEC spec with bf16 operands is tested with bf16 inputs only)."""
    if dtype == torch.float32 and spec.dtypes.compute == "bf16":
        if ENV_SPEC is not None:
            pytest.skip("the spec's dots take bf16 operands: it is tested with bf16 inputs only")
        assume(False)


