"""The Mamba3 layer (mamba3_gen/layer.py): official parameters, forward == float64 reference, decode == forward.

On the CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before any kernel
is imported), in fp32 with tiny shapes: d_model 16, expand 2 (d_inner 32), headdim 8 (H = 4), d_state 16. Every
parameter is drawn away from its initial value first, so that two parameters swapped (B_bias for C_bias, mimo_x for
mimo_o) or a slice of in_proj taken from the wrong place changes the output. The gradient tests (below) use d_model 8
(H = 2) and chunk 4, since the interpreter's backward costs time in proportion to B·L·H; their tolerance is stated
in test_gradients_match_float64_autograd. Training: torch.compile, activation checkpointing and a tiny language
model (examples/train_lm.py's) on the CPU.

The official facts (mamba_ssm/modules/mamba3.py at e9594ce, restated in ../shared/docs/mamba3-math.md §1): in_proj
splits into z (d_inner) | x (d_inner) | B (R·G·N) | C (R·G·N) | dd_dt (H) | dd_A (H) | trap (H) | angles (S); the
parameters are in_proj.weight, dt_bias (H,), B_bias and C_bias (H, R, N) [R = 1 for SISO], B_norm.weight and
C_norm.weight (N,), D (H,), mimo_x, mimo_z, mimo_o (H, R, P) for MIMO only, norm.weight (d_inner,) with
is_outproj_norm only, out_proj.weight (d_model, d_inner); dt_bias, the B/C biases, D and mimo_* are fp32 whatever
the layer's dtype.

Tolerance: ‖out − ref‖ ≤ 1e-4·‖ref‖ (+ 1e-5·√numel) and max|out − ref| ≤ 1e-4·max|ref| + 1e-5 (CPU_TOL), for the
layer against its float64 reference and for decode against forward. The layer adds to the kernel's fp32 computation
(budgeted at 1e-4 in tests/test_forward.py's docstring, observed ~1e-7) only short fp32 operations: in_proj and
out_proj are dot products of 16 and 32 terms (worst-case relative error 32·6e-8 ≈ 2e-6 of the summed magnitudes,
typically ~√32·6e-8 ≈ 3e-7), the RMSNorms, softplus and the heavy tail a few roundings each (~1e-7). Δ enters the
exponent of a decay as A·Δ with |A·Δ| ≲ 2 here, so its 1e-7 relative error is a 2e-7 relative error of a weight.
So the kernel's budget dominates and 1e-4 holds with a wide margin, while a wrong slice, parameter or formula
changes the output by O(1). Decode against forward compares two fp32 computations of the same layer (each within
the bound above of the same float64 value). States after a prefill are compared with the same tolerance (the angle
as a circular error).
"""
from __future__ import annotations

import copy
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import mamba3_gen
from mamba3_gen.errors import InputError
from mamba3_gen.layer import Mamba3, heavy_tail, layer_reference
from mamba3_gen.reference.inputs import token_inputs
from mamba3_gen.runtime.state import Mamba3State
from tests.helpers import SPECS_DIR, assert_matches
from tests.strategies import CPU_TOL, interpreter_only

D_MODEL = 16  # expand 2 → d_inner 32 = 4 heads of headdim 8


# ------------------------------------------------------------------------------------------------------------------
# official parameters
# ------------------------------------------------------------------------------------------------------------------
def official_shapes(d_model: int, mimo_rank: int, outproj_norm: bool, N=128, P=64, G=1, rope_fraction=0.5,
                    expand=2) -> dict:
    """key → shape of the official module's state_dict (mamba_ssm/modules/mamba3.py, e9594ce) for a config; the
    official SISO layer (is_mimo False) has rank 1 and no mimo_* parameters."""
    d_inner = expand * d_model
    H = d_inner // P
    split = int(N * rope_fraction)
    S = (split - split % 2) // 2
    R = mimo_rank
    shapes = {
        "dt_bias": (H,), "B_bias": (H, R, N), "C_bias": (H, R, N),
        "in_proj.weight": (2 * d_inner + 2 * N * G * R + 3 * H + S, d_model),
        "B_norm.weight": (N,), "C_norm.weight": (N,), "D": (H,), "out_proj.weight": (d_model, d_inner),
    }
    if R > 1:
        shapes.update({"mimo_x": (H, R, P), "mimo_z": (H, R, P), "mimo_o": (H, R, P)})
    if outproj_norm:
        shapes["norm.weight"] = (d_inner,)
    return shapes


# The released configurations at d_model 2048 (N 128, P 64, H 64, G 1, S 32), written out.
OFFICIAL = {
    ("siso_trap_complex", False): {
        "dt_bias": (64,), "B_bias": (64, 1, 128), "C_bias": (64, 1, 128), "D": (64,),
        "in_proj.weight": (8672, 2048),  # 2·4096 + 2·128 + 3·64 + 32
        "B_norm.weight": (128,), "C_norm.weight": (128,), "out_proj.weight": (2048, 4096),
    },
    ("mimo_r4", False): {
        "dt_bias": (64,), "B_bias": (64, 4, 128), "C_bias": (64, 4, 128), "D": (64,),
        "mimo_x": (64, 4, 64), "mimo_z": (64, 4, 64), "mimo_o": (64, 4, 64),
        "in_proj.weight": (9440, 2048),  # 2·4096 + 2·128·4 + 3·64 + 32
        "B_norm.weight": (128,), "C_norm.weight": (128,), "out_proj.weight": (2048, 4096),
    },
}
OFFICIAL[("siso_trap_complex", True)] = {**OFFICIAL[("siso_trap_complex", False)], "norm.weight": (4096,)}
OFFICIAL[("mimo_r4", True)] = {**OFFICIAL[("mimo_r4", False)], "norm.weight": (4096,)}
FP32_ALWAYS = {"dt_bias", "B_bias", "C_bias", "D", "mimo_x", "mimo_z", "mimo_o"}  # fp32 in any layer dtype


@pytest.fixture(scope="module")
def official_layers():
    layers = {}

    def get(name, outproj_norm, dtype=None):
        key = (name, outproj_norm, dtype)
        if key not in layers:
            torch.manual_seed(0)
            layers[key] = Mamba3(SPECS_DIR / f"{name}.yaml", 2048, is_outproj_norm=outproj_norm, dtype=dtype)
        return layers[key]

    return get


@pytest.mark.parametrize("outproj_norm", [False, True])
@pytest.mark.parametrize("name", ["siso_trap_complex", "mimo_r4"])
def test_state_dict_is_official(official_layers, name, outproj_norm):
    """The shipped official specs give exactly the official state_dict keys and shapes, and an official
    checkpoint's tensors load with strict=True."""
    layer = official_layers(name, outproj_norm)
    got = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert got == OFFICIAL[(name, outproj_norm)]
    R = 4 if name == "mimo_r4" else 1
    assert official_shapes(2048, R, outproj_norm) == OFFICIAL[(name, outproj_norm)]  # the table's arithmetic
    checkpoint = {k: torch.randn(s) for k, s in OFFICIAL[(name, outproj_norm)].items()}
    layer.load_state_dict(checkpoint, strict=True)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in checkpoint.items())


def test_official_dtypes(official_layers):
    """in_proj, the norms and out_proj take the layer's dtype; dt_bias, the biases, D and mimo_* stay fp32."""
    layer = official_layers("mimo_r4", True, torch.bfloat16)
    for k, v in layer.state_dict().items():
        want = torch.float32 if k in FP32_ALWAYS else torch.bfloat16
        assert v.dtype == want, f"{k}: {v.dtype}, official {want}"


@pytest.mark.parametrize("name,R", [("siso_trap_complex", 1), ("mimo_r4", 4)])
def test_official_initialisation(name, R):
    """Δ₀ = softplus(dt_bias) ∈ [dt_min, dt_max] (log-uniform, the floor below dt_min is inactive), B/C biases 1,
    D 1, mimo_x = mimo_o = 1/R, mimo_z 1, norm weights 1; and in_proj's slices in the official order and widths."""
    torch.manual_seed(0)
    layer = Mamba3(SPECS_DIR / f"{name}.yaml", 2048, dt_min=1e-3, dt_max=1e-1, is_outproj_norm=True)
    dt0 = F.softplus(layer.dt_bias.detach().double())
    assert dt0.min() >= 1e-3 * (1 - 1e-6) and dt0.max() <= 1e-1 * (1 + 1e-6)
    # log-uniform: the logs spread over most of [log 1e-3, log 1e-1] with 64 heads (a fixed uniform would not)
    assert (dt0.log().max() - dt0.log().min()) > 0.8 * math.log(100)
    ones = {"B_bias": 1.0, "C_bias": 1.0, "D": 1.0, "B_norm.weight": 1.0, "C_norm.weight": 1.0, "norm.weight": 1.0}
    if R > 1:
        ones.update({"mimo_x": 1 / R, "mimo_z": 1.0, "mimo_o": 1 / R})
    sd = layer.state_dict()
    for k, val in ones.items():
        assert torch.all(sd[k] == val), k
    H, GRN = 64, 128 * R
    assert layer.in_proj_split == [("z", 4096), ("x", 4096), ("B", GRN), ("C", GRN), ("dd_dt", H), ("dd_A", H),
                                   ("trap", H), ("angles", 32)]


def test_dt_floor_applies():
    """Δ₀ below dt_init_floor is raised to it (here every head: dt_max < floor)."""
    layer = Mamba3(small_spec(), D_MODEL, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4)
    assert torch.allclose(F.softplus(layer.dt_bias.detach().double()), torch.full((4,), 1e-4, dtype=torch.float64),
                          rtol=1e-5)


def test_heavy_tail():
    """f(u) = 1 + u (u ≥ 0), 1 / (1 − u) (u < 0): values, continuity at 0, finite gradient at u = 1."""
    u = torch.tensor([-3.0, -0.5, 0.0, 0.5, 1.0, 4.0], dtype=torch.float64, requires_grad=True)
    want = torch.tensor([0.25, 1 / 1.5, 1.0, 1.5, 2.0, 5.0], dtype=torch.float64)
    f = heavy_tail(u)
    assert torch.allclose(f, want, rtol=0, atol=1e-15)
    f.sum().backward()
    assert torch.allclose(u.grad, torch.tensor([1 / 16, 1 / 2.25, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))


# ------------------------------------------------------------------------------------------------------------------
# small layers: slices, forward == float64 reference
# ------------------------------------------------------------------------------------------------------------------
def small_spec(rule="exp_trapezoidal", R=1, G=1, kind="complex", rotation="pairwise", rope=0.5, chunk=8, **sections):
    """A small spec dict (N 16, P 8, fp32); ``sections`` replace parts: discretization, inputs, options."""
    doc = {
        "name": "layer_test",
        "discretization": {"rule": rule},
        "state": {"kind": kind, "rotation": rotation, "rope_fraction": rope},
        "dims": {"d_state": 16, "headdim": 8, "mimo_rank": R, "ngroups": G, "chunk_size": chunk},
        "dtypes": {"input": "fp32", "compute": "fp32"},
        "options": {"varlen": True, "initial_states": True},
    }
    for section, values in sections.items():
        doc[section] = {**doc.get(section, {}), **values}
    return doc


TWO_LAG = {"rule": "custom", "lambda": "data",
           "weights": ["lam * dt", "(1 - lam) * dt * exp(adt) * 2 / 3", "(1 - lam) * dt * exp(adt) / 3"]}

# name -> (spec, is_outproj_norm)
CASES = {
    "siso_trap_pairwise": (small_spec(), False),
    "mimo_r2_halved_g2": (small_spec(R=2, G=2, rotation="halved"), False),
    "euler_real": (small_spec("exp_euler", kind="real"), False),
    "zoh_real_no_skip": (small_spec("zoh", kind="real", options={"d_skip": False}), False),
    "const_half_fullrope": (small_spec(rope=1.0, discretization={"lambda": "constant", "lambda_value": 0.5}), False),
    "two_lag_custom_mimo": (small_spec(R=2, discretization=TWO_LAG), False),
    "cute_encodings": (small_spec(inputs={"decay": "a", "trap": "lambda"}), False),
    "no_z_gate_mimo": (small_spec(R=2, options={"z_gate": False}), False),
    "outproj_norm_siso": (small_spec(), True),
    "outproj_norm_mimo": (small_spec(R=2, rotation="halved"), True),
    "outproj_norm_no_gate_mimo": (small_spec(R=2, options={"z_gate": False}), True),
}

_LAYERS: dict = {}


def randomize_(layer: Mamba3) -> Mamba3:
    """Draw every parameter of ``layer`` away from its initial value (torch's global generator), in place."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "dt_bias":  # Δ ∈ [0.02, 0.5]: enough decay and rotation per token to matter
                dt0 = torch.exp(torch.empty_like(p).uniform_(math.log(0.02), math.log(0.5)))
                p.copy_(dt0 + torch.log(-torch.expm1(-dt0)))
            elif name.endswith("_proj.weight"):
                pass  # nn.Linear's own random init
            elif name in ("B_bias", "C_bias"):
                p.copy_(torch.randn_like(p))
            else:  # norm weights, D, mimo_*: 1 ± 0.5
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return layer


def randomized(case: str) -> Mamba3:
    """The case's layer, every parameter drawn away from its initial value (seeded)."""
    if case not in _LAYERS:
        spec, outproj_norm = CASES[case]
        torch.manual_seed(1)
        _LAYERS[case] = randomize_(Mamba3(spec, D_MODEL, is_outproj_norm=outproj_norm, layer_idx=0))
    return _LAYERS[case]


def test_slices_follow_the_spec():
    """Rules that read no λ (or a constant λ) take no trap slice, a real state no angles, no z gate no z; the
    rest is the official order."""
    def names(spec, **kw):
        return [n for n, _ in Mamba3(spec, D_MODEL, **kw).in_proj_split]

    full = ["z", "x", "B", "C", "dd_dt", "dd_A", "trap", "angles"]
    assert names(small_spec()) == full
    assert names(small_spec("exp_euler")) == [n for n in full if n != "trap"]
    assert names(small_spec("zoh", kind="real")) == ["z", "x", "B", "C", "dd_dt", "dd_A"]
    assert names(small_spec(discretization={"lambda": "constant", "lambda_value": 0.5})) == \
        [n for n in full if n != "trap"]
    assert names(small_spec(rule="custom", discretization={"weights": ["dt", "dt * exp(adt)"]})) == \
        [n for n in full if n != "trap"]
    assert names(small_spec(options={"z_gate": False})) == full[1:]
    layer = Mamba3(small_spec(R=2, options={"z_gate": False, "d_skip": False}), D_MODEL)
    assert "mimo_z" not in layer.state_dict() and "D" not in layer.state_dict()


@interpreter_only
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_reference(case):
    """Layer forward (fp32, generated kernel) == its float64 reference, B 2, L 11 (a chunk of 8 and a partial one)."""
    layer = randomized(case)
    u = torch.randn(2, 11, D_MODEL, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = layer(u)
    ref, _ = layer_reference(layer, u)
    assert out.shape == u.shape and out.dtype == u.dtype
    assert_matches((out, None), (ref, None), CPU_TOL, what=case)


@interpreter_only
def test_outproj_norm_changes_the_output():
    """The output norm is not a no-op on these inputs (so the cases above test it)."""
    spec, _ = CASES["outproj_norm_siso"]
    torch.manual_seed(3)
    a = Mamba3(spec, D_MODEL, is_outproj_norm=True)
    b = Mamba3(spec, D_MODEL)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if k != "norm.weight"}, strict=True)
    u = torch.randn(1, 5, D_MODEL)
    with torch.no_grad():
        ya, yb = a(u), b(u)
    assert (ya - yb).abs().max() > 1e-2 * yb.abs().max()


@interpreter_only
@pytest.mark.parametrize("case", ["outproj_norm_mimo", "outproj_norm_no_gate_mimo"])
def test_outproj_norm_mimo_gets_every_rank_from_one_call(case):
    """With the output norm and R > 1 the layer passes mimo_o=None and gets y (…, R, H, P) from one op call (forward
    and step). That equals, bit for bit, the former R calls with mimo_o the indicator of rank r (y_r·1 + y_s·0 for
    s ≠ r is y_r exactly in fp32), outputs and final states, so the layer's outputs are unchanged."""
    layer = randomized(case)
    H, R, P = layer.nheads, layer.mimo_rank, layer.headdim
    u = torch.randn(2, 6, D_MODEL, generator=torch.Generator().manual_seed(4))
    fwd, step = layer.op.mamba3_forward, layer.op.mamba3_step
    with torch.no_grad():
        kw, _ = layer._inputs(u)
        assert kw["mimo_o"] is None
        y, final = fwd(**kw, return_final_states=True)
        state = step.zero_state(2, H)
        y_step, new = step(**token_inputs(kw, 0), state=state)
        assert y.shape == (2, 6, R, H, P) and y_step.shape == (2, R, H, P)
        for r in range(R):
            onehot = torch.zeros(H, R, P)
            onehot[:, r] = 1.0
            y_r, final_r = fwd(**{**kw, "mimo_o": onehot}, return_final_states=True)
            assert torch.equal(y[:, :, r], y_r), f"forward, rank {r}"
            assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(final, final_r))
            y_step_r, new_r = step(**{**token_inputs(kw, 0), "mimo_o": onehot}, state=state)
            assert torch.equal(y_step[:, r], y_step_r), f"step, rank {r}"
            assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(new, new_r))


# ------------------------------------------------------------------------------------------------------------------
# decode: prefill + steps == forward
# ------------------------------------------------------------------------------------------------------------------
def inference_params():
    """What the layer reads of mamba_ssm's InferenceParams."""
    return SimpleNamespace(key_value_memory_dict={}, seqlen_offset=0)


def check_state(got: Mamba3State, ref: Mamba3State, what: str):
    problems = []
    for f in Mamba3State._fields:
        a, b = getattr(got, f), getattr(ref, f)
        assert (a is None) == (b is None), f"{what}.{f}: present in one only"
        if a is not None:
            problems.append(CPU_TOL.check_angle(f"{what}.{f}", a, b) if f == "angle"
                            else CPU_TOL.check(f"{what}.{f}", a, b))
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)


@interpreter_only
@pytest.mark.parametrize("case", ["siso_trap_pairwise", "mimo_r2_halved_g2", "euler_real", "two_lag_custom_mimo",
                                  "outproj_norm_mimo"])
def test_prefill_then_steps_equals_forward(case):
    """Prefill 5 tokens through forward(inference_params) (the cache then holds the reference's final states), then
    3 tokens at once (seqlen_offset 5), then single tokens alternating forward(u (B, 1, D), inference_params),
    step(u (B, D), *cache) and step(u (B, 1, D), *cache): together equal to one forward over all 11 tokens."""
    layer = randomized(case)
    u = torch.randn(2, 11, D_MODEL, generator=torch.Generator().manual_seed(4))
    params = inference_params()
    with torch.no_grad():
        full = layer(u)
        outs = [layer(u[:, :5], inference_params=params)]
        cache = params.key_value_memory_dict[0]
        check_state(cache, layer_reference(layer, u[:, :5])[1], "cache after prefill")
        params.seqlen_offset = 5
        outs.append(layer(u[:, 5:8], inference_params=params))
        for t in range(8, 11):
            params.seqlen_offset = t
            if t % 3 == 2:
                y = layer(u[:, t:t + 1], inference_params=params)
            elif t % 3 == 0:
                y, *state = layer.step(u[:, t], *cache)
                assert y.shape == (2, D_MODEL) and all(a is b for a, b in zip(state, cache))
                y = y[:, None]
            else:
                y, *_ = layer.step(u[:, t:t + 1], *cache)
                assert y.shape == (2, 1, D_MODEL)
            outs.append(y)
    assert_matches((torch.cat(outs, dim=1), None), (full, None), CPU_TOL, what=case)
    check_state(cache, layer_reference(layer, u)[1], "cache after the last step")


@interpreter_only
def test_continuation_without_initial_states_steps():
    """A spec without options.initial_states continues a cached sequence of several tokens one step at a time."""
    spec = small_spec(options={"initial_states": False})
    torch.manual_seed(5)
    layer = Mamba3(spec, D_MODEL, layer_idx=3)
    u = torch.randn(1, 7, D_MODEL)
    params = inference_params()
    with torch.no_grad():
        full = layer(u)
        first = layer(u[:, :4], inference_params=params)
        params.seqlen_offset = 4
        rest = layer(u[:, 4:], inference_params=params)
    assert_matches((torch.cat([first, rest], dim=1), None), (full, None), CPU_TOL)


@interpreter_only
def test_step_input_shapes_and_cache():
    """step takes (B, d_model) and (B, 1, d_model) with the same result; allocate_inference_cache gives the zero
    state of the spec's layout; other shapes and grad mode are refused with the expected shape named."""
    layer = randomized("mimo_r2_halved_g2")
    u = torch.randn(3, D_MODEL)
    a, b = layer.allocate_inference_cache(3), layer.allocate_inference_cache(3, max_seqlen=100)
    assert a.angle.shape == (3, 4, 4) and a.ssm.shape == (3, 4, 8, 16) and a.k.shape == (3, 2, 4, 16)
    assert a.v.shape == (3, 4, 8) and all(torch.count_nonzero(t) == 0 for t in a)
    with torch.no_grad():
        ya, *_ = layer.step(u, *a)
        yb, *_ = layer.step(u[:, None], *b)
    assert ya.shape == (3, D_MODEL) and yb.shape == (3, 1, D_MODEL)
    assert torch.equal(ya, yb[:, 0]) and all(torch.equal(x, y) for x, y in zip(a, b))
    with torch.no_grad(), pytest.raises(InputError, match=r"\(B, d_model=16\) or \(B, 1, d_model=16\); got shape"):
        layer.step(torch.randn(3, 2, D_MODEL), *a)
    with pytest.raises(InputError, match="torch.no_grad"):
        layer.step(u, *a)
    with torch.no_grad(), pytest.raises(InputError, match="state.ssm has shape"):
        layer.step(u, a.angle, a.ssm[:2], a.k, a.v)


# ------------------------------------------------------------------------------------------------------------------
# packed sequences
# ------------------------------------------------------------------------------------------------------------------
@interpreter_only
@pytest.mark.parametrize("case", ["siso_trap_pairwise", "outproj_norm_mimo"])
def test_cu_seqlens(case):
    """A pack of sequences (one empty, one shorter than a chunk) equals each sequence run alone and the float64
    reference of the pack; a prefill of the pack caches each sequence's final state in its row."""
    layer = randomized(case)
    lengths = [3, 0, 9, 5]
    cu = torch.tensor([0, 3, 3, 12, 17], dtype=torch.int32)
    u = torch.randn(1, 17, D_MODEL, generator=torch.Generator().manual_seed(6))
    params = inference_params()
    with torch.no_grad():
        packed = layer(u, cu_seqlens=cu)
        cached = layer(u, cu_seqlens=cu, inference_params=params)
        alone = [layer(u[:, s:s + n]) for s, n in zip(cu.tolist(), lengths)]
    ref, ref_state = layer_reference(layer, u, cu_seqlens=cu)
    assert_matches((packed, None), (ref, None), CPU_TOL, what="pack vs reference")
    assert_matches((packed, None), (torch.cat(alone, dim=1), None), CPU_TOL, what="pack vs alone")
    assert torch.equal(cached, packed)
    cache = params.key_value_memory_dict[0]
    assert cache.ssm.shape[0] == 4
    check_state(cache, ref_state, "cache of the pack")
    assert torch.count_nonzero(cache.ssm[1]) == 0  # the empty sequence keeps the zero state


# ------------------------------------------------------------------------------------------------------------------
# errors and module plumbing
# ------------------------------------------------------------------------------------------------------------------
def test_constructor_errors():
    with pytest.raises(InputError, match=r"expand·d_model = 2·10 = 20 channels .* headdim P=8"):
        Mamba3(small_spec(), 10)
    with pytest.raises(InputError, match=r"4 heads is not a multiple of ngroups G=8"):
        Mamba3(small_spec(G=8), D_MODEL)
    with pytest.raises(InputError, match=r"d_state= comes from the spec here \(dims.d_state\)"):
        Mamba3(small_spec(), D_MODEL, d_state=64)
    with pytest.raises(InputError, match="0 < dt_min <= dt_max"):
        Mamba3(small_spec(), D_MODEL, dt_min=0.1, dt_max=0.01)
    with pytest.raises(mamba3_gen.SpecError, match="mimo_rank"):
        Mamba3(small_spec(R=9), D_MODEL)
    with pytest.raises(TypeError, match="unexpected keyword"):
        Mamba3(small_spec(), D_MODEL, dropuot=0.1)


@interpreter_only
def test_forward_errors():
    layer = randomized("siso_trap_pairwise")
    with torch.no_grad():
        with pytest.raises(InputError, match=r"u must be a tensor of shape \(B, L, d_model=16\); got shape \(2, 16\)"):
            layer(torch.randn(2, D_MODEL))
        with pytest.raises(InputError, match=r"d_model=16\); got shape \(1, 3, 15\)"):
            layer(torch.randn(1, 3, 15))
        with pytest.raises(InputError, match=r"u must be \(1, L, d_model=16\); got shape \(2, 4, 16\)"):
            layer(torch.randn(2, 4, D_MODEL), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
        with pytest.raises(InputError, match="key_value_memory_dict .* and seqlen_offset"):
            layer(torch.randn(1, 3, D_MODEL), inference_params={})
        no_idx = Mamba3(small_spec(), D_MODEL)
        with pytest.raises(InputError, match="layer_idx"):
            no_idx(torch.randn(1, 3, D_MODEL), inference_params=inference_params())
        params = inference_params()
        layer(torch.randn(2, 3, D_MODEL), inference_params=params)
        params.seqlen_offset = 3
        with pytest.raises(InputError, match=r"Mamba3State for 1 sequences"):
            layer(torch.randn(1, 1, D_MODEL), inference_params=params)
        with pytest.raises(InputError, match="seqlen_offset > 0"):
            layer(torch.randn(1, 2, D_MODEL), cu_seqlens=torch.tensor([0, 1, 2], dtype=torch.int32),
                  inference_params=params)


@interpreter_only
def test_deepcopy_and_lazy_export():
    """mamba3_gen.Mamba3 is the layer class; a deep copy (EMA, model surgery) is a working layer."""
    assert mamba3_gen.Mamba3 is Mamba3
    layer = randomized("euler_real")
    twin = copy.deepcopy(layer)
    u = torch.randn(1, 4, D_MODEL)
    with torch.no_grad():
        assert torch.equal(twin(u), layer(u))


# ------------------------------------------------------------------------------------------------------------------
# gradients: every parameter and the input against float64 autograd through layer_reference
# ------------------------------------------------------------------------------------------------------------------
GRAD_D_MODEL = 8  # expand 2 → d_inner 16 = 2 heads of headdim 8: the interpreter's backward costs ~B·L·H
GRAD_REL, GRAD_ATOL = 1e-4, 1e-5  # justified in the docstring of test_gradients_match_float64_autograd
ONE_LAG_FORMULA = {"rule": "custom", "lambda": "data", "log_decay": "adt - 0.05 * dt",
                   "weights": ["lam * dt * exp(0.5 * adt)", "(1 - lam) * dt * exp(adt) * tanh(1 + dt)"]}
# name -> (spec, is_outproj_norm): small versions of the shipped specs, a formula rule and the output norm
GRAD_CASES = {
    "siso_trap_complex": (small_spec(chunk=4), False),
    "siso_trap_complex_outproj_norm": (small_spec(chunk=4), True),
    "siso_euler_real": (small_spec("exp_euler", kind="real", chunk=4), False),
    "zoh_real_outproj_norm": (small_spec("zoh", kind="real", chunk=4), True),
    "mimo_r2_const_half_fullrope": (small_spec(R=2, rotation="halved", rope=1.0, chunk=4,
                                               discretization={"lambda": "constant", "lambda_value": 0.5}), False),
    "mimo_r4": (small_spec(R=4, rotation="halved", chunk=4), False),
    "mimo_r4_outproj_norm": (small_spec(R=4, rotation="halved", chunk=4), True),
    "mimo_r2_g2_no_z": (small_spec(R=2, G=2, chunk=4, options={"z_gate": False}), False),
    "formula_one_lag": (small_spec("custom", chunk=4, discretization=ONE_LAG_FORMULA), False),
    "cute_encodings": (small_spec(chunk=4, inputs={"decay": "a", "trap": "lambda"}), False),
    "two_lag_complex": (small_spec("custom", chunk=4, discretization=TWO_LAG), False),
    "two_lag_mimo_r2": (small_spec("custom", R=2, rotation="halved", chunk=2, discretization=TWO_LAG), False),
}


def grad_layer(case: str, seed: int = 7) -> Mamba3:
    spec, outproj_norm = GRAD_CASES[case]
    torch.manual_seed(seed)
    return randomize_(Mamba3(spec, GRAD_D_MODEL, is_outproj_norm=outproj_norm))


def layer_and_reference_grads(layer: Mamba3, u: torch.Tensor, cu_seqlens=None) -> dict:
    """{name: (layer's gradient, float64 gradient)} for u and every parameter, of the loss Σ out·w (w fixed, random,
    float64: a generic linear functional, so every output element's gradient path is exercised). The float64 side
    is autograd through layer_reference on a float64 copy of the layer."""
    layer.zero_grad(set_to_none=True)
    ref = copy.deepcopy(layer).double()
    x, x64 = u.detach().clone().requires_grad_(), u.detach().double().requires_grad_()
    out = layer(x, cu_seqlens=cu_seqlens)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    (out.double() * w).sum().backward()
    rout, _ = layer_reference(ref, x64, cu_seqlens=cu_seqlens)
    (rout * w).sum().backward()
    grads = {"u": (x.grad, x64.grad)}
    ref_params = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        grads[name] = (p.grad, ref_params[name].grad)
    return grads


def check_grads(grads: dict, what: str) -> dict:
    """Assert every gradient exists, is finite and within GRAD_REL (RMS ratio) of the float64 one; return the
    ratios (for the failure message of a caller, and to read off when tuning)."""
    problems, ratios = [], {}
    for name, (g, r) in grads.items():
        if g is None or r is None:
            problems.append(f"{name}: no gradient ({'layer' if g is None else 'reference'})")
            continue
        g, r = g.double(), r.double()
        assert g.shape == r.shape, name
        err, scale = torch.linalg.vector_norm(g - r), torch.linalg.vector_norm(r)
        ratios[name] = (err / scale).item()
        if not torch.isfinite(g).all():
            problems.append(f"{name}: non-finite values")
        elif scale == 0:
            problems.append(f"{name}: the reference gradient is zero (the case does not exercise it)")
        elif err > GRAD_REL * scale + GRAD_ATOL * g.numel() ** 0.5:
            problems.append(f"{name}: rms ratio {ratios[name]:.2e} > {GRAD_REL:g}")
    assert not problems, f"{what}:\n" + "\n".join(problems)
    return ratios


@interpreter_only
@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_gradients_match_float64_autograd(case):
    """∂(Σ out·w)/∂θ of the layer (fp32, generated forward and backward) == float64 autograd through
    layer_reference on a float64 copy, for u and every parameter (in_proj, dt_bias, B/C biases, B/C norms, D,
    mimo_x/z/o, the output norm, out_proj); B 2 (1 for R4 with the output norm), L 7 with chunk 4 (a full and a
    partial chunk).

    Tolerance: RMS ratio ‖g − g₆₄‖ / ‖g₆₄‖ ≤ 1e-4 (+ 1e-5·√numel). The op's gradients are budgeted at 1e-4 in
    tests/test_backward.py's docstring (observed there 1e-7..1e-6); around the op the layer's backward is torch's
    fp32 autograd of short operations: the in_proj/out_proj weight gradients sum B·L = 14 outer products
    (≤ 14·6e-8 ≈ 1e-6 relative), their input gradients dot products of ≤ 200 terms (√200·6e-8 ≈ 1e-6
    typically), the RMSNorms, softplus, sigmoid and the heavy tail a few roundings each. So 1e-4 keeps a margin of
    ~100x over the observed 1e-7..1e-6, while a detached tensor, a missing chain-rule factor or a gradient landing
    in the wrong parameter is an O(1) error (or a missing gradient, which fails on its own).
    """
    layer = grad_layer(case)
    batch = 1 if layer.is_outproj_norm and layer.mimo_rank > 2 else 2  # keeps the interpreter's time down
    u = torch.randn(batch, 7, GRAD_D_MODEL, generator=torch.Generator().manual_seed(9))
    check_grads(layer_and_reference_grads(layer, u), case)


@interpreter_only
@pytest.mark.parametrize("case", ["siso_trap_complex", "mimo_r4"])
def test_gradients_with_cu_seqlens(case):
    """The same through a pack of sequences (an empty one, one within a chunk, one over two chunks)."""
    layer = grad_layer(case)
    cu = torch.tensor([0, 3, 3, 9, 11], dtype=torch.int32)
    u = torch.randn(1, 11, GRAD_D_MODEL, generator=torch.Generator().manual_seed(10))
    check_grads(layer_and_reference_grads(layer, u, cu_seqlens=cu), case)


@interpreter_only
def test_two_lag_rule_gradients_with_cu_seqlens():
    """A rule with three weights (J = 2, the carried tokens t−1, t−2) through a pack of sequences: its gradients
    equal float64 autograd (tolerance: test_gradients_match_float64_autograd's)."""
    layer = grad_layer("two_lag_complex")
    cu = torch.tensor([0, 1, 1, 6, 11], dtype=torch.int32)
    u = torch.randn(1, 11, GRAD_D_MODEL, generator=torch.Generator().manual_seed(12))
    check_grads(layer_and_reference_grads(layer, u, cu_seqlens=cu), "two_lag_complex")


# ------------------------------------------------------------------------------------------------------------------
# autograd integration: torch.compile, activation checkpointing
# ------------------------------------------------------------------------------------------------------------------
class TwoLayers(torch.nn.Module):
    """u → h = u + A(u) → h + B(h): two layers with residuals; B is MIMO R2 with the output norm (the per-rank
    path: one op call with mimo_o=None), A complex SISO."""

    def __init__(self, checkpointed: bool = False):
        super().__init__()
        torch.manual_seed(12)  # expand 1: one head each (the interpreter's time goes with B·L·H)
        self.a = randomize_(Mamba3(GRAD_CASES["siso_trap_complex"][0], GRAD_D_MODEL, expand=1))
        self.b = randomize_(Mamba3(small_spec(R=2, rotation="halved", chunk=4), GRAD_D_MODEL, expand=1,
                                   is_outproj_norm=True))
        self.checkpointed = checkpointed

    def forward(self, u):
        from torch.utils.checkpoint import checkpoint

        if self.checkpointed:
            h = u + checkpoint(self.a, u, use_reentrant=False)
            return h + checkpoint(self.b, h, use_reentrant=False)
        h = u + self.a(u)
        return h + self.b(h)


def run_and_grads(model, u: torch.Tensor) -> tuple:
    """(output, {name: gradient} of u and every parameter) of the loss Σ out² (a nonlinear loss: the backward's
    incoming gradient depends on the output)."""
    model.zero_grad(set_to_none=True)
    x = u.detach().clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    named = getattr(model, "_orig_mod", model).named_parameters()  # a compiled model's names have a prefix
    return out.detach(), {"u": x.grad, **{n: p.grad for n, p in named}}


@interpreter_only
def test_torch_compile_fullgraph_two_layers():
    """torch.compile(model, fullgraph=True) of two layers with residuals traces the layers' preprocessing, the
    forward op and its backward op (their fake implementations) with no graph break, and gives the eager output and
    gradients bit for bit. Backend aot_eager, as in tests/test_backward.py: it runs dynamo and AOTAutograd (what
    fullgraph tracing and the fake implementations are about) but no code generation, which on the CPU would add
    a C++ compile of a minute to a test of seconds; examples/train_lm.py --compile runs inductor on a GPU."""
    model = TwoLayers()
    u = torch.randn(1, 6, GRAD_D_MODEL, generator=torch.Generator().manual_seed(13))
    out, grads = run_and_grads(model, u)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out_c, grads_c = run_and_grads(compiled, u)
    assert torch.equal(out, out_c)
    assert grads.keys() == grads_c.keys() and len(grads) == 1 + len(list(model.parameters()))
    for name, g in grads.items():
        assert g is not None and torch.equal(g, grads_c[name]), name


@interpreter_only
def test_activation_checkpointing():
    """torch.utils.checkpoint(layer, u, use_reentrant=False) around each layer: the backward recomputes the layer's
    forward (the op saves only its inputs and reads them once), and the gradients are bit for bit the plain ones."""
    u = torch.randn(1, 6, GRAD_D_MODEL, generator=torch.Generator().manual_seed(14))
    out, grads = run_and_grads(TwoLayers(), u)
    out_c, grads_c = run_and_grads(TwoLayers(checkpointed=True), u)
    assert torch.equal(out, out_c)
    for name, g in grads.items():
        assert g is not None and torch.equal(g, grads_c[name]), name


# ------------------------------------------------------------------------------------------------------------------
# training: examples/train_lm.py's model on the CPU
# ------------------------------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def train_lm_module():
    """examples/train_lm.py imported as a module (examples/ is not a package)."""
    import importlib.util

    if "train_lm_example" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_lm_example", REPO / "examples" / "train_lm.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_lm_example"] = module
        spec.loader.exec_module(module)
    return sys.modules["train_lm_example"]


@interpreter_only
def test_tiny_language_model_trains():
    """examples/train_lm.py's TinyLM (embedding, 2 × [RMSNorm, Mamba3 (complex trapezoid SISO), residual, RMSNorm,
    MLP, residual], head) learns the previous-token task with Adam: 20 steps on fresh seeded batches take the loss
    from ≈ ln 4 (chance) to about a third of it. Only the Mamba3 layers carry anything along the sequence (each
    position sees its own token otherwise), so the fall needs their gradients. Sizes are what the interpreter runs at
    a few seconds per step: vocab 4, d_model 8, one head per layer, 2 sequences of 8 tokens; Δ starts in [0.05,
    0.5] (dt_min/dt_max) so that the previous token reaches the state from the first step. The float64 reference
    layer in the same loop gives the same curve (to 2 decimals); the bound leaves room for fp32 drift."""
    lm = train_lm_module()
    torch.manual_seed(0)
    model = lm.TinyLM(small_spec(chunk=8), vocab=4, d_model=8, layers=2, expand=1, dt_min=0.05, dt_max=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    data = torch.Generator().manual_seed(100)
    losses = []
    for _ in range(20):
        tokens, targets = lm.synthetic_batch("prev", 2, 8, 4, data)
        loss = lm.lm_loss(model, tokens, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert abs(first - math.log(4)) < 0.3, losses  # starts at chance
    assert last < 0.6 * first, [round(x, 3) for x in losses]


@interpreter_only
def test_train_lm_script_cpu_path(capsys):
    """The script's own path on the CPU (interpreter): a shipped spec shrunk by --tiny and made fp32, the
    single-process gradient check (whole batch vs the mean of its halves: the same sum, so equal to fp32 rounding),
    two training steps and the summary line."""
    lm = train_lm_module()
    rc = lm.main(["--spec", str(SPECS_DIR / "siso_euler_real.yaml"), "--device", "cpu", "--tiny", "--expand", "1",
                  "--steps", "2", "--log-every", "1", "--check-grads"])
    out = capsys.readouterr().out
    assert rc == 0, out
    check = re.search(r"grad check \(fp32, two half batches.*max relative difference (\S+) .*: PASS", out)
    assert check and float(check.group(1)) < 1e-5, out
    summary = re.search(r"^summary: spec=siso_euler_real steps=2 world=1 amp=none first_loss=(\S+) last_loss=(\S+)",
                        out, re.M)
    assert summary and all(math.isfinite(float(x)) for x in summary.groups()), out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is missing")
def test_train_lm_script_needs_cuda(capsys):
    """Without CUDA the default (--device cuda) stops with status 2 and says what to do."""
    lm = train_lm_module()
    with pytest.raises(SystemExit) as exit_info:
        lm.main(["--spec", str(SPECS_DIR / "mimo_r4.yaml"), "--steps", "1"])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err
