"""The decode step: step == forward, and both == the float64 recurrence.

For random specs and inputs, the forward over L1 + L2 tokens equals the forward over L1 tokens followed by L2 decode
steps from its final states (L1 = 0 starts from step.zero_state), output by output and state by state; every step
also matches the naive float64 recurrence. In place and out of place steps alternate. CPU: the Triton interpreter in
fp32. GPU (marked gpu): the Triton step and the CuTe DSL step, bf16 and fp32 inputs, fp32 and bf16 state.

Tolerances. CPU, fp32: CPU_TOL (1e-4 relative, justified in tests/test_forward.py; a step is one token of the same
fp32 arithmetic, observed ~1e-7). GPU: the forward's GPU_TOL for the output and an fp32 state. A bf16 state is
rounded to nearest bf16 (8 significant bits, unit roundoff u = 2^-8 ≈ 3.9e-3) once per step it is stored: over the
≤ 5 stores here the error stays below ~5u ≈ 2e-2 of max|H| in the worst case and ~√5·u/√3 ≈ 5e-3 typically, so 2e-2
relative; Θ stays fp32. The long-decode bound of a bf16 state is tested at the end of this file.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mamba3_gen.reference import make_inputs, naive_recurrence
from mamba3_gen.reference.inputs import rule_coefficients, token_inputs as token
from mamba3_gen.runtime.state import Mamba3State
from mamba3_gen.spec.loader import load_spec
from tests.helpers import SHIPPED_SPECS, Tol, assert_matches, make_spec, respec, time_slice, to_device
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
    interpreter_only,
    not_in_spec_mode,
    specs,
)

BF16_STATE_TOL = Tol(rel=2e-2, atol=2e-3)  # see the module docstring


def prefill_then_steps(module, kw: dict, L1: int, backend: str = "triton", inplace_from: int = 0,
                       block_p: int | None = None, **knobs):
    """Forward over the first L1 tokens (none: a zero state), then one step per remaining token. Returns the outputs
    (B, L, H, P) and the final state; steps t >= L1 + inplace_from alternate in place / out of place. ``block_p``:
    the Triton step's rows per program (None: the built default), so that several P blocks per head, which share
    Θ and k̂ in place through the arrival counter, are exercised too; ``knobs``: other launch settings of the
    Triton step (head_major, stream), each a different kernel specialization."""
    step = module.mamba3_step
    knobs = dict(knobs, block_p=block_p or step.block_p)
    saved = {k: getattr(step, k) for k in knobs}
    for k, val in knobs.items():
        setattr(step, k, val)
    try:
        return _prefill_then_steps(module, kw, L1, backend, inplace_from)
    finally:
        for k, val in saved.items():
            setattr(step, k, val)


def _prefill_then_steps(module, kw, L1, backend, inplace_from):
    B, L, H, _ = kw["v"].shape
    if L1:
        out1, state = module.mamba3_forward(**time_slice(kw, 0, L1), return_final_states=True)
        outs = [out1]
    else:
        state = module.mamba3_step.zero_state(B, H, kw["v"].device)
        outs = []
    for i, t in enumerate(range(L1, L)):
        inplace = i >= inplace_from and i % 2 == 0
        y, new = module.mamba3_step(**token(kw, t), state=state, inplace=inplace, backend=backend)
        if inplace:
            assert new is state and all(a is b for a, b in zip(new, state)), "in place must return the same tensors"
        state = new
        outs.append(y.unsqueeze(1))
    return torch.cat(outs, dim=1), state


def _step_spec(spec, final=True):
    """Step tests need the forward's final states."""
    return respec(spec, options={"final_states": final, "varlen": False})


@st.composite
def split(draw, gpu=False):
    L1 = draw(st.sampled_from([0, 1, 2, 5]) if not gpu else st.sampled_from([0, 1, 17, 40]))
    L2 = draw(st.integers(1, 4))
    return L1, L2


# ------------------------------------------------------------------------------------------------------------------
# CPU: the Triton interpreter, fp32
# ------------------------------------------------------------------------------------------------------------------
@interpreter_only
@examples(25, ci=15)
@given(spec=specs(varlen=False, init=False, final=True), data=st.data())
def test_step_equals_forward(spec, data, interp_kernels):
    spec = _step_spec(spec)
    L1, L2 = data.draw(split(), label="L1, L2")
    B = data.draw(st.sampled_from([1, 3]), label="B")
    H = spec.dims.ngroups * data.draw(st.sampled_from([1, 2]), label="heads per group")
    module = interp_kernels(spec)
    kw = draw_inputs(spec, dict(B=B, L=L1 + L2, H=H, seed=data.draw(st.integers(0, 2**31 - 1)),
                                dt_range=(1e-4, 1.0), adt_range=(-20.0, 0.0), lam_logit_range=(-30.0, 30.0)))
    block_p = data.draw(st.sampled_from([None, 2, 8]), label="block_p")
    head_major = data.draw(st.booleans(), label="head_major")
    got = prefill_then_steps(module, kw, L1, block_p=block_p, head_major=head_major)
    fwd = module.mamba3_forward(**kw, return_final_states=True)
    assert_matches(got, fwd, CPU_TOL, what=f"prefill {L1} + {L2} steps vs forward")
    assert_matches(got, naive_recurrence(spec, **kw), CPU_TOL, what="vs float64 recurrence")


@interpreter_only
@not_in_spec_mode
@pytest.mark.parametrize("spec_path", SHIPPED_SPECS, ids=[p.stem for p in SHIPPED_SPECS])
def test_shipped_step(spec_path, interp_kernels):
    """Each shipped spec's step (fp32 inputs at small sizes: N and P as shipped, B=2, H=2)."""
    spec = _step_spec(_interpretable(load_spec(spec_path)))
    module = interp_kernels(spec)
    kw = make_inputs(spec, 2, 3, 2 * spec.dims.ngroups, seed=3)
    got = prefill_then_steps(module, kw, 2)
    assert_matches(got, naive_recurrence(spec, **kw), CPU_TOL)


@interpreter_only
@not_in_spec_mode
def test_step_angles_shared_by_heads(interp_kernels):
    """A stride-0 head dim of the angles (one set for all heads, as the layer passes them) reads like a copy."""
    spec = make_spec(R=2, rotation="halved", chunk=8)
    module = interp_kernels(spec)
    kw = make_inputs(spec, 2, 1, 4, seed=5)
    kw["angles"] = kw["angles"][:, :, :1].expand(-1, -1, 4, -1)
    state = module.mamba3_step.zero_state(2, 4)
    got = module.mamba3_step(**token(kw, 0), state=state)
    ref = module.mamba3_step(**{**token(kw, 0), "angles": kw["angles"][:, 0].contiguous()}, state=state)
    assert_matches(got, ref, Tol(rel=0.0, atol=0.0))


@interpreter_only
@not_in_spec_mode
@pytest.mark.parametrize("R", [2, 4])
def test_step_per_rank_output(R, interp_kernels):
    """mimo_o=None (no z gate): each step's out is y per rank, (B, R, H, P); prefill + steps (in place and out of
    place, one and several P blocks per head) equal the per-rank forward and the float64 recurrence."""
    spec = _step_spec(respec(make_spec(R=R, rotation="halved", N=16, P=8, chunk=4, z_gate=False),
                             dtypes={"input": "fp32", "compute": "fp32"}))
    module = interp_kernels(spec)
    kw = {**make_inputs(spec, 2, 5, 2, seed=R), "mimo_o": None}
    fwd = module.mamba3_forward(**kw, return_final_states=True)
    assert fwd[0].shape == (2, 5, R, 2, 8)
    for L1, block_p in ((0, None), (2, 2)):
        got = prefill_then_steps(module, kw, L1, block_p=block_p)
        assert_matches(got, fwd, CPU_TOL, what=f"prefill {L1} + steps vs forward")
        assert_matches(got, naive_recurrence(spec, **kw), CPU_TOL, what="vs float64 recurrence")


@pytest.fixture(scope="module")
def step_module(interp_kernels):
    return interp_kernels(make_spec(R=2, rotation="halved", chunk=8))


@not_in_spec_mode
class TestStepBadInputs:
    """Every bad input is a ValueError naming the tensor and what was expected (checked before any launch)."""

    B, H = 2, 2

    def _args(self, module):
        spec = make_spec(R=2, rotation="halved", chunk=8)
        kw = token(make_inputs(spec, self.B, 1, self.H, seed=0), 0)
        return kw, module.mamba3_step.zero_state(self.B, self.H)

    def test_wrong_shape(self, step_module):
        kw, state = self._args(step_module)
        with pytest.raises(ValueError, match=r"q has shape \(2, 1, 16\); expected \(2, 2, 1, 16\)"):
            step_module.mamba3_step(**{**kw, "q": kw["q"][:, 0]}, state=state)
        with pytest.raises(ValueError, match=r"adt has shape \(2, 2, 1\); expected \(2, 2\)"):
            step_module.mamba3_step(**{**kw, "adt": kw["adt"][..., None]}, state=state)

    def test_prefill_shaped_v(self, step_module):
        kw, state = self._args(step_module)
        with pytest.raises(ValueError, match=r"v must be a tensor of shape \(B, H, P=8\) \(one token\)"):
            step_module.mamba3_step(**{**kw, "v": kw["v"][:, None]}, state=state)

    def test_mimo_o_left_out_is_refused_not_per_rank(self, step_module):
        kw, state = self._args(step_module)
        del kw["mimo_o"]
        with pytest.raises(ValueError, match=r"^mimo_o is required by this spec \(R=2\)"):
            step_module.mamba3_step(**kw, state=state)

    def test_missing_state(self, step_module):
        kw, _ = self._args(step_module)
        with pytest.raises(ValueError, match="state is required"):
            step_module.mamba3_step(**kw, state=None)

    def test_state_of_another_batch(self, step_module):
        kw, _ = self._args(step_module)
        other = step_module.mamba3_step.zero_state(3, self.H)
        with pytest.raises(ValueError, match=r"state.angle has shape \(3, 2, 4\); expected \(2, 2, 4\)"):
            step_module.mamba3_step(**kw, state=other)

    def test_state_of_another_spec(self, step_module, interp_kernels):
        kw, _ = self._args(step_module)
        euler = interp_kernels(make_spec(rule="exp_euler", R=2, rotation="halved", chunk=8))
        with pytest.raises(ValueError, match=r"state.k is required by this spec; expected a tensor of shape"):
            step_module.mamba3_step(**kw, state=euler.mamba3_step.zero_state(self.B, self.H))
        with pytest.raises(ValueError, match=r"state.k was given but spec 'ref_test' carries no k"):
            euler.mamba3_step(**{**kw, "trap": None}, state=step_module.mamba3_step.zero_state(self.B, self.H))

    def test_in_place_needs_the_state_dtype(self, step_module):
        kw, state = self._args(step_module)
        half = Mamba3State(state.angle, state.ssm.bfloat16(), state.k, state.v)
        with pytest.raises(ValueError, match=r"state.ssm has dtype torch.bfloat16; expected one of \['torch.float32'\]"):
            step_module.mamba3_step(**kw, state=half, inplace=True)
        step_module.mamba3_step(**kw, state=half)  # out of place: any float state is read

    def test_per_rank_output_needs_a_spec_without_z_gate(self, step_module):
        kw, state = self._args(step_module)
        with pytest.raises(ValueError, match=r"^mimo_o=None asks for the per-rank output .*\(options\.z_gate: true\)"):
            step_module.mamba3_step(**{**kw, "mimo_o": None}, state=state)

    def test_wrong_dtype_and_backend(self, step_module):
        kw, state = self._args(step_module)
        with pytest.raises(ValueError, match=r"dt has dtype torch.int64"):
            step_module.mamba3_step(**{**kw, "dt": kw["dt"].long()}, state=state)
        with pytest.raises(ValueError, match=r"backend must be one of \('triton', 'cute'\)"):
            step_module.mamba3_step(**kw, state=state, backend="cuda")


# ------------------------------------------------------------------------------------------------------------------
# GPU: both backends, bf16 and fp32 inputs, fp32 and bf16 state
# ------------------------------------------------------------------------------------------------------------------
def _cute_available() -> bool:
    try:
        import cutlass  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = pytest.mark.parametrize("backend", [
    "triton",
    pytest.param("cute", marks=pytest.mark.skipif(not _cute_available(),
                                                  reason="nvidia-cutlass-dsl is not installed")),
])


@pytest.mark.gpu
@gpu_only
@BACKENDS
@_DTYPES
@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
@examples(6)
@given(spec=specs(gpu=True, varlen=False, init=False, final=True), data=st.data())
def test_gpu_step_equals_forward(backend, dtype, state_dtype, spec, data, gpu_kernels):
    _gpu_spec_ok(spec, dtype)
    spec = respec(_step_spec(spec), dtypes={"state": state_dtype})
    L1, L2 = data.draw(split(gpu=True), label="L1, L2")
    H = spec.dims.ngroups * 2
    module = gpu_kernels(spec)
    kw = draw_inputs(spec, dict(B=3, L=L1 + L2, H=H, seed=data.draw(st.integers(0, 2**31 - 1))),
                     dtype=dtype, device="cuda")
    knobs = {}
    if backend == "triton":
        knobs = dict(block_p=data.draw(st.sampled_from([None, 16]), label="block_p"),
                     head_major=data.draw(st.booleans(), label="head_major"),
                     stream=data.draw(st.booleans(), label="stream"))
    got = prefill_then_steps(module, kw, L1, backend=backend, **knobs)
    torch.cuda.synchronize()
    tol = GPU_TOL[dtype] if state_dtype == "fp32" else BF16_STATE_TOL
    fwd = module.mamba3_forward(**kw, return_final_states=True)
    assert_matches(got, fwd, tol, what=f"{backend}: prefill {L1} + {L2} steps vs forward")
    assert_matches(got, naive_recurrence(spec, **kw), tol, what=f"{backend}: vs float64 recurrence")


PADDED_TILES = [  # state shapes whose CuTe tiling has padding lanes (columns, rows or both)
    dict(N=12, P=24, R=2, rotation="halved", chunk=8),
    dict(N=20, P=48, R=4, rotation="pairwise", chunk=4),
    dict(N=8, P=4, R=1, rotation="pairwise", chunk=16),
    dict(N=96, P=24, R=1, rotation="halved", chunk=16),
]


@not_in_spec_mode
@pytest.mark.gpu
@gpu_only
@BACKENDS
@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("dims", PADDED_TILES, ids=lambda d: f"N{d['N']}_P{d['P']}_R{d['R']}_{d['rotation']}")
def test_gpu_step_odd_state_shapes(backend, state_dtype, dims, gpu_kernels):
    """Both steps on state shapes off the vector/warp grid (fp32 inputs): prefill 3 tokens, then 3 steps."""
    spec = respec(_step_spec(make_spec(**dims)), dtypes={"state": state_dtype, "input": "fp32"})
    module = gpu_kernels(spec)
    kw = make_inputs(spec, 2, 6, 2, device="cuda", seed=11)
    got = prefill_then_steps(module, kw, 3, backend=backend)
    torch.cuda.synchronize()
    tol = GPU_TOL[torch.float32] if state_dtype == "fp32" else BF16_STATE_TOL
    assert_matches(got, naive_recurrence(spec, **kw), tol, what=f"{backend} {dims}")


# ------------------------------------------------------------------------------------------------------------------
# bf16 state: the documented error bound over a long decode (issue 10 item 4)
# ------------------------------------------------------------------------------------------------------------------
U_BF16 = 2.0 ** -8  # unit roundoff of round-to-nearest bf16 (8 significant bits)
EPS_FP32 = 8 * 2.0 ** -24  # a few fp32 roundings per state element per step (products, adds, exp of the decay)


@not_in_spec_mode
@pytest.mark.gpu
@gpu_only
@pytest.mark.skipif(not _cute_available(), reason="nvidia-cutlass-dsl is not installed")
def test_cute_step_refuses_per_rank_output(gpu_kernels):
    """The CuTe step has no per-rank output: mimo_o=None is an InputError pointing to the Triton step."""
    spec = _step_spec(make_spec(R=2, rotation="halved", N=32, P=16, chunk=8, z_gate=False))
    module = gpu_kernels(spec)
    kw = {**token(make_inputs(spec, 2, 1, 2, seed=0, device="cuda"), 0), "mimo_o": None}
    state = module.mamba3_step.zero_state(2, 2, "cuda")
    with pytest.raises(ValueError, match=r"^mimo_o=None is not supported by the CuTe step; use the Triton step"):
        module.mamba3_step(**kw, state=state, backend="cute")


@pytest.fixture
def step_kernels(request):
    """(kernel cache, device): the interpreter's kernels on a CPU-only machine (which rounds fp32 -> bf16 to
    nearest even, as a GPU does: runtime/interpreter.py), the GPU's on CUDA."""
    if INTERPRET:
        return request.getfixturevalue("interp_kernels"), "cpu"
    return request.getfixturevalue("gpu_kernels"), "cuda"


@not_in_spec_mode
@pytest.mark.parametrize("rule", ["exp_euler", "exp_trapezoidal"])
def test_bf16_state_error_bound_over_many_steps(rule, step_kernels):
    """`dtypes.state: bf16` rounds the stored state (and the carried k̂, v of the lagged tokens) to nearest bf16 at
    every step (1000 steps on a GPU; 200 in the interpreter, whose every launch costs ~0.1 s of CI's two cores).
    The error this leaves is bounded (README, "State precision") by the recursion, elementwise over H:

        E_0 = u·|H_0| + 1e-4·max|H_0|                     (the prefill's fp32 error, then one rounding)
        E_t = (1 + u)·(α_t·E_{t−1} + (2u + u²)·Σ_{j≥1} |c_j(t)|·|v_{t−j}|·|k̂_{t−j}|ᵀ + ε·T_t) + u·|H_t|

    with u = 2^-8, α_t = exp(a_t) the step's decay, ε a few fp32 roundings and T_t the magnitude of the step's terms:
    the errors of past steps decay with the state, and each step adds at most one rounding of the state and of the
    carried tokens. So E_t ≈ u·Σ_k (Π α)·|H_k|: about u·|H|/(1 − α) for a head decaying by α per step, unbounded in
    t only for α = 1. This test holds the stored state and every output to it over an 8-token prefill and 1000
    in-place steps of heads that decay slowly (α ≥ 0.999, where rounding errors add up) and fast, real state, fp32
    inputs; it also prints the measured errors next to the bound."""
    cache, dev = step_kernels
    spec = respec(_step_spec(make_spec(rule=rule, kind="real", N=16, P=16, chunk=16, d_skip=False, z_gate=False)),
                  dtypes={"state": "bf16", "input": "fp32", "compute": "fp32"})
    module = cache(spec)
    L1, steps, B, H = 8, (200 if dev == "cpu" else 1000), 2, 4
    kw = make_inputs(spec, B, L1 + steps, H, seed=21)
    gen = torch.Generator().manual_seed(22)
    slow = torch.rand(B, 2, L1 + steps, generator=gen) * -1e-3  # α = exp(A·Δ) ∈ [0.999, 1]
    kw["adt"] = torch.cat([slow, torch.rand(B, H - 2, L1 + steps, generator=gen) * -0.1], dim=1)
    rule_ = spec.discretization.resolved_rule()
    lam = torch.sigmoid(kw["trap"].double()) if kw.get("trap") is not None else None
    a, c = rule_coefficients(rule_, kw["dt"].double(), kw["adt"].double(), lam)  # (B, H, L) each
    q_hat = (kw["q"].double().squeeze(2)[:, :, None, :] + kw["q_bias"].double()[None, None])  # (B, L, H, N), G = 1

    kwd = to_device(kw, dev)
    _, state = module.mamba3_forward(**time_slice(kwd, 0, L1), return_final_states=True)
    _, ref = naive_recurrence(spec, **time_slice(kw, 0, L1))
    h_ref = ref.ssm
    bound = U_BF16 * h_ref.abs() + 1e-4 * h_ref.abs().amax()
    worst_state = worst_out = 0.0
    for t in range(L1, L1 + steps):
        y, state = module.mamba3_step(**token(kwd, t), state=state, inplace=True)
        carried = torch.zeros_like(h_ref)
        for j in range(1, len(c)):  # J = 1 here: the carried token is the reference state's k̂, v before step t
            carried += c[j][..., t, None, None].abs() * ref.v.abs()[..., :, None] * ref.k.abs()[..., None, :]
        y_ref, ref = naive_recurrence(spec, **{**time_slice(kw, t, t + 1), "initial_states": ref})
        alpha = torch.exp(a[..., t])[..., None, None]
        new = c[0][..., t, None, None].abs() * kw["v"][:, t].double().abs()[..., None] * ref.k.abs()[..., None, :] \
            if len(c) > 1 else c[0][..., t, None, None].abs() * (kw["v"][:, t].double().abs()[..., None]
                                                                  * (kw["k"][:, t].double().squeeze(1)[:, None] + kw["k_bias"].double()).abs()[..., None, :])
        terms = alpha * h_ref.abs() + carried + new
        bound = (1 + U_BF16) * (alpha * bound + (2 * U_BF16 + U_BF16 ** 2) * carried + EPS_FP32 * terms) \
            + U_BF16 * ref.ssm.abs()
        h_ref = ref.ssm
        err = (state.ssm.double().cpu() - h_ref).abs()
        assert (err <= bound).all(), (f"step {t - L1}: state error {err.max():.3e} above the bound at "
                                      f"{(err > bound).nonzero()[0].tolist()}")
        out_bound = (bound * q_hat[:, t, :, None, :].abs()).sum(-1) + EPS_FP32 * (h_ref * q_hat[:, t, :, None, :]).abs().sum(-1)
        out_err = (y.double().cpu() - y_ref[:, 0]).abs()
        assert (out_err <= out_bound).all(), f"step {t - L1}: output error {out_err.max():.3e} above its bound"
        worst_state = max(worst_state, float(err.max() / h_ref.abs().amax()))
        worst_out = max(worst_out, float(out_err.max() / y_ref.abs().amax()))
    print(f"\nbf16 state, {rule}, {steps} steps on {dev}: state error ≤ {worst_state:.2e} of max|H| "
          f"(bound at the end {float(bound.max() / h_ref.abs().amax()):.2e}), output error ≤ {worst_out:.2e} of max|y|")
