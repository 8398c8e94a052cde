"""Chunked (SSD-style) float64 reference: the algorithm of docs/mamba3-math.md §5, the one the kernels implement.

It shares no recurrence code with `naive.py` and computes things the other way round: Θ by a cumulative sum
over the whole sequence, the rotation through complex multiplication, the trapezoid as a per-token key scale
plus a same-step diagonal block, and the state only once per chunk. So the two are independent oracles.

Per (b, h), with a_t = A·Δ_t, γ_t = λ_tΔ_t, ĝ_t = Δ_{t+1}(1 − λ_{t+1}) (ĝ_{L-1} = 0; read across chunk
boundaries), scale_t = γ_t + ĝ_t, k^s_{t,r} = scale_t·k̂_{t,r}, rows flattened as (time i, rank r):

    cs_i       = Σ_{i' ≤ i in chunk} a_{i'}
    Y_{i,r}    = exp(cs_i)·H_in q̂_{i,r}                                              (state entering the chunk)
               + Σ_{j<i} exp(cs_i − cs_j) Σ_{r'} (q̂_{i,r}·k^s_{j,r'}) v_{j,r'}         (strictly causal, all rank pairs)
               + γ_i Σ_{r'} (q̃_{i,r}·k̃_{i,r'}) v_{i,r'} + D·v_{i,r}                    (same step: full R×R block)
    H_out      = exp(cs_last)·H_in + Σ_{j,r} exp(cs_last − cs_j) v_{j,r} k^s_{j,r}ᵀ
    H_in(0)    = H_init + Δ_0(1 − λ_0)·Σ_r v_init,r k̂_init,rᵀ      (the β term of token 0; α_0 comes from exp(cs_0))

with v_{t,r} = v_t ⊙ mimo_v_r, q̃/k̃ biased and q̂/k̂ biased + rotated by Θ_t. Output gating as in §4.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from mamba3_gen.runtime.state import Mamba3State
from mamba3_gen.spec.model import Spec

from .inputs import canonicalize, run_per_sequence

__all__ = ["chunked_reference"]


def _rotate_complex(spec: Spec, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, L, R, H, N) by Θ (B, L, H, S): each rotated pair (a, b) is the complex number a + ib,
    multiplied by e^{iΘ} (= (a cosΘ − b sinΘ) + i(a sinΘ + b cosΘ))."""
    S, N = spec.num_angles, spec.dims.d_state
    if S == 0:
        return x
    phase = torch.polar(torch.ones_like(theta), theta)[:, :, None]  # (B, L, 1, H, S)
    y = x.clone()
    if spec.state.rotation == "pairwise":  # pairs (2j, 2j+1), j < S
        zc = torch.view_as_complex(x[..., : 2 * S].reshape(*x.shape[:-1], S, 2).contiguous()) * phase
        y[..., : 2 * S] = torch.view_as_real(zc).reshape(*x.shape[:-1], 2 * S)
    else:  # halved: pairs (j, j + N/2), j < S
        h = N // 2
        zc = torch.complex(x[..., :S], x[..., h : h + S]) * phase
        y[..., :S] = zc.real
        y[..., h : h + S] = zc.imag
    return y


def _chunked_core(spec: Spec, c: SimpleNamespace):
    B, L, H, P = c.B, c.L, c.H, c.P
    Cs = spec.dims.chunk_size
    dt = c.dt.transpose(1, 2)  # (B, L, H)
    lam = c.lam.transpose(1, 2)
    adt = c.adt.transpose(1, 2)

    # Whole-sequence precomputation.
    if c.angles is not None:
        inc = dt[..., None] * math.pi * torch.tanh(c.angles)  # (B, L, H, S)
        theta = torch.remainder(c.init_angle[:, None] + torch.cumsum(inc, dim=1), 2 * math.pi)
    else:
        theta = None
    q_til = c.q + c.q_bias.permute(1, 0, 2)  # (B, L, R, H, N)
    k_til = c.k + c.k_bias.permute(1, 0, 2)
    if theta is not None:
        q_hat, k_hat = _rotate_complex(spec, q_til, theta), _rotate_complex(spec, k_til, theta)
    else:
        q_hat, k_hat = q_til, k_til
    gamma = dt * lam  # (B, L, H)
    g_shift = torch.zeros_like(gamma)
    g_shift[:, :-1] = dt[:, 1:] * (1.0 - lam[:, 1:])  # ĝ_t: the next token's β/α; 0 at the sequence end
    k_s = (gamma + g_shift)[:, :, None, :, None] * k_hat  # trapezoid-scaled key
    # Same-step block: rotation-invariant, so computed with the unrotated (biased) q̃, k̃.
    diag = gamma[:, :, None, None, :] * torch.einsum("blrhn,blshn->blrsh", q_til, k_til)  # (B, L, R, R', H)
    mv = c.mimo_v.permute(1, 0, 2)  # (R, H, P)
    v_r = c.v[:, :, None] * mv  # (B, L, R, H, P)

    Hs = c.init_ssm.clone()  # (B, H, P, N)
    if c.init_k is not None and L > 0:
        g_m1 = dt[:, 0] * (1.0 - lam[:, 0])  # ĝ_{-1} = Δ_0(1 − λ_0)
        v_init_r = c.init_v[:, None] * mv  # (B, R, H, P)
        Hs = Hs + g_m1[..., None, None] * torch.einsum("brhp,brhn->bhpn", v_init_r, c.init_k)

    out = torch.zeros(B, L, H, P, dtype=torch.float64)
    for c0 in range(0, L, Cs):
        sl = slice(c0, min(c0 + Cs, L))
        n = sl.stop - sl.start
        cs = torch.cumsum(adt[:, sl], dim=1)  # (B, n, H), inclusive in-chunk cumsum
        qh, ks, vr = q_hat[:, sl], k_s[:, sl], v_r[:, sl]
        # inter-chunk
        y = torch.exp(cs)[:, :, None, :, None] * torch.einsum("bhpn,birhn->birhp", Hs, qh)
        # intra-chunk, strictly causal
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=-1)[None, :, :, None]
        seg = (cs[:, :, None, :] - cs[:, None, :, :]).masked_fill(~causal, float("-inf"))
        decay = torch.exp(seg)  # (B, i, j, H), 0 where i <= j
        scores = torch.einsum("birhn,bjshn->birjsh", qh, ks) * decay[:, :, None, :, None, :]
        y = y + torch.einsum("birjsh,bjshp->birhp", scores, vr)
        # same step
        y = y + torch.einsum("birsh,bishp->birhp", diag[:, sl], vr)
        if c.D is not None:
            y = y + c.D[:, None] * vr
        if c.z is not None:
            y = y * F.silu(c.z[:, sl, None] * c.mimo_z.permute(1, 0, 2))
        out[:, sl] = (y * c.mimo_o.permute(1, 0, 2)).sum(dim=2)
        # state passing
        to_end = torch.exp(cs[:, -1:] - cs)  # (B, n, H)
        Hs = torch.exp(cs[:, -1])[..., None, None] * Hs + torch.einsum("bjh,bjshp,bjshn->bhpn", to_end, vr, ks)

    if theta is None:
        angle = None
    else:
        angle = theta[:, -1] if L > 0 else c.init_angle
    if spec.carries_prev_token:
        k_fin = k_hat[:, -1] if L > 0 else c.init_k  # (B, R, H, N)
        v_fin = c.v[:, -1] if L > 0 else c.init_v
    else:
        k_fin = v_fin = None
    return out, angle, Hs, k_fin, v_fin


def chunked_reference(
    spec: Spec,
    q, k, v, adt, dt, trap=None, q_bias=None, k_bias=None, angles=None, D=None, z=None,
    mimo_v=None, mimo_z=None, mimo_o=None, initial_states=None, cu_seqlens=None,
) -> tuple[torch.Tensor, Mamba3State]:
    """The §5 chunked algorithm in float64 with chunk size spec.dims.chunk_size (chunks restart at every sequence
    start in varlen mode). Same arguments and results as `naive_recurrence`."""
    c = canonicalize(
        spec, q, k, v, adt, dt, trap=trap, q_bias=q_bias, k_bias=k_bias, angles=angles, D=D, z=z,
        mimo_v=mimo_v, mimo_z=mimo_z, mimo_o=mimo_o, initial_states=initial_states, cu_seqlens=cu_seqlens,
    )
    return run_per_sequence(spec, c, _chunked_core)
