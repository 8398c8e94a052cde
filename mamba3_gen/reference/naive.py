"""Sequential float64 reference: the per-token recurrence of docs/mamba3-math.md §2 (SISO) and §4 (MIMO), with the
discretization of any rule (spec/rules.py): its log-decay a_t and lag weights c_j(t), evaluated from its formulas.

SISO is MIMO with R = 1 and mimo_v = mimo_z = mimo_o = 1, so one loop covers both. Everything is vectorised over
batch and heads; the loop runs over time. Per (b, h), with state (Θ, H ∈ R^{P×N}, and for j = 1..J the key
k̂_{t-j} ∈ R^{R×N} and raw value v_{t-j} ∈ R^P of the J previous tokens):

    Θ_t     = (Θ_{t-1} + Δ_t·π·tanh(angles_t)) mod 2π
    q̂_{t,r} = Rot(Θ_t)(q_{t,r} + q_bias_r),   k̂_{t,r} = Rot(Θ_t)(k_{t,r} + k_bias_r)
    H_t     = exp(a_t) H_{t-1} + Σ_{j=0..J} c_j(t) Σ_r (v_{t-j} ⊙ mimo_v_r) k̂_{t-j,r}ᵀ
    y_{t,r} = H_t q̂_{t,r} + D·(v_t ⊙ mimo_v_r)
    out_t   = Σ_r y_{t,r} ⊙ silu(z_t ⊙ mimo_z_r) ⊙ mimo_o_r        (no silu factor without z)

R > 1 with mimo_o None: out_t = (y_{t,r} ⊙ silu(z_t ⊙ mimo_z_r))_r per rank, (B, L, R, H, P) (the official MIMO_Out=None).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from mamba3_gen.runtime.state import Mamba3State
from mamba3_gen.spec.model import Spec

from .inputs import canonicalize, run_per_sequence

__all__ = ["naive_recurrence", "rotation_pairs"]


def rotation_pairs(spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Index vectors (first, second) of the S rotated pairs: (2j, 2j+1) pairwise, (j, j + N/2) halved."""
    S, N = spec.num_angles, spec.dims.d_state
    j = torch.arange(S)
    if spec.state.rotation == "pairwise":
        return 2 * j, 2 * j + 1
    return j, j + N // 2


def _rotate(x: torch.Tensor, theta: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(a, b) → (a cosΘ − b sinΘ, a sinΘ + b cosΘ) on the pairs (first[j], second[j]); x (..., N), theta (..., S)."""
    a, b = x[..., first], x[..., second]
    c, s = torch.cos(theta), torch.sin(theta)
    y = x.clone()
    y[..., first] = a * c - b * s
    y[..., second] = a * s + b * c
    return y


def _naive_core(spec: Spec, c: SimpleNamespace):
    B, L, H, P = c.B, c.L, c.H, c.P
    first, second = rotation_pairs(spec)
    theta = None if c.init_angle is None else c.init_angle.clone()  # (B, H, S)
    Hs = c.init_ssm.clone()  # (B, H, P, N)
    # previous tokens, most recent first: keys (B, H, R, N) biased + rotated, values (B, H, P) raw
    k_prev = [c.init_k[:, j].permute(0, 2, 1, 3) for j in range(c.J)]
    v_prev = [c.init_v[:, j] for j in range(c.J)]
    out = torch.zeros((B, L) + ((c.R,) if c.per_rank else ()) + (H, P), dtype=torch.float64)
    mv, mz, mo = c.mimo_v, c.mimo_z, c.mimo_o  # (H, R, P)

    for t in range(L):
        q_t = c.q[:, t].permute(0, 2, 1, 3) + c.q_bias  # (B, H, R, N), bias before rotation
        k_t = c.k[:, t].permute(0, 2, 1, 3) + c.k_bias
        if theta is not None:
            omega = math.pi * torch.tanh(c.angles[:, t])  # (B, H, S)
            theta = torch.remainder(theta + c.dt[:, :, t, None] * omega, 2 * math.pi)
            q_t = _rotate(q_t, theta[:, :, None, :], first, second)
            k_t = _rotate(k_t, theta[:, :, None, :], first, second)
        v_t = c.v[:, t]  # (B, H, P)
        vr_t = v_t[:, :, None, :] * mv  # (B, H, R, P)
        Hs = torch.exp(c.a[:, :, t])[..., None, None] * Hs
        for j, (k_j, v_j) in enumerate(zip([k_t] + k_prev, [v_t] + v_prev)):
            c_j = c.weights[j][:, :, t]  # (B, H)
            Hs = Hs + c_j[..., None, None] * torch.einsum("bhrp,bhrn->bhpn", v_j[:, :, None, :] * mv, k_j)
        if c.J:
            k_prev, v_prev = [k_t] + k_prev[:-1], [v_t] + v_prev[:-1]
        y = torch.einsum("bhpn,bhrn->bhrp", Hs, q_t)  # (B, H, R, P)
        if c.D is not None:
            y = y + c.D[:, None, None] * vr_t
        if c.z is not None:
            y = y * F.silu(c.z[:, t][:, :, None, :] * mz)
        out[:, t] = y.transpose(1, 2) if c.per_rank else (y * mo).sum(dim=2)

    if c.J:  # (B, J, R, H, N), (B, J, H, P); the initial ones when L < J
        k_fin = torch.stack([k.permute(0, 2, 1, 3) for k in k_prev], dim=1)
        v_fin = torch.stack(v_prev, dim=1)
    else:
        k_fin = v_fin = None
    return out, theta, Hs, k_fin, v_fin


def naive_recurrence(
    spec: Spec,
    q, k, v, adt, dt, trap=None, q_bias=None, k_bias=None, angles=None, D=None, z=None,
    mimo_v=None, mimo_z=None, mimo_o=None, initial_states=None, cu_seqlens=None,
) -> tuple[torch.Tensor, Mamba3State]:
    """Per-token float64 recurrence (§2/§4). Returns out (B, L, H, P) (R > 1 with mimo_o None: per rank,
    (B, L, R, H, P)) and the final Mamba3State (float64, CPU):
    angle Θ_{L-1} mod 2π (None for a real state), ssm H_{L-1} (NS, H, P, N), k = k̂ of the last J tokens and v their
    raw V, in the layout of runtime/state.py (None for a rule without lags)."""
    c = canonicalize(
        spec, q, k, v, adt, dt, trap=trap, q_bias=q_bias, k_bias=k_bias, angles=angles, D=D, z=z,
        mimo_v=mimo_v, mimo_z=mimo_z, mimo_o=mimo_o, initial_states=initial_states, cu_seqlens=cu_seqlens,
    )
    return run_per_sequence(spec, c, _naive_core)
