"""The two float64 references (naive per-token loop, chunked SSD form) against the official golden vectors and
against each other, plus state passing, varlen and the Mamba-2 (SSD) special case.

Tolerances:
- Golden files: 1e-5 relative (‖·‖ ratio). They were produced in float32 by the official PyTorch references, so
  they carry float32 rounding (~1e-7 relative observed); 1e-5 leaves room for that and nothing else.
- Reference vs reference / vs an independent formula: 1e-10 relative. Everything runs in float64 (ε ≈ 1.1e-16);
  the two algorithms sum the same terms in a different order and get decays as exp(cs_i − cs_j) instead of
  products of exp(a_t), which over ≤ 40 tokens with |A·Δ| ≤ 20 costs ~1e-14 relative. 1e-10 catches any real
  formula difference (those show up at ≥ 1e-3) while never failing on rounding.
- Angles are compared as a wrapped difference (Θ near 0 and near 2π are the same angle), absolute 1e-10.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mamba3_gen.reference import chunked_reference, make_inputs, max_abs, naive_recurrence, rel_err, to_float64
from tests.strategies import formula_rules
from tests.cases import (
    _TIME_DIM,
    GOLDEN,
    GOLDEN_TOL,
    angle_diff,
    golden_case,
    golden_errors,
    make_spec,
    pack_batch,
    ssd_head,
    state_slice,
    time_slice,
)

TOL = 1e-10  # float64 vs float64, see module docstring
REFS = [naive_recurrence, chunked_reference]


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------
def rel_close(a, b, tol=TOL, floor=1e-8):
    """‖a − b‖ ≤ tol·max(‖b‖, floor): relative, with a floor so all-zero results (e.g. λ = 0, L = 1) compare."""
    a = a.double()
    b = b.double()
    return torch.linalg.vector_norm(a - b).item() <= tol * max(torch.linalg.vector_norm(b).item(), floor)


def assert_same(res_a, res_b, tol=TOL, what=""):
    (oa, sa), (ob, sb) = res_a, res_b
    assert oa.shape == ob.shape, what
    assert rel_close(oa, ob, tol), f"{what} out: rel err {rel_err(oa, ob):.3e}"
    for field in ("ssm", "k", "v"):
        xa, xb = getattr(sa, field), getattr(sb, field)
        assert (xa is None) == (xb is None), f"{what} {field}: presence differs"
        if xa is not None:
            assert xa.shape == xb.shape, f"{what} {field}: {tuple(xa.shape)} vs {tuple(xb.shape)}"
            assert rel_close(xa, xb, tol), f"{what} {field}: rel err {rel_err(xa, xb):.3e}"
    assert (sa.angle is None) == (sb.angle is None), f"{what} angle: presence differs"
    if sa.angle is not None:
        assert sa.angle.shape == sb.angle.shape
        assert angle_diff(sa.angle, sb.angle) <= tol, f"{what} angle: {angle_diff(sa.angle, sb.angle):.3e}"


# ------------------------------------------------------------------------------------------------------------------
# golden vectors from the official references
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ref", REFS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden(name, ref):
    spec, kw, g = golden_case(name, torch.float64)
    out, st_ = ref(spec, **kw)
    bad = {key: val for key, val in golden_errors(spec, out, st_, g).items() if not val <= GOLDEN_TOL}
    assert not bad, f"{name}: {bad}"


# ------------------------------------------------------------------------------------------------------------------
# random cases
# ------------------------------------------------------------------------------------------------------------------
@st.composite
def cases(draw, allow_varlen=True, allow_init=True):
    rule = draw(st.sampled_from(["euler", "trap_data", "trap_const", "zoh", "formula"]))
    lam_value = None
    if rule in ("trap_const", "formula"):
        lam_value = draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0)))
    rule_kw = {"rule": {"euler": "exp_euler", "zoh": "zoh"}.get(rule, "exp_trapezoidal")}
    if rule == "formula":
        rule_kw = draw(formula_rules())
    kind = draw(st.sampled_from(["real", "complex"]))
    R = draw(st.sampled_from([1, 2, 4]))
    G = draw(st.sampled_from([1, 2]))
    H = G * draw(st.sampled_from([1, 2]))
    N = draw(st.sampled_from([4, 8, 16]))
    P = draw(st.sampled_from([4, 8]))  # the Spec model requires headdim >= 4
    chunk = draw(st.sampled_from([1, 2, 4, 8, 16]))
    init = allow_init and draw(st.booleans())
    varlen = allow_varlen and draw(st.booleans())
    spec = make_spec(
        **rule_kw, lam="constant" if rule == "trap_const" or (rule == "formula" and draw(st.booleans())) else "data",
        lam_value=lam_value, kind=kind, rope=draw(st.sampled_from([0.5, 1.0])), rotation=draw(st.sampled_from(["pairwise", "halved"])),
        N=N, P=P, R=R, G=G, chunk=chunk, d_skip=draw(st.booleans()), z_gate=draw(st.booleans()),
        init=init, varlen=varlen,
    )
    kw = dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        with_initial_states=init,
        dtype=torch.float64,
        dt_range=(1e-4, 1.0),
        lam_logit_range=(-30.0, 30.0),  # λ = σ(trap) spans [1e-13, 1 - 1e-13]: all of [0, 1]
    )
    if draw(st.booleans()):
        kw["adt_range"] = (-20.0, 0.0)  # A·Δ down to −20 independently of Δ
    else:
        kw["a_range"] = (-20.0, -1e-3)  # A·Δ = A·Δ with Δ up to 1
    if varlen:
        lengths = draw(st.lists(st.integers(1, 20), min_size=1, max_size=4))  # often shorter than a chunk
        inputs = make_inputs(spec, 1, sum(lengths), H, nseq_lengths=lengths, **kw)
    else:
        B = draw(st.sampled_from([1, 2]))
        L = draw(st.integers(1, 40))
        inputs = make_inputs(spec, B, L, H, **kw)
    return spec, inputs


@given(cases())
def test_naive_equals_chunked(case):
    spec, kw = case
    assert_same(naive_recurrence(spec, **kw), chunked_reference(spec, **kw), what="naive vs chunked")


@given(cases(allow_varlen=False), st.integers(1, 25), st.data())
def test_split_sequence(case, L1, data):
    """Running [0, L1) then [L1, L) from the carried final states equals running [0, L) at once."""
    spec, kw = case
    L = kw["v"].shape[1]
    if L < 2:
        return
    L1 = 1 + L1 % (L - 1)
    ref = data.draw(st.sampled_from(REFS))
    full = ref(spec, **kw)
    out1, s1 = ref(spec, **time_slice(kw, 0, L1))
    out2, s2 = ref(spec, **{**time_slice(kw, L1, L), "initial_states": s1})
    assert_same((torch.cat([out1, out2], dim=1), s2), full, what=f"split at {L1} ({ref.__name__})")


@given(cases(allow_varlen=False))
def test_varlen_equals_separate(case):
    """Packed sequences (B = 1, cu_seqlens) equal each sequence run on its own; the two refs cross-checked."""
    spec, kw = case
    B, L = kw["v"].shape[:2]
    packed = pack_batch(kw)  # the batch as one varlen sequence
    for ref, other in ((naive_recurrence, chunked_reference), (chunked_reference, naive_recurrence)):
        out, s = ref(spec, **packed)
        for b in range(B):
            single = {key: (val.narrow(0, b, 1) if key in _TIME_DIM else val) for key, val in kw.items()}
            single["initial_states"] = state_slice(kw.get("initial_states"), b)
            o_b, s_b = other(spec, **single)
            assert_same((out[:, b * L:(b + 1) * L], state_slice(s, b)), (o_b, s_b), what=f"seq {b}")


def test_varlen_short_sequences():
    """Sequences shorter than a chunk, and a chunk boundary that would straddle two sequences."""
    spec = make_spec(R=2, N=8, P=4, G=1, chunk=8, rotation="halved", init=True, varlen=True)
    lengths = [3, 1, 9, 5]
    kw = make_inputs(spec, 1, sum(lengths), 2, nseq_lengths=lengths, with_initial_states=True, dtype=torch.float64,
                     seed=3, dt_range=(1e-2, 1.0), lam_logit_range=(-4, 4))
    out_n, s_n = naive_recurrence(spec, **kw)
    assert_same((out_n, s_n), chunked_reference(spec, **kw), what="varlen naive vs chunked")
    cu = kw["cu_seqlens"].tolist()
    for i, (s, e) in enumerate(zip(cu, cu[1:])):
        single = {**time_slice({k: v for k, v in kw.items() if k != "cu_seqlens"}, s, e),
                  "initial_states": state_slice(kw["initial_states"], i)}
        o_i, st_i = chunked_reference(spec, **single)
        assert_same((out_n[:, s:e], state_slice(s_n, i)), (o_i, st_i), what=f"seq {i}")


# ------------------------------------------------------------------------------------------------------------------
# exp_euler + real state = a Mamba-2 SSD head
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("init", [False, True])
def test_euler_real_is_ssd(chunk, init):
    H, G = 4, 2
    spec = make_spec(rule="exp_euler", kind="real", N=8, P=4, G=G, chunk=chunk, init=init)
    kw = make_inputs(spec, 2, 29, H, with_initial_states=init, dtype=torch.float64, seed=11,
                     dt_range=(1e-3, 1.0), adt_range=(-20.0, 0.0))
    assert "trap" not in kw and "angles" not in kw
    init_ssm = kw["initial_states"].ssm if init else torch.zeros(2, H, 4, 8, dtype=torch.float64)
    y_ref, H_ref = ssd_head(kw, H, G, init_ssm)
    for ref in REFS:
        out, s = ref(spec, **kw)
        assert s.angle is None and s.k is None and s.v is None
        assert rel_close(out, y_ref), f"{ref.__name__}: rel err {rel_err(out, y_ref):.3e}"
        assert rel_close(s.ssm, H_ref), f"{ref.__name__}: state rel err {rel_err(s.ssm, H_ref):.3e}"


# ------------------------------------------------------------------------------------------------------------------
# make_inputs contract
# ------------------------------------------------------------------------------------------------------------------
def test_make_inputs_keys_and_shapes():
    siso = make_spec(rule="exp_trapezoidal", N=16, P=8, R=1, G=2, init=True)
    kw = make_inputs(siso, 2, 10, 4, with_initial_states=True)
    assert set(kw) == {"q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "D", "z", "initial_states"}
    assert kw["q"].shape == (2, 10, 2, 16) and kw["q_bias"].shape == (4, 16) and kw["angles"].shape == (2, 10, 4, 4)
    assert kw["trap"].shape == (2, 4, 10) and kw["q"].dtype == torch.float32
    s = kw["initial_states"]
    assert s.angle.shape == (2, 4, 4) and s.ssm.shape == (2, 4, 8, 16) and s.k.shape == (2, 4, 16)
    assert s.v.shape == (2, 4, 8) and (s.angle >= 0).all() and (s.angle < 2 * math.pi).all()
    assert (kw["adt"] <= 0).all() and (kw["dt"] > 0).all()

    mimo = make_spec(rule="exp_trapezoidal", lam="constant", lam_value=0.5, kind="real", N=8, P=4, R=4, G=1,
                     d_skip=False, z_gate=False)
    kw = make_inputs(mimo, 1, 7, 2, nseq_lengths=[3, 4], with_initial_states=True)
    assert set(kw) == {"q", "k", "v", "adt", "dt", "q_bias", "k_bias", "mimo_v", "mimo_o", "initial_states",
                       "cu_seqlens"}
    assert kw["q"].shape == (1, 7, 4, 1, 8) and kw["k_bias"].shape == (2, 4, 8) and kw["mimo_v"].shape == (2, 4, 4)
    assert kw["cu_seqlens"].dtype == torch.int32 and kw["cu_seqlens"].tolist() == [0, 3, 7]
    s = kw["initial_states"]
    assert s.angle is None and s.k.shape == (2, 4, 2, 8) and s.v.shape == (2, 2, 4)

    euler = make_spec(rule="exp_euler", kind="real")
    kw = make_inputs(euler, 1, 5, 2, with_initial_states=True)
    assert kw["initial_states"].k is None and kw["initial_states"].v is None and "trap" not in kw
    # A·Δ down to about −20 when asked
    kw = make_inputs(euler, 4, 64, 8, dt_range=(1e-4, 1.0), adt_range=(-20.0, 0.0))
    assert kw["adt"].min() < -19.0

    # float32 inputs give the same result as their float64 cast (the references compute in float64)
    out32, _ = naive_recurrence(siso, **make_inputs(siso, 1, 6, 4))
    out64, _ = naive_recurrence(siso, **to_float64(make_inputs(siso, 1, 6, 4)))
    assert out32.dtype == torch.float64 and max_abs(out32, out64) == 0.0
