"""Random inputs in the common calling convention, and the argument plumbing shared by the two references.

The calling convention (the generated kernels take exactly the same keywords)::

    fn(spec, q, k, v, adt, dt, trap=None, q_bias=None, k_bias=None, angles=None, D=None, z=None,
       mimo_v=None, mimo_z=None, mimo_o=None, initial_states=None, cu_seqlens=None) -> (out, Mamba3State)

`canonicalize` turns such a call into one uniform float64 layout (rank axis always present, K/Q broadcast from
groups to heads, missing biases as zeros, missing MIMO projections as ones, λ resolved from the spec, missing
initial states as zeros). It does no recurrence math: the naive and the chunked references each do their own.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import torch

from mamba3_gen.lower.evaluate import evaluate
from mamba3_gen.runtime.state import Mamba3State
from mamba3_gen.spec.model import Spec

F64 = torch.float64

__all__ = ["make_inputs", "to_float64", "canonicalize", "run_per_sequence", "TIME_DIM", "token_inputs"]

# The token (L) axis of each per-token input of the calling convention; the others are per layer or per sequence.
TIME_DIM = {"q": 1, "k": 1, "v": 1, "z": 1, "angles": 1, "adt": 2, "dt": 2, "trap": 2}


def token_inputs(kw: dict, t: int) -> dict:
    """The inputs of token t of a (B, L) batch of forward inputs: one decode step's arguments (views)."""
    return {key: (val.select(TIME_DIM[key], t) if key in TIME_DIM else val) for key, val in kw.items()
            if key not in ("initial_states", "cu_seqlens")}


# ----------------------------------------------------------------------------------------------------------------
# Random inputs
# ----------------------------------------------------------------------------------------------------------------
def _rms_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def make_inputs(
    spec: Spec,
    B: int,
    L: int,
    H: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    nseq_lengths: Optional[Sequence[int]] = None,
    with_initial_states: bool = False,
    dt_range: tuple[float, float] = (1e-3, 1e-1),
    a_range: tuple[float, float] = (-16.0, -1.0),
    adt_range: Optional[tuple[float, float]] = None,
    lam_logit_range: tuple[float, float] = (-8.0, 8.0),
    angle_scale: float = 1.0,
) -> dict:
    """Keyword arguments for the calling convention, drawn from a seeded CPU generator, then moved to `device`.

    - q, k: RMS-normalised randn, (B, L, G, N) for R == 1 or (B, L, R, G, N) for R > 1. v, z: randn (B, L, H, P).
    - dt = Δ: log-uniform in `dt_range`, (B, H, L). adt = A·Δ with A ~ U(a_range) per (b, h, t) (A < 0, data
      dependent as in the layer); if `adt_range` is given, A·Δ is drawn uniformly from it instead (e.g. (-20, 0)).
    - trap: pre-sigmoid logits ~ U(lam_logit_range), (B, H, L); the default (-8, 8) makes λ = σ(trap) cover
      [3e-4, 1 - 3e-4]. Only when spec.has_trap_input. Both are encoded as spec.inputs says: with decay 'a' the
      adt entry holds A (= A·Δ / Δ), with trap 'lambda' the trap entry holds λ = σ(logit).
    - q_bias, k_bias: randn (H, N) / (H, R, N). angles: angle_scale·randn (B, L, H, S), complex state only.
    - D: randn (H,) if spec.options.d_skip; z if spec.options.z_gate.
    - mimo_v, mimo_o: 1 + 0.5·randn (H, R, P) (mimo_o divided by R), mimo_z likewise when z is present; R > 1 only.
    - Varlen: `nseq_lengths` = list of sequence lengths; then B must be 1, the `L` argument is ignored (the total
      length is their sum), and `cu_seqlens` (int32, (NS + 1,)) is returned.
    - `with_initial_states`: a random Mamba3State in the layout of runtime/state.py (angle ~ U[0, 2π), ssm, k, v
      randn; fields a spec does not carry are None). States are float64 when dtype is float64, else float32.
    """
    d = spec.dims
    N, P, R, G = d.d_state, d.headdim, d.mimo_rank, d.ngroups
    S = spec.num_angles
    if H % G:
        raise ValueError(f"H={H} is not a multiple of ngroups G={G}")
    cu_seqlens = None
    NS = B
    if nseq_lengths is not None:
        if B != 1:
            raise ValueError("varlen inputs (nseq_lengths) need B == 1")
        lengths = [int(x) for x in nseq_lengths]
        if any(x < 0 for x in lengths) or not lengths:
            raise ValueError(f"bad sequence lengths {lengths}")
        L = sum(lengths)
        NS = len(lengths)
        cu = [0]
        for x in lengths:
            cu.append(cu[-1] + x)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32)

    gen = torch.Generator().manual_seed(int(seed))

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=F64)

    qk_shape = (B, L, G, N) if R == 1 else (B, L, R, G, N)
    bias_shape = (H, N) if R == 1 else (H, R, N)
    out: dict = {}
    out["q"] = _rms_norm(randn(*qk_shape))
    out["k"] = _rms_norm(randn(*qk_shape))
    out["v"] = randn(B, L, H, P)
    lo, hi = math.log(dt_range[0]), math.log(dt_range[1])
    dt = torch.exp(uniform(lo, hi, B, H, L))
    if adt_range is not None:
        adt = uniform(adt_range[0], adt_range[1], B, H, L)
    else:
        A = uniform(a_range[0], a_range[1], B, H, L)
        adt = A * dt
    adt = adt.clamp(max=0.0)
    out["adt"] = adt / dt if spec.inputs.decay == "a" else adt  # encoded as the spec's inputs section says
    out["dt"] = dt
    if spec.has_trap_input:
        trap = uniform(lam_logit_range[0], lam_logit_range[1], B, H, L)
        out["trap"] = torch.sigmoid(trap) if spec.inputs.trap == "lambda" else trap
    out["q_bias"] = randn(*bias_shape)
    out["k_bias"] = randn(*bias_shape)
    if spec.is_complex:
        out["angles"] = angle_scale * randn(B, L, H, S)
    if spec.options.d_skip:
        out["D"] = randn(H)
    if spec.options.z_gate:
        out["z"] = randn(B, L, H, P)
    if R > 1:
        out["mimo_v"] = 1.0 + 0.5 * randn(H, R, P)
        if spec.options.z_gate:
            out["mimo_z"] = 1.0 + 0.5 * randn(H, R, P)
        out["mimo_o"] = (1.0 + 0.5 * randn(H, R, P)) / R

    out = {key: val.to(dtype=dtype, device=device) for key, val in out.items()}

    if with_initial_states:
        sdt = F64 if dtype == F64 else torch.float32
        angle = uniform(0.0, 2 * math.pi, NS, H, S) if spec.is_complex else None
        ssm = randn(NS, H, P, N)
        if spec.lags:
            shapes = state_shapes(spec, NS, H)
            kst, vst = randn(*shapes["k"]), randn(*shapes["v"])
        else:
            kst = vst = None
        out["initial_states"] = Mamba3State(
            *[None if x is None else x.to(dtype=sdt, device=device) for x in (angle, ssm, kst, vst)]
        )
    if cu_seqlens is not None:
        out["cu_seqlens"] = cu_seqlens.to(device)
    return out


def to_float64(d: dict) -> dict:
    """A copy of an input dict with every floating tensor (also inside a Mamba3State) as float64 on the CPU."""

    def cast(x):
        if x is None:
            return None
        if isinstance(x, Mamba3State):
            return Mamba3State(*[cast(f) for f in x])
        if isinstance(x, torch.Tensor):
            return x.detach().to("cpu", F64) if x.is_floating_point() else x.detach().cpu()
        return x

    return {key: cast(val) for key, val in d.items()}


# ----------------------------------------------------------------------------------------------------------------
# Argument plumbing shared by the references (no recurrence math here)
# ----------------------------------------------------------------------------------------------------------------
def _f64(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # float64 on the default device: the CPU, unless a GPU run sets torch.set_default_device("cuda") for speed.
    # Not detached: autograd through the references gives the float64 gradients the backward is tested against
    # (a cast is differentiable; a tensor that needs no grad costs nothing more).
    return None if x is None else x.to(torch.get_default_device(), F64)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def canonicalize(
    spec: Spec,
    q, k, v, adt, dt, trap=None, q_bias=None, k_bias=None, angles=None, D=None, z=None,
    mimo_v=None, mimo_z=None, mimo_o=None, initial_states=None, cu_seqlens=None,
) -> SimpleNamespace:
    """Float64 tensors (on the default device) in one layout:

    q, k (B, L, R, H, N) per head (unbiased, unrotated); q_bias, k_bias (H, R, N); v (B, L, H, P);
    z (B, L, H, P) or None; D (H,) or None; mimo_v, mimo_z, mimo_o (H, R, P) (ones for R == 1, and for mimo_o None);
    per_rank: R > 1 and mimo_o None (out is y per rank, (B, L, R, H, P), the official MIMO_Out=None);
    adt, dt, lam (B, H, L); angles (B, L, H, S) or None (real state);
    init_angle (NS, H, S) or None, init_ssm (NS, H, P, N), init_k (NS, R, H, N), init_v (NS, H, P) (zeros when absent;
    k/v None for exp_euler); cu: None or a list of ints.
    """
    d = spec.dims
    N, P, R, G = d.d_state, d.headdim, d.mimo_rank, d.ngroups
    S = spec.num_angles
    q, k, v, adt, dt = map(_f64, (q, k, v, adt, dt))
    if spec.inputs.decay == "a":  # the decay input is A alone
        adt = adt * dt
    if R == 1:
        _check(q.dim() == 4 and k.dim() == 4, f"SISO q, k must be (B, L, G, N); got {tuple(q.shape)}, {tuple(k.shape)}")
        q, k = q.unsqueeze(2), k.unsqueeze(2)
    else:
        _check(q.dim() == 5 and k.dim() == 5, f"MIMO q, k must be (B, L, R, G, N); got {tuple(q.shape)}")
    B, L = q.shape[:2]
    _check(q.shape == (B, L, R, G, N) and k.shape == q.shape, f"q/k shape {tuple(q.shape)} != {(B, L, R, G, N)}")
    _check(v.dim() == 4 and v.shape[:2] == (B, L) and v.shape[3] == P, f"v must be (B, L, H, P={P}); got {tuple(v.shape)}")
    H = v.shape[2]
    _check(H % G == 0, f"H={H} is not a multiple of G={G}")
    head_group = torch.arange(H) // (H // G)  # group of head h: h // (H/G)
    q = q[:, :, :, head_group, :]
    k = k[:, :, :, head_group, :]
    _check(adt.shape == (B, H, L) and dt.shape == (B, H, L), "adt and dt must be (B, H, L)")

    def bias(x):
        if x is None:
            return torch.zeros(H, R, N, dtype=F64)
        x = _f64(x)
        if R == 1:
            _check(x.shape == (H, N), f"SISO bias must be (H, N); got {tuple(x.shape)}")
            return x.unsqueeze(1)
        _check(x.shape == (H, R, N), f"MIMO bias must be (H, R, N); got {tuple(x.shape)}")
        return x

    def proj(x, name, required):
        if R == 1:
            _check(x is None, f"{name} must be None for R == 1")
            return torch.ones(H, R, P, dtype=F64)
        if x is None:
            _check(not required, f"{name} (H, R, P) is required for R > 1")
            return torch.ones(H, R, P, dtype=F64)
        x = _f64(x)
        _check(x.shape == (H, R, P), f"{name} must be (H, R, P); got {tuple(x.shape)}")
        return x

    z = _f64(z)
    if z is not None:
        _check(z.shape == v.shape, "z must be (B, L, H, P)")
    D = _f64(D)
    if D is not None:
        _check(D.shape == (H,), "D must be (H,)")

    # λ: σ(trap) (data), a constant, or absent (the rule does not use it).
    rule = spec.discretization
    if not spec.rule.uses_lambda:
        lam = None
    elif rule.lambda_ == "constant":
        lam = torch.full((B, H, L), float(rule.lambda_value), dtype=F64)
    else:
        _check(trap is not None, "this spec reads trap (B, H, L): its rule uses a per-token λ")
        trap = _f64(trap)
        _check(trap.shape == (B, H, L), "trap must be (B, H, L)")
        lam = torch.sigmoid(trap) if spec.inputs.trap == "logit" else trap  # inputs.trap: logit or λ itself
    a, weights = rule_coefficients(spec.rule, dt, adt, lam)

    if spec.is_complex:
        _check(angles is not None, f"a complex state needs angles (B, L, H, S={S})")
        angles = _f64(angles)
        _check(angles.shape == (B, L, H, S), f"angles must be (B, L, H, S={S}); got {tuple(angles.shape)}")
    else:
        angles = None

    cu = None
    if cu_seqlens is not None:
        _check(B == 1, "varlen (cu_seqlens) needs B == 1")
        cu = [int(x) for x in torch.as_tensor(cu_seqlens).cpu().tolist()]
        _check(len(cu) >= 2 and cu[0] == 0 and cu[-1] == L and all(a <= b for a, b in zip(cu, cu[1:])),
               f"cu_seqlens must go from 0 to L={L}, non-decreasing; got {cu}")
    NS = B if cu is None else len(cu) - 1

    st = initial_states
    if st is not None and st.ssm is not None:
        init_ssm = _f64(st.ssm)
        _check(init_ssm.shape == (NS, H, P, N), f"initial ssm must be (NS, H, P, N); got {tuple(init_ssm.shape)}")
    else:
        init_ssm = torch.zeros(NS, H, P, N, dtype=F64)
    init_angle = None
    if spec.is_complex:
        if st is not None and st.angle is not None:
            init_angle = _f64(st.angle)
            _check(init_angle.shape == (NS, H, S), "initial angle must be (NS, H, S)")
        else:
            init_angle = torch.zeros(NS, H, S, dtype=F64)
    J = spec.lags
    init_k = init_v = None
    if J:
        # canonical: (NS, J, R, H, N) and (NS, J, H, P), lag index 0 = the token just before
        k_shape, v_shape = state_shapes(spec, NS, H)["k"], state_shapes(spec, NS, H)["v"]
        if st is not None and st.k is not None:
            init_k = _f64(st.k)
            _check(init_k.shape == k_shape, f"initial k must be {k_shape}; got {tuple(init_k.shape)}")
            init_k = init_k.reshape(NS, J, R, H, N)
        else:
            init_k = torch.zeros(NS, J, R, H, N, dtype=F64)
        if st is not None and st.v is not None:
            init_v = _f64(st.v)
            _check(init_v.shape == v_shape, f"initial v must be {v_shape}; got {tuple(init_v.shape)}")
            init_v = init_v.reshape(NS, J, H, P)
        else:
            init_v = torch.zeros(NS, J, H, P, dtype=F64)

    return SimpleNamespace(
        B=B, L=L, H=H, R=R, N=N, P=P, S=S,
        q=q, k=k, v=v, z=z, D=D, adt=adt, dt=dt, lam=lam, a=a, weights=weights, J=J, angles=angles,
        q_bias=bias(q_bias), k_bias=bias(k_bias),
        mimo_v=proj(mimo_v, "mimo_v", True),
        mimo_z=proj(mimo_z, "mimo_z", z is not None),
        mimo_o=proj(mimo_o, "mimo_o", False), per_rank=R > 1 and mimo_o is None,
        init_angle=init_angle, init_ssm=init_ssm, init_k=init_k, init_v=init_v, cu=cu,
    )


def _slice(c: SimpleNamespace, start: int, end: int, i: int) -> SimpleNamespace:
    """Sequence i of a varlen batch (B == 1): tokens [start, end) with initial state i."""
    t = slice(start, end)
    one = slice(i, i + 1)

    def opt(x, f):
        return None if x is None else f(x)

    return SimpleNamespace(
        **{**vars(c),
           "L": end - start,
           "q": c.q[:, t], "k": c.k[:, t], "v": c.v[:, t], "z": opt(c.z, lambda x: x[:, t]),
           "adt": c.adt[:, :, t], "dt": c.dt[:, :, t], "lam": opt(c.lam, lambda x: x[:, :, t]),
           "a": c.a[:, :, t], "weights": [w[:, :, t] for w in c.weights],
           "angles": opt(c.angles, lambda x: x[:, t]),
           "init_angle": opt(c.init_angle, lambda x: x[one]), "init_ssm": c.init_ssm[one],
           "init_k": opt(c.init_k, lambda x: x[one]), "init_v": opt(c.init_v, lambda x: x[one]),
           "cu": None}
    )


def run_per_sequence(spec: Spec, c: SimpleNamespace, core: Callable) -> tuple[torch.Tensor, Mamba3State]:
    """Apply `core(spec, c) -> (out (B,L,H,P) or per rank (B,L,R,H,P), angle, ssm, k (B,J,R,H,N), v (B,J,H,P))` to the whole batch, or in
    varlen mode to each sequence separately (B == 1); then pack the states in the runtime layout (state.py)."""
    if c.cu is None:
        out, angle, ssm, kst, vst = core(spec, c)
    else:
        parts = [core(spec, _slice(c, s, e, i)) for i, (s, e) in enumerate(zip(c.cu, c.cu[1:]))]
        out = torch.cat([p[0] for p in parts], dim=1)

        def cat(j):
            return None if parts[0][j] is None else torch.cat([p[j] for p in parts], dim=0)

        angle, ssm, kst, vst = cat(1), cat(2), cat(3), cat(4)
    if kst is not None:
        shapes = state_shapes(spec, kst.shape[0], c.H)
        kst, vst = kst.reshape(shapes["k"]), vst.reshape(shapes["v"])
    return out, Mamba3State(angle, ssm, kst, vst)


def rule_coefficients(rule, dt: torch.Tensor, adt: torch.Tensor, lam: Optional[torch.Tensor]):
    """(a, [c_0, …, c_J]) per token, float64, evaluated from the rule's own formulas (spec/rules.py). A removable
    singularity (e.g. ZOH at A·Δ = 0) is evaluated by its Taylor series near the point, with a radius and order chosen
    for float64 (lower/lowering.safe_formula with precision "fp64": closed form within 1e-12, series within 1e-14),
    not the ones the fp32 kernels use."""
    from mamba3_gen.lower.lowering import safe_formula

    values = {"dt": dt, "adt": adt, "lam": lam if lam is not None else torch.zeros_like(dt)}

    def ev(expr, where):
        return evaluate(safe_formula(expr, where, "fp64"), values, like=dt)

    weights = [ev(w, f"discretization.weights[{j}]") for j, w in enumerate(rule.weights)]
    return ev(rule.log_decay, "discretization.log_decay"), weights


def state_shapes(spec: Spec, NS: int, H: int) -> dict:
    """The runtime state layout's shapes (runtime/state.py) for a spec: {field: shape or None}."""
    from mamba3_gen.runtime.state import state_shape

    return {f: state_shape(f, NS=NS, H=H, N=spec.dims.d_state, P=spec.dims.headdim, R=spec.dims.mimo_rank,
                           S=spec.num_angles, J=spec.lags) for f in Mamba3State._fields}
