"""Property tests of the generated forward kernels against the float64 oracles (mamba3_gen.reference).

On a machine without CUDA the kernels run on the CPU through the Triton interpreter (TRITON_INTERPRET=1, set below
before any generated module is imported, since triton.jit reads it when a kernel is decorated) with fp32 inputs:
the interpreter runs a dot on bf16 operands as raw integer bits, so bf16 is only tested on a GPU. Test specs are built
into a pytest temporary directory with arch "interpreter" (no GPU-only limits), once per spec hash.

Covered: random specs x random inputs vs the naive recurrence (output and every final state); split sequences
through the carried states; varlen packs vs per-sequence runs; exp_euler + real vs an SSD head; the official golden
vectors; each shipped spec at small sizes; the op's input checks. The same property tests, marked `gpu`, run on CUDA
in bf16 and fp32 at moderate sizes.

Environment: MAMBA3_GEN_SPEC=path/to/spec.yaml restricts the run to the property tests of that spec (at small runtime
sizes; the other tests skip), MAMBA3_GEN_EXAMPLES=n overrides hypothesis' max_examples (`mamba3-gen test SPEC` sets
both). CI=true selects the derandomized "ci" hypothesis profile (tests/conftest.py).

Tolerances (fp32 on the CPU): ‖out − ref‖/‖ref‖ ≤ 1e-4 and max|out − ref| ≤ 1e-4·max|ref| + 1e-5, for the output
and every final state; the angle state as a circular (wrapped) error ≤ 1e-4·2π + 1e-5. Justification: the kernel
computes in fp32 (unit roundoff 6e-8) what the oracle computes in float64 from the same fp32 inputs, so the whole
difference is fp32 rounding inside the kernel. The largest amplifier is the decay exp(cs_i − cs_j), whose in-chunk
cumulative sums reach |cs| ≤ 20·C ≤ 320 here: an absolute error of ~320·6e-8 ≈ 2e-5 in the exponent is a 2e-5
relative error of a weight (and only of weights whose own decay is not negligible); Θ sums at most C steps of ≤ π
(≈ 50 rad, 3e-6 rad of error); dot products over N ≤ 32 and C·R ≤ 64 terms add ~1e-6. Observed errors are ~1e-7,
so 1e-4 has a margin of 5x over the worst case and 1000x over the typical one while any formula error (≥ 1e-3)
fails. The absolute floor 1e-5 only matters when the reference is (near) zero, e.g. λ = 0 with L = 1.
GPU: bf16 inputs ≤ 1e-2 relative (bf16 has an 8-bit mantissa: storing the output alone costs up to 3.9e-3 of an
element), fp32 inputs ≤ 2e-3 relative (the dots run on tf32 operands, 11-bit mantissa, unit roundoff 4.9e-4).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from mamba3_gen.reference import make_inputs, naive_recurrence, rel_err
from mamba3_gen.reference.inputs import token_inputs
from mamba3_gen.spec.loader import load_spec
from tests.helpers import (
    GOLDEN,
    GOLDEN_TOL,
    SHIPPED_SPECS,
    KernelCache,
    assert_matches,
    golden_case,
    golden_errors,
    make_spec,
    respec,
    run_op,
    split_varlen,
    ssd_head,
    Tol,
    to_device,
    state_slice,
    time_slice,
)
from tests.strategies import (
    CPU_TOL,
    GPU_TOL,
    INTERPRET,
    _DTYPES,
    _gpu_spec_ok,
    _interpretable,
    draw_inputs,
    examples,
    gpu_only,
    input_kwargs,
    interpreter_only,
    not_in_spec_mode,
    pinned,
    requires_option,
    specs,
)

# ------------------------------------------------------------------------------------------------------------------
# both forwards: every test of this module runs with the fused kernel and with the chunk-parallel pair (issue 11)
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module", params=["fused", "chunked"])
def forward_kind(request):
    """MAMBA3_GEN_FORWARD for the whole module run: `fused` (the default forward) then `chunked` (the states kernel
    over state tiles, then the out kernel over chunks). Module-scoped so hypothesis' function-scoped-fixture check
    does not apply; restored afterwards."""
    old = os.environ.get("MAMBA3_GEN_FORWARD")
    os.environ["MAMBA3_GEN_FORWARD"] = request.param
    yield request.param
    if old is None:
        os.environ.pop("MAMBA3_GEN_FORWARD", None)
    else:
        os.environ["MAMBA3_GEN_FORWARD"] = old


# ------------------------------------------------------------------------------------------------------------------
# interpreter (CPU) property tests
# ------------------------------------------------------------------------------------------------------------------
@interpreter_only
@examples(80, ci=40)
@given(spec=specs(), data=st.data())
def test_matches_oracle(spec, data, interp_kernels):
    """Random spec and inputs: output and every final state equal the float64 naive recurrence."""
    size = data.draw(input_kwargs(spec, extreme=True), label="size")
    module = pinned(interp_kernels, spec, data.draw(st.integers(0, 7), label="config"))
    kw = draw_inputs(spec, size)
    got = run_op(module, spec, kw)
    ref = naive_recurrence(spec, **kw)
    assert_matches(got, ref if got[1] is not None else (ref[0], None), CPU_TOL)


@interpreter_only
@requires_option("initial_states")
@requires_option("final_states")
@examples(40, ci=20)
@given(spec=specs(init=True, final=True, varlen=False), data=st.data())
def test_split_sequence(spec, data, interp_kernels):
    """Running [0, L1) and then [L1, L) from the carried final states equals running [0, L) at once."""
    size = data.draw(input_kwargs(spec, varlen=False, extreme=True), label="size")
    assume(size["L"] >= 2)
    L1 = data.draw(st.integers(1, size["L"] - 1), label="L1")
    module = pinned(interp_kernels, spec, data.draw(st.integers(0, 7), label="config"))
    kw = draw_inputs(spec, size)
    out, state = run_op(module, spec, kw, final=True)
    out1, s1 = run_op(module, spec, time_slice(kw, 0, L1), final=True)
    out2, s2 = run_op(module, spec, {**time_slice(kw, L1, size["L"]), "initial_states": s1}, final=True)
    assert_matches((torch.cat([out1, out2], dim=1), s2), (out, state), CPU_TOL, what=f"split at {L1}")


@interpreter_only
@requires_option("varlen")
@examples(40, ci=25)
@given(spec=specs(varlen=True), data=st.data())
def test_varlen_equals_separate(spec, data, interp_kernels):
    """A varlen pack (sequences shorter than a chunk included) equals each sequence run on its own."""
    size = data.draw(input_kwargs(spec, varlen=True, extreme=True), label="size")
    module = pinned(interp_kernels, spec, data.draw(st.integers(0, 7), label="config"))
    kw = draw_inputs(spec, size)
    final = spec.options.final_states
    out, state = run_op(module, spec, kw, final=final)
    cu = kw["cu_seqlens"].tolist()
    for i, one in enumerate(split_varlen(kw)):
        got_i = (out[:, cu[i]:cu[i + 1]], state_slice(state, i))
        assert_matches(got_i, run_op(module, spec, one, final=final), CPU_TOL, what=f"sequence {i}")


@interpreter_only
@not_in_spec_mode
@pytest.mark.parametrize("chunk,init,G", [(4, False, 1), (16, True, 2), (8, True, 1)])
def test_euler_real_is_ssd(chunk, init, G, interp_kernels):
    """exp_euler on a real state is a Mamba-2 SSD head (quadratic form of tests/test_reference.py)."""
    H = 2 * G
    spec = make_spec(rule="exp_euler", kind="real", N=16, P=8, G=G, chunk=chunk, init=init)
    kw = make_inputs(spec, 2, 29, H, with_initial_states=init, seed=11, dt_range=(1e-3, 1.0),
                     adt_range=(-20.0, 0.0))
    init_ssm = kw["initial_states"].ssm.double() if init else torch.zeros(2, H, 8, 16, dtype=torch.float64)
    y_ref, H_ref = ssd_head(kw, H, G, init_ssm)
    out, state = run_op(interp_kernels(spec), spec, kw, final=True)
    assert state.angle is None and state.k is None and state.v is None
    assert_matches((out, None), (y_ref, None), CPU_TOL)
    assert not (p := CPU_TOL.check("state.ssm", state.ssm, H_ref)), p


@interpreter_only
@not_in_spec_mode
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden(name, interp_kernels):
    """The kernel reproduces the official references' golden vectors (float32 data) to 1e-5 relative."""
    spec, kw, g = golden_case(name, torch.float32)
    spec = respec(spec, dtypes={"compute": "fp32"})
    out, st_ = run_op(interp_kernels(spec), spec, kw, final=True)
    errs = golden_errors(spec, out, st_, g)
    bad = {key: val for key, val in errs.items() if not val <= GOLDEN_TOL}
    assert not bad, f"{name}: {bad}"


@interpreter_only
@not_in_spec_mode
@pytest.mark.parametrize("layout", ["shared_by_heads", "head_major"])
def test_angles_layouts(layout, interp_kernels):
    """Angles shared by all heads (a stride-0 expand, as the layer produces them) or in another memory order are
    read through their strides and give the same result as the oracle."""
    spec = make_spec(N=16, P=8, R=2, chunk=4, rotation="halved", init=True)
    kw = make_inputs(spec, 2, 11, 3, seed=4, with_initial_states=True)
    if layout == "shared_by_heads":
        kw["angles"] = kw["angles"][:, :, :1].expand(-1, -1, 3, -1)
        assert kw["angles"].stride(2) == 0
    else:
        kw["angles"] = kw["angles"].permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        assert not kw["angles"].is_contiguous()
    assert_matches(run_op(interp_kernels(spec), spec, kw, final=True), naive_recurrence(spec, **kw), CPU_TOL)


@interpreter_only
@not_in_spec_mode
def test_torch_compile_fullgraph(interp_kernels):
    """The forward is a registered torch.library op: torch.compile captures it in one graph (no graph break) and
    the compiled call returns what the eager one does."""
    spec = make_spec(N=16, P=8, R=2, chunk=4, rotation="halved", init=True)
    module = interp_kernels(spec)
    kw = make_inputs(spec, 2, 9, 2, seed=6, with_initial_states=True)

    def forward(kw):
        out, state = module.mamba3_forward(**kw, return_final_states=True)
        return out * 2.0, state

    torch._dynamo.reset()
    out, state = torch.compile(forward, fullgraph=True, backend="aot_eager")(kw)
    ref_out, ref_state = forward(kw)
    assert torch.equal(out, ref_out)
    for field in ("angle", "ssm", "k", "v"):
        assert torch.equal(getattr(state, field), getattr(ref_state, field)), field


def _shipped_ids():
    return [p.stem for p in SHIPPED_SPECS]


@interpreter_only
@not_in_spec_mode
@pytest.mark.parametrize("spec_path", SHIPPED_SPECS, ids=_shipped_ids())
def test_shipped_spec(spec_path, interp_kernels):
    """Each shipped spec, built from its YAML, matches the oracle at small sizes (B ≤ 2, H = 2, ~1.5 chunks),
    batched and, where the spec allows, packed (varlen) with initial states."""
    spec = _interpretable(load_spec(spec_path))
    C = spec.dims.chunk_size
    H = 2 * spec.dims.ngroups if spec.dims.ngroups > 1 else 2
    module = interp_kernels(spec)
    common = dict(with_initial_states=spec.options.initial_states, dt_range=(1e-4, 1.0),
                  lam_logit_range=(-30.0, 30.0), adt_range=(-20.0, 0.0))
    kw = make_inputs(spec, 2, C + C // 2 + 3, H, seed=5, **common)
    assert_matches(run_op(module, spec, kw), naive_recurrence(spec, **kw) if spec.options.final_states
                   else (naive_recurrence(spec, **kw)[0], None), CPU_TOL, what="batched")
    if spec.options.varlen:
        kw = make_inputs(spec, 1, 0, H, seed=6, nseq_lengths=[C // 2 + 1, C + 3, 1], **common)
        ref = naive_recurrence(spec, **kw)
        assert_matches(run_op(module, spec, kw), ref if spec.options.final_states else (ref[0], None), CPU_TOL,
                       what="varlen")


@interpreter_only
@not_in_spec_mode
@pytest.mark.parametrize("lam_value,R,init", [(0.0, 2, True), (0.0, 1, True), (1.0, 1, True), (1.0, 4, True)])
def test_constant_lambda_edges(lam_value, R, init, interp_kernels):
    """Constant λ = 0 (γ = 0: the weights are constants, not tensors) and λ = 1 (no lagged term, yet the state keeps
    the previous token's k/v as the references and Spec.carries_prev_token say), with states passed in and out."""
    spec = make_spec(lam="constant", lam_value=lam_value, N=16, P=8, R=R, chunk=4, init=init, rotation="halved")
    kw = make_inputs(spec, 2, 9, 2, seed=1, with_initial_states=init)
    assert_matches(run_op(interp_kernels(spec), spec, kw), naive_recurrence(spec, **kw), CPU_TOL)


# mimo_o=None: the per-rank output. Tolerance 1e-5 relative (out and final states): the module docstring's budget
# with the amplifiers of these tiny shapes, C = 4 (|cs| ≤ 20·4 = 80: 80·6e-8 ≈ 5e-6 on a decay weight at worst),
# N = 16, C·R ≤ 16 terms per dot; observed ~1e-7.
PER_RANK_TOL = Tol(rel=1e-5)


@interpreter_only
@not_in_spec_mode
@pytest.mark.parametrize("R,varlen", [(2, False), (4, True)])
def test_mimo_per_rank_output(R, varlen, interp_kernels):
    """R > 1 with mimo_o=None: out is y per rank, (B, L, R, H, P), ungated and with D·(v ⊙ mimo_v_r) per rank (the
    official MIMO_Out=None), equal to the naive recurrence's per-rank output, with the same final states; and
    Σ_r y_r ⊙ mimo_o_r is the mimo_o forward's output (fp32 sums of R products: 1e-6 relative)."""
    spec = _fp32(make_spec(R=R, rotation="halved", N=16, P=8, chunk=4, z_gate=False, init=True, varlen=varlen))
    module = interp_kernels(spec)
    if varlen:
        kw = make_inputs(spec, 1, 0, 2, seed=7, with_initial_states=True, nseq_lengths=[5, 0, 9])
    else:
        kw = make_inputs(spec, 2, 11, 2, seed=7, with_initial_states=True)
    per_rank = {**kw, "mimo_o": None}
    out, state = run_op(module, spec, per_rank, final=True)
    B, L, H, P = kw["v"].shape
    assert out.shape == (B, L, R, H, P)
    assert_matches((out, state), naive_recurrence(spec, **per_rank), PER_RANK_TOL, what="per rank")
    summed = (out * kw["mimo_o"].transpose(0, 1)).sum(2)  # (H, R, P) -> (R, H, P)
    torch.testing.assert_close(summed, run_op(module, spec, kw, final=False)[0], rtol=1e-6, atol=1e-7)


@pytest.fixture
def edge_kernels(request):
    """(kernel cache, device) for the edge-case tests below, which run on both: the interpreter's kernels on a
    CPU-only machine, the GPU's on CUDA (their specs compute in fp32, so one tolerance holds on both)."""
    if INTERPRET:
        return request.getfixturevalue("interp_kernels"), "cpu"
    return request.getfixturevalue("gpu_kernels"), "cuda"


def _fp32(spec):
    return respec(spec, dtypes={"input": "fp32", "compute": "fp32"})


def _on(edge, spec, kw, final=None, steps=0):
    """Run the forward on the edge fixture's device (inputs made on the CPU); returns the CPU results, and with
    steps > 0 also the decode step's outputs over the first `steps` tokens from the initial states."""
    cache, dev = edge
    mod = cache(spec)
    kwd = to_device(kw, dev)
    res = to_device(dict(enumerate(run_op(mod, spec, kwd, final=final))), "cpu")
    res = (res[0], res[1])
    if not steps:
        return res
    st_, outs = kwd["initial_states"], []
    for t in range(steps):
        y, st_ = mod.mamba3_step(**token_inputs(kwd, t), state=st_)
        outs.append(y.cpu())
    return res, torch.stack(outs, 1)


@not_in_spec_mode
@pytest.mark.parametrize("rule", ["exp_trapezoidal", "custom"])
def test_growth_is_computed_as_the_recurrence(rule, edge_kernels):
    """A·Δ > 0 (a growing step) is not clamped anywhere: forward, decode step and the float64 recurrence agree,
    within chunks and across them (L = 11, chunk 8), for one and for two lags."""
    weights = None if rule != "custom" else ["dt * lam", "0.5 * dt * exp(adt)", "0.25 * dt"]
    spec = _fp32(make_spec(rule=rule, weights=weights, N=16, P=8, R=2, chunk=8, init=True, rotation="halved"))
    kw = make_inputs(spec, 2, 11, 2, seed=2, with_initial_states=True, adt_range=(-0.5, 0.3))
    kw["adt"] = kw["adt"].abs() * torch.sign(torch.randn(kw["adt"].shape, generator=torch.Generator().manual_seed(0)))
    assert (kw["adt"] > 0).any()
    ref = naive_recurrence(spec, **kw)
    got, steps = _on(edge_kernels, spec, kw, steps=11)
    assert_matches(got, ref, CPU_TOL)
    assert rel_err(steps, ref[0]) <= CPU_TOL.rel


@not_in_spec_mode
@pytest.mark.parametrize("rule", ["exp_euler", "exp_trapezoidal", "custom"])
def test_decay_to_zero_inside_a_chunk(rule, edge_kernels):
    """A·Δ = −inf (the state decays to exactly zero) at token 5 of L = 12, chunk 8, and at a chunk's first token
    (8): forward, decode step and float64 recurrence agree and stay finite; it erases what came before, nothing
    else (issue 10 item 1: decays are segment sums, never differences of cumsums)."""
    weights = None if rule != "custom" else ["dt * lam", "0.5 * dt * exp(adt)", "0.25 * dt * exp(adt)"]
    spec = _fp32(make_spec(rule=rule, weights=weights, N=16, P=8, R=2, chunk=8, init=True, rotation="halved"))
    kw = make_inputs(spec, 2, 12, 2, seed=4, with_initial_states=True)
    kw["adt"][:, :, 5] = float("-inf")
    kw["adt"][:, :, 8] = float("-inf")
    ref = naive_recurrence(spec, **kw)
    assert torch.isfinite(ref[0]).all()
    got, steps = _on(edge_kernels, spec, kw, steps=12)
    assert torch.isfinite(got[0]).all()
    assert_matches(got, ref, CPU_TOL)
    assert rel_err(steps, ref[0]) <= CPU_TOL.rel


@not_in_spec_mode
def test_strong_then_weak_decay_in_one_chunk(edge_kernels):
    """A chunk of 64 with A·Δ = −30 for its first half and −1e-3 after: the weak decays of the second half are sums
    over their own segment, not differences of cumsums near −960 (where fp32 keeps ~6e-5): fp32 ≤ 1e-4."""
    spec = _fp32(make_spec(rule="exp_trapezoidal", kind="real", N=16, P=8, chunk=64))
    kw = _strong_then_weak(spec, -30.0)
    assert_matches(_on(edge_kernels, spec, kw), naive_recurrence(spec, **kw), CPU_TOL)


def _fp32_dots(module, tag: str, tmp_path, monkeypatch):
    """A copy of a generated forward module (a spec with bf16 dot operands) whose dots take fp32 operands, so that
    the error left is the bf16 branch's own arithmetic (its decay cumsum), not the rounding of the products."""
    import importlib.util

    text = (Path(module.__file__).parent / "fwd.py").read_text(encoding="utf-8")
    assert ".to(tl.bfloat16)" in text and "'template_hash': '" in text, "the bf16 forward's text moved"
    text = text.replace(".to(tl.bfloat16)", "").replace("'template_hash': '", f"'template_hash': '{tag}_", 1)
    assert ".to(tl.bfloat16)" not in text and f"'template_hash': '{tag}_" in text
    path = tmp_path / f"fwd_{tag}.py"
    path.write_text(text, encoding="utf-8")
    loader = importlib.util.spec_from_file_location(f"fp32_dots_{tag}", path)
    mod = importlib.util.module_from_spec(loader)
    monkeypatch.setitem(sys.modules, loader.name, mod)
    loader.loader.exec_module(mod)
    return mod


def _strong_then_weak(spec, a_strong: float) -> dict:
    """Inputs of one chunk of 64: A·Δ = a_strong for its first half, −1e-3 after."""
    kw = make_inputs(spec, 1, 64, 1, seed=5)
    kw["adt"][:, :, :32] = a_strong
    kw["adt"][:, :, 32:] = -1e-3
    return kw


@interpreter_only
@pytest.mark.parametrize("forward", ["fused", "chunked"])
def test_bf16_operand_branch_decay_cumsum(forward, tmp_path, monkeypatch):
    """With bf16 dot operands the decay cumsum is a plain fp32 scan of each step's a floored at −110 (e^-110 is 0 in
    fp32), not the double-float one (templates/triton/stages/decay_weights.py.jinja): run that branch in the
    interpreter with fp32 dots and fp32 chunk states. Ordinary decays: CPU_TOL. The strong-then-weak chunk loses
    3.0e-4 to the scan's cancellation at A·Δ = −30 (|Σ| = 960) and at −600 (without the floor: 1.2e-2): bound 5e-4,
    a quarter of the 2^-9 rounding every bf16 product adds."""
    import mamba3_gen

    monkeypatch.setenv("MAMBA3_GEN_FORWARD", forward)
    monkeypatch.setenv("MAMBA3_GEN_CHUNK_STATES", "fp32")
    bf16 = {"input": "fp32", "compute": "bf16"}
    spec = respec(make_spec(rule="exp_trapezoidal", kind="complex", N=16, P=8, chunk=16), dtypes=bf16)
    mod = _fp32_dots(mamba3_gen.load(spec), f"bf16branch_{forward}", tmp_path, monkeypatch)
    assert "tl.cumsum(a_fin, axis=0)" in Path(mod.__file__).read_text(encoding="utf-8")
    kw = make_inputs(spec, 2, 37, 2, seed=3)
    assert rel_err(run_op(mod, spec, kw)[0], naive_recurrence(spec, **kw)[0]) <= CPU_TOL.rel
    # a step that decays to zero (a = −inf) is floored like any other (no count of zero steps in this branch): the
    # weights across it are e^(≤ −110) = 0, those beside it unchanged; no lag, one, two lags (the sums at t + J)
    two_lag = respec(make_spec(rule="custom", weights=["dt * lam", "0.5 * dt * exp(adt)"], N=16, P=8, chunk=16),
                     dtypes=bf16)
    euler = respec(make_spec(rule="exp_euler", kind="real", N=16, P=8, chunk=16), dtypes=bf16)
    for sp, tag in ((spec, "one"), (two_lag, "two"), (euler, "none")):
        m = mod if tag == "one" else _fp32_dots(mamba3_gen.load(sp), f"bf16lags_{tag}_{forward}", tmp_path, monkeypatch)
        kw = make_inputs(sp, 2, 37, 2, seed=4)
        kw["adt"][0, :, 5] = float("-inf")  # inside the first chunk
        kw["adt"][1, :, 16] = float("-inf")  # a chunk's first step
        kw["adt"][1, :, 30] = float("-inf")
        ref = naive_recurrence(sp, **kw)[0]
        assert torch.isfinite(ref).all()
        assert rel_err(run_op(m, sp, kw)[0], ref) <= CPU_TOL.rel, tag
    strong = respec(make_spec(rule="exp_trapezoidal", kind="real", N=16, P=8, chunk=64), dtypes=bf16)
    mod = _fp32_dots(mamba3_gen.load(strong), f"bf16strong_{forward}", tmp_path, monkeypatch)
    for a_strong in (-30.0, -600.0):
        kw = _strong_then_weak(strong, a_strong)
        err = rel_err(run_op(mod, strong, kw)[0], naive_recurrence(strong, **kw)[0])
        assert err <= 5e-4, f"A·Δ = {a_strong}: {err:.2e}"


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("forward", ["fused", "chunked"])
def test_gpu_strong_then_weak_decay_bf16_operands(forward, gpu_kernels, monkeypatch):
    """The chunks above, compiled, with bf16 dot operands (the plain, floored decay cumsum): within 5e-3 of the
    float64 recurrence, the bf16 products' own error (the interpreter's bf16 emulation gives 3.08e-3 on these
    inputs, both forwards, A·Δ = −30 and −150) with room for the GPU's summation order; a cumsum that cancelled
    without the floor (A·Δ = −600: 1.2e-2) fails it."""
    monkeypatch.setenv("MAMBA3_GEN_FORWARD", forward)
    spec = respec(make_spec(rule="exp_trapezoidal", kind="real", N=16, P=8, chunk=64),
                  dtypes={"input": "fp32", "compute": "bf16"})
    for a_strong in (-30.0, -600.0):
        kw = _strong_then_weak(spec, a_strong)
        out = run_op(gpu_kernels(spec), spec, to_device(kw, "cuda"))[0].cpu()
        err = rel_err(out, naive_recurrence(spec, **kw)[0])
        assert err <= 5e-3, f"A·Δ = {a_strong}: {err:.2e}"


_POISON_SPECS = {
    "siso_trap_complex": dict(rule="exp_trapezoidal", N=16, P=8, R=1, G=2, chunk=16, init=True, varlen=True),
    "mimo_two_lags": dict(rule="custom", weights=["dt * lam", "0.5 * dt * exp(adt)", "0.25 * dt"], N=16, P=8, R=2,
                          G=2, chunk=8, init=True, varlen=True, rotation="halved"),
}


def _poison(kw: dict, name: str, b: int, t: int, value: float) -> tuple[str, int]:
    """Write `value` into input `name` at batch row b, token t (group / head 1, every P or N entry); returns the
    tensor's head-like axis and the index poisoned there, so the test knows which heads may change."""
    x = kw[name]
    if name in ("q", "k"):
        x[b, t, ..., 1, :] = value  # (B, L, [R,] G, N): group 1
        return "group", 1
    if name in ("v", "angles"):
        x[b, t, 1, 0] = value  # (B, L, H, P|S): head 1, one column
        return "head", 1
    x[b, 1, t] = value  # adt, dt, trap: (B, H, L)
    return "head", 1


@not_in_spec_mode
@pytest.mark.parametrize("case", sorted(_POISON_SPECS))
@pytest.mark.parametrize("name,value", [("v", float("nan")), ("v", float("inf")), ("k", float("nan")),
                                        ("q", float("nan")), ("adt", float("nan")), ("dt", float("inf")),
                                        ("trap", float("nan")), ("angles", float("nan"))])
def test_nonfinite_input_is_causal(case, name, value, edge_kernels):
    """Issue 10 item 3: a NaN or inf in one input at token t (of sequence 1, head 1) changes no output before t,
    nothing in another sequence (batched and packed) and nothing in another head; for q, k and v the outputs that
    turn non-finite are exactly those the float64 recurrence makes non-finite. L = 12 over chunks of 16 / 8 (16 rows,
    the smallest tensor-core dot), with the token mid-chunk, so masked products inside a chunk are exercised (0·NaN
    must never reach an earlier row)."""
    spec = _fp32(make_spec(**_POISON_SPECS[case]))
    for varlen in (False, True):
        if varlen:
            kw = make_inputs(spec, 1, 0, 4, seed=11, nseq_lengths=[5, 9, 4], with_initial_states=True)
            b, t0, t = 0, 5, 5 + 6  # token 6 of the second sequence
        else:
            kw = make_inputs(spec, 3, 12, 4, seed=11, with_initial_states=True)
            b, t0, t = 1, 0, 6
        clean = _on(edge_kernels, spec, kw, final=False)[0]
        axis, idx = _poison(kw, name, b, t, value)
        out = _on(edge_kernels, spec, kw, final=False)[0]  # (B, L, H, P)
        heads = torch.arange(4)
        mine = (heads // 2 == idx) if axis == "group" else (heads == idx)
        same = torch.ones_like(out, dtype=torch.bool)
        same[b, t:, mine] = False  # only this sequence's tokens from t on, in the heads reading the input, may change
        if varlen:
            same[b, 14:] = True  # the third sequence starts at token 14
        assert torch.equal(out[same], clean[same]), f"{name}={value} at token {t} changed an output it cannot reach"
        if name in ("q", "k", "v"):
            ref = naive_recurrence(spec, **kw)[0]
            assert torch.equal(torch.isfinite(out), torch.isfinite(ref)), f"{name}={value}: non-finite outputs differ"
        assert not torch.isfinite(out[b, t, mine]).all(), f"{name}={value} at token {t} left its own output finite"


@not_in_spec_mode
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_dt_leaves_unrotated_dims_as_the_recurrence(value, edge_kernels):
    """A non-finite Δ at token t poisons what the recurrence poisons and nothing else: with a partial rotation
    (halved, S < N/2 pairs rotated), the unrotated dims of the carried k̂ and of the angle state stay finite and equal
    the float64 recurrence's (the angle increment of an unrotated pair is exactly 0, not Δ·π·tanh(0))."""
    spec = _fp32(make_spec(**_POISON_SPECS["mimo_two_lags"]))
    kw = make_inputs(spec, 2, 12, 4, seed=11, with_initial_states=True)
    kw["dt"][1, 1, 6] = value
    _, got = _on(edge_kernels, spec, kw, final=True)
    _, ref = naive_recurrence(spec, **kw)
    for field in ("k", "angle"):
        g, r = getattr(got, field).double(), getattr(ref, field)
        assert torch.equal(torch.isfinite(g), torch.isfinite(r)), f"{field}: non-finite entries differ"
        fin = torch.isfinite(r)
        assert fin.any() and not fin.all(), f"{field}: the case should poison some entries and not others"
        assert (g[fin] - r[fin]).abs().max() <= CPU_TOL.rel * r[fin].abs().max() + CPU_TOL.atol, field


# ------------------------------------------------------------------------------------------------------------------
# input checks (no kernel launch: the op refuses before it)
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    kernels = KernelCache(tmp_path_factory.mktemp("kernels_checks"), "interpreter")
    trap = make_spec(N=16, P=8, R=1, G=1, chunk=8, init=True, varlen=True)
    const = make_spec(lam="constant", lam_value=0.5, N=16, P=8, R=2, G=1, chunk=8, init=True, rotation="halved")
    euler = make_spec(rule="exp_euler", kind="real", N=16, P=8, chunk=8, init=True)
    return {name: (spec, kernels(spec)) for name, spec in (("trap", trap), ("const", const), ("euler", euler))}


@not_in_spec_mode
class TestBadInputs:
    """Wrong inputs raise ValueError naming the tensor and what was expected."""

    @staticmethod
    def call(checked, which, **changes):
        spec, module = checked[which]
        kw = make_inputs(spec, 1, 5, 2, seed=0, with_initial_states=spec.options.initial_states)
        kw.update(changes)
        return module.mamba3_forward(**kw, return_final_states=True)

    def test_wrong_shape(self, checked):
        with pytest.raises(ValueError, match=r"^q has shape \(1, 5, 1, 15\); expected \(1, 5, 1, 16\)"):
            self.call(checked, "trap", q=torch.randn(1, 5, 1, 15))
        with pytest.raises(ValueError, match=r"^adt has shape \(1, 5, 2\); expected \(1, 2, 5\)"):
            self.call(checked, "trap", adt=-torch.rand(1, 5, 2))
        with pytest.raises(ValueError, match=r"^mimo_v has shape \(2, 8\); expected \(2, 2, 8\)"):
            self.call(checked, "const", mimo_v=torch.ones(2, 8))
        with pytest.raises(ValueError, match=r"^angles has shape \(1, 5, 2, 3\); expected \(1, 5, 2, 4\)"):
            self.call(checked, "trap", angles=torch.randn(1, 5, 2, 3))

    def test_wrong_dtype(self, checked):
        with pytest.raises(ValueError, match=r"^k has dtype torch.float64; expected one of"):
            self.call(checked, "trap", k=torch.randn(1, 5, 1, 16, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"^dt has dtype torch.int32; expected one of"):
            self.call(checked, "trap", dt=torch.ones(1, 2, 5, dtype=torch.int32))

    def test_missing_required(self, checked):
        with pytest.raises(ValueError, match=r"^trap is required by this spec; expected a tensor of shape \(1, 2, 5\)"):
            self.call(checked, "trap", trap=None)

    def test_mimo_o_left_out_is_refused_not_per_rank(self, checked):
        # only an explicit mimo_o=None asks for the (…, R, H, P) per-rank output; leaving it out is a mistake
        spec, kernels = checked["const"]
        kw = make_inputs(spec, 1, 5, 2, seed=0)
        del kw["mimo_o"]
        with pytest.raises(ValueError, match=r"^mimo_o is required by this spec \(R=2\); expected a tensor of shape "
                                             r"\(H, 2, 8\), or pass mimo_o=None explicitly"):
            kernels.mamba3_forward(**kw)

    def test_per_rank_output_needs_a_spec_without_z_gate(self, checked):
        # the official prefill gates a per-rank output, the official step does not: the op refuses to pick one
        with pytest.raises(ValueError, match=r"^mimo_o=None asks for the per-rank output .*\(options\.z_gate: true\)"):
            self.call(checked, "const", mimo_o=None)

    def test_trap_for_constant_lambda(self, checked):
        with pytest.raises(ValueError, match=r"^trap was given but spec .* takes λ from its rule \(constant\)"):
            self.call(checked, "const", trap=torch.zeros(1, 2, 5))
        with pytest.raises(ValueError, match=r"^trap was given but spec"):
            self.call(checked, "euler", trap=torch.zeros(1, 2, 5))

    def test_state_from_another_spec(self, checked):
        trap_spec, _ = checked["trap"]
        euler_spec, _ = checked["euler"]
        euler_state = make_inputs(euler_spec, 1, 5, 2, with_initial_states=True)["initial_states"]
        trap_state = make_inputs(trap_spec, 1, 5, 2, with_initial_states=True)["initial_states"]
        # an exp_euler state lacks the previous token that the trapezoid needs
        with pytest.raises(ValueError, match=r"^initial_states\.k is required by this spec; expected a tensor of "
                                             r"shape \(1, 2, 16\)"):
            self.call(checked, "trap", initial_states=euler_state._replace(angle=trap_state.angle))
        # a trapezoidal, complex state given to an exp_euler real spec
        with pytest.raises(ValueError, match=r"^initial_states\.angle was given but spec .* carries no angle"):
            self.call(checked, "euler", initial_states=trap_state)
        # a SISO (R = 1) state given to a rank-2 spec: k is (NS, R, H, N) there
        with pytest.raises(ValueError, match=r"^initial_states\.k has shape \(1, 2, 16\); expected \(1, 2, 2, 16\)"):
            self.call(checked, "const", initial_states=trap_state)
        # a state of a spec with another d_state
        bigger = make_inputs(make_spec(N=32, P=8, init=True), 1, 5, 2, with_initial_states=True)["initial_states"]
        with pytest.raises(ValueError, match=r"^initial_states\.(angle|ssm|k) has shape .*; expected"):
            self.call(checked, "trap", initial_states=bigger)
        # batch mismatch: one state row for two sequences
        two = make_inputs(trap_spec, 2, 5, 2, with_initial_states=True)["initial_states"]
        with pytest.raises(ValueError, match=r"^initial_states\.angle has shape \(2, 2, 4\); expected \(1, 2, 4\)"):
            self.call(checked, "trap", initial_states=two)

    def test_options_off(self, checked):
        spec, module = checked["const"]
        kw = make_inputs(spec, 1, 5, 2, seed=0)
        with pytest.raises(ValueError, match=r"^cu_seqlens was given but spec .* has options.varlen: false"):
            module.mamba3_forward(**kw, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
        with pytest.raises(ValueError, match=r"cu_seqlens must start at 0, end at L=5"):
            self.call(checked, "trap", cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))


# ------------------------------------------------------------------------------------------------------------------
# GPU: the same properties, compiled, in bf16 and fp32 at moderate sizes
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu_only
@_DTYPES
@examples(8)
@given(spec=specs(gpu=True), data=st.data())
def test_gpu_matches_oracle(dtype, spec, data, gpu_kernels):
    _gpu_spec_ok(spec, dtype)
    size = data.draw(input_kwargs(spec, gpu=True, extreme=True), label="size")
    module = pinned(gpu_kernels, spec, data.draw(st.integers(0, 7), label="config"))
    kw = draw_inputs(spec, size, dtype=dtype, device="cuda")
    got = run_op(module, spec, kw)
    ref = naive_recurrence(spec, **kw)
    assert_matches(got, ref if got[1] is not None else (ref[0], None), GPU_TOL[dtype])


@pytest.mark.gpu
@gpu_only
@requires_option("initial_states")
@requires_option("final_states")
@_DTYPES
@examples(6)
@given(spec=specs(gpu=True, init=True, final=True, varlen=False), data=st.data())
def test_gpu_split_sequence(dtype, spec, data, gpu_kernels):
    _gpu_spec_ok(spec, dtype)
    size = data.draw(input_kwargs(spec, gpu=True, varlen=False, extreme=True), label="size")
    assume(size["L"] >= 2)
    L1 = data.draw(st.integers(1, size["L"] - 1), label="L1")
    module = pinned(gpu_kernels, spec, data.draw(st.integers(0, 7), label="config"))
    kw = draw_inputs(spec, size, dtype=dtype, device="cuda")
    out, state = run_op(module, spec, kw, final=True)
    out1, s1 = run_op(module, spec, time_slice(kw, 0, L1), final=True)
    out2, s2 = run_op(module, spec, {**time_slice(kw, L1, size["L"]), "initial_states": s1}, final=True)
    assert_matches((torch.cat([out1, out2], dim=1), s2), (out, state), GPU_TOL[dtype], what=f"split at {L1}")


@pytest.mark.gpu
@gpu_only
@requires_option("varlen")
@_DTYPES
@examples(6)
@given(spec=specs(gpu=True, varlen=True), data=st.data())
def test_gpu_varlen_equals_separate(dtype, spec, data, gpu_kernels):
    _gpu_spec_ok(spec, dtype)
    size = data.draw(input_kwargs(spec, gpu=True, varlen=True, extreme=True), label="size")
    module = pinned(gpu_kernels, spec, data.draw(st.integers(0, 7), label="config"))
    kw = draw_inputs(spec, size, dtype=dtype, device="cuda")
    final = spec.options.final_states
    out, state = run_op(module, spec, kw, final=final)
    cu = kw["cu_seqlens"].tolist()
    for i, one in enumerate(split_varlen(kw)):
        got_i = (out[:, cu[i]:cu[i + 1]], state_slice(state, i))
        assert_matches(got_i, run_op(module, spec, one, final=final), GPU_TOL[dtype], what=f"sequence {i}")
