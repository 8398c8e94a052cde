"""Sequential float64 reference: the per-token recurrence of docs/mamba3-math.md §2 (SISO) and §4 (MIMO).

SISO is MIMO with R = 1 and mimo_v = mimo_z = mimo_o = 1, so one loop covers both. Everything is vectorised over
batch and heads; the loop runs over time. Per (b, h), with state (Θ, H ∈ R^{P×N}, k̂_prev ∈ R^{R×N}, v_prev ∈ R^P):

    Θ_t     = (Θ_{t-1} + Δ_t·π·tanh(angles_t)) mod 2π
    q̂_{t,r} = Rot(Θ_t)(q_{t,r} + q_bias_r),   k̂_{t,r} = Rot(Θ_t)(k_{t,r} + k_bias_r)
    α_t = exp(A·Δ_t),  β_t = (1 − λ_t)·Δ_t·α_t,  γ_t = λ_t·Δ_t
    H_t     = α_t H_{t-1} + β_t Σ_r (v_prev ⊙ mimo_v_r) k̂_prev,rᵀ + γ_t Σ_r (v_t ⊙ mimo_v_r) k̂_{t,r}ᵀ
    y_{t,r} = H_t q̂_{t,r} + D·(v_t ⊙ mimo_v_r)
    out_t   = Σ_r y_{t,r} ⊙ silu(z_t ⊙ mimo_z_r) ⊙ mimo_o_r        (no silu factor without z)
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
    trap_rule = spec.carries_prev_token
    if trap_rule:
        k_prev = c.init_k.permute(0, 2, 1, 3).clone()  # (B, H, R, N): biased, rotated
        v_prev = c.init_v.clone()  # (B, H, P): raw
    out = torch.zeros(B, L, H, P, dtype=torch.float64)
    mv, mz, mo = c.mimo_v, c.mimo_z, c.mimo_o  # (H, R, P)

    for t in range(L):
        q_t = c.q[:, t].permute(0, 2, 1, 3) + c.q_bias  # (B, H, R, N), bias before rotation
        k_t = c.k[:, t].permute(0, 2, 1, 3) + c.k_bias
        if theta is not None:
            omega = math.pi * torch.tanh(c.angles[:, t])  # (B, H, S)
            theta = torch.remainder(theta + c.dt[:, :, t, None] * omega, 2 * math.pi)
            q_t = _rotate(q_t, theta[:, :, None, :], first, second)
            k_t = _rotate(k_t, theta[:, :, None, :], first, second)
        lam, dt = c.lam[:, :, t], c.dt[:, :, t]  # (B, H)
        alpha = torch.exp(c.adt[:, :, t])
        beta = (1.0 - lam) * dt * alpha
        gamma = lam * dt
        v_t = c.v[:, t]  # (B, H, P)
        vr_t = v_t[:, :, None, :] * mv  # (B, H, R, P)
        Hs = alpha[..., None, None] * Hs + gamma[..., None, None] * torch.einsum("bhrp,bhrn->bhpn", vr_t, k_t)
        if trap_rule:
            vr_prev = v_prev[:, :, None, :] * mv
            Hs = Hs + beta[..., None, None] * torch.einsum("bhrp,bhrn->bhpn", vr_prev, k_prev)
            k_prev, v_prev = k_t, v_t
        y = torch.einsum("bhpn,bhrn->bhrp", Hs, q_t)  # (B, H, R, P)
        if c.D is not None:
            y = y + c.D[:, None, None] * vr_t
        if c.z is not None:
            y = y * F.silu(c.z[:, t][:, :, None, :] * mz)
        out[:, t] = (y * mo).sum(dim=2)

    if trap_rule:
        k_fin, v_fin = k_prev.permute(0, 2, 1, 3), v_prev  # (B, R, H, N), (B, H, P); the initial ones if L == 0
    else:
        k_fin = v_fin = None
    return out, theta, Hs, k_fin, v_fin


def naive_recurrence(
    spec: Spec,
    q, k, v, adt, dt, trap=None, q_bias=None, k_bias=None, angles=None, D=None, z=None,
    mimo_v=None, mimo_z=None, mimo_o=None, initial_states=None, cu_seqlens=None,
) -> tuple[torch.Tensor, Mamba3State]:
    """Per-token float64 recurrence (§2/§4). Returns out (B, L, H, P) and the final Mamba3State (float64, CPU):
    angle Θ_{L-1} mod 2π (None for a real state), ssm H_{L-1} (NS, H, P, N), k = k̂ of the last token
    ((NS, H, N) for R == 1, (NS, R, H, N) for R > 1) and v = its raw V (NS, H, P); k and v are None for exp_euler."""
    c = canonicalize(
        spec, q, k, v, adt, dt, trap=trap, q_bias=q_bias, k_bias=k_bias, angles=angles, D=D, z=z,
        mimo_v=mimo_v, mimo_z=mimo_z, mimo_o=mimo_o, initial_states=initial_states, cu_seqlens=cu_seqlens,
    )
    return run_per_sequence(spec, c, _naive_core)
