"""Chunked (SSD-style) float64 reference: the algorithm of docs/mamba3-math.md §5, generalised to any rule.

It shares no recurrence code with `naive.py` and computes things the other way round: Θ by a cumulative sum
over the whole sequence, the rotation through complex multiplication, and the state only once per chunk. It is
also written differently from the kernels: each chunk takes a key window that reaches J tokens back (into the
previous chunk, or the initial states) and weighs every (output t, key s) pair directly by the rule's definition

    W(t, s) = Σ_{j: c0 ≤ s+j ≤ t} c_j(s+j) · exp(Σ_{r=s+j+1..t} a_r)          (s ∈ [c0 − J, c0 + n))

(terms with s + j < c0 were applied before the chunk, they are in H_in). With rows flattened as (time i, rank r):

    Y_{t,r}  = exp(Σ_{r'=c0..t} a_r')·q̂_{t,r}·H_in + Σ_s W(t, s) Σ_{r'} (q̂_{t,r}·k̂_{s,r'}) v_{s,r'} + D·v_{t,r}
    H_out    = exp(Σ_{chunk} a)·H_in + Σ_s W(end, s) Σ_r v_{s,r} k̂_{s,r}ᵀ

with v_{t,r} = v_t ⊙ mimo_v_r, q̂/k̂ biased + rotated by Θ_t. Output gating as in §4.
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
    Cs, J = spec.dims.chunk_size, c.J
    dt = c.dt.transpose(1, 2)  # (B, L, H)
    a = c.a.transpose(1, 2)
    w = [x.transpose(1, 2) for x in c.weights]  # c_j(t), (B, L, H)

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
    v_raw = c.v  # (B, L, H, P)
    if J:  # the J tokens before the sequence (initial states, most recent last) lead the key window
        k_hat = torch.cat([c.init_k.flip(1), k_hat], dim=1)  # (B, J + L, R, H, N)
        v_raw = torch.cat([c.init_v.flip(1), v_raw], dim=1)  # (B, J + L, H, P)
    mv = c.mimo_v.permute(1, 0, 2)  # (R, H, P)
    # decay between positions: seg(t, u) = Σ_{r=u+1..t} a_r for u ≤ t, from a prefix sum over the sequence
    cs = torch.cat([torch.zeros_like(a[:, :1]), torch.cumsum(a, dim=1)], dim=1)  # cs[i] = Σ_{r<i} a_r, (B, L+1, H)

    def decay(t, u):  # exp(Σ_{r=u+1..t} a_r), broadcast over index tensors t, u (token positions ≥ -1)
        return torch.exp(cs[:, t + 1] - cs[:, u + 1])

    Hs = c.init_ssm.clone()  # (B, H, P, N)
    out = torch.zeros((B, L) + ((c.R,) if c.per_rank else ()) + (H, P), dtype=torch.float64)
    for c0 in range(0, L, Cs):
        n = min(Cs, L - c0)
        ts = torch.arange(c0, c0 + n)
        ss = torch.arange(c0 - J, c0 + n)  # key window (positions < 0 are initial-state tokens)
        W = torch.zeros(B, n, len(ss), H, dtype=torch.float64)
        for j in range(J + 1):
            for si, s_pos in enumerate(ss.tolist()):
                u = s_pos + j  # the step that applies lag j of token s
                if u < c0 or u >= c0 + n:
                    continue
                applies = ts >= u  # outputs at or after that step
                wt = w[j][:, u][:, None, :] * decay(ts[applies], torch.full((int(applies.sum()),), u))
                W[:, applies, si] += wt
        qh = q_hat[:, ts]  # (B, n, R, H, N)
        kw = k_hat[:, ss + J]  # (B, n + J, R, H, N)
        vw = v_raw[:, ss + J][:, :, None] * mv  # (B, n + J, R, H, P)
        into = decay(ts, torch.full_like(ts, c0 - 1))  # (B, n, H): decay from the chunk start
        y = into[:, :, None, :, None] * torch.einsum("bhpn,birhn->birhp", Hs, qh)
        scores = torch.einsum("birhn,bjshn->birjsh", qh, kw) * W[:, :, None, :, None, :]
        y = y + torch.einsum("birjsh,bjshp->birhp", scores, vw)
        if c.D is not None:
            y = y + c.D[:, None] * (c.v[:, ts][:, :, None] * mv)
        if c.z is not None:
            y = y * F.silu(c.z[:, ts, None] * c.mimo_z.permute(1, 0, 2))
        out[:, ts] = y if c.per_rank else (y * c.mimo_o.permute(1, 0, 2)).sum(dim=2)
        Hs = into[:, -1][..., None, None] * Hs + torch.einsum("bjh,bjshp,bjshn->bhpn", W[:, -1], vw, kw)

    if theta is None:
        angle = None
    else:
        angle = theta[:, -1] if L > 0 else c.init_angle
    if J:  # the last J positions of the window, most recent first: (B, J, R, H, N), (B, J, H, P)
        k_fin = k_hat[:, -J:].flip(1)
        v_fin = v_raw[:, -J:].flip(1)
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
