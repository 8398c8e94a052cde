"""Test cases shared by the reference tests and the kernel tests: a compact spec builder, the official golden
vectors (loading and comparison), an independent Mamba-2 SSD formula, and time/sequence slicing of inputs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mamba3_gen.reference import rel_err, to_float64
from mamba3_gen.reference.inputs import TIME_DIM
from mamba3_gen.runtime.state import Mamba3State
from mamba3_gen.spec.model import Discretization, Spec

GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
GOLDEN_TOL = 1e-5  # float32 golden data (~1e-7 relative rounding observed); see tests/test_reference.py


def make_spec(rule="exp_trapezoidal", lam="data", lam_value=None, kind="complex", rope=0.5, rotation="pairwise",
              N=16, P=8, R=1, G=1, chunk=16, d_skip=True, z_gate=True, init=False, varlen=False,
              weights=None, log_decay=None) -> Spec:
    """A test spec named "ref_test". rule: a preset, or "custom" with `weights` (and optionally `log_decay`)
    formulas; the λ settings are written only when the rule's formulas use lam."""
    disc = {"rule": rule}
    if weights is not None:
        disc["weights"] = list(weights)
    if log_decay is not None:
        disc["log_decay"] = log_decay
    if Discretization.model_validate(disc).resolved_rule().uses_lambda:
        disc["lambda"] = lam
        if lam == "constant":
            disc["lambda_value"] = lam_value
    return Spec.model_validate({
        "name": "ref_test",
        "discretization": disc,
        "state": {"kind": kind, "rope_fraction": rope, "rotation": rotation},
        "dims": {"d_state": N, "headdim": P, "mimo_rank": R, "ngroups": G, "chunk_size": chunk},
        "options": {"d_skip": d_skip, "z_gate": z_gate, "initial_states": init, "varlen": varlen},
    })


def angle_diff(a, b):
    d = torch.remainder(a.double() - b.double() + math.pi, 2 * math.pi) - math.pi
    return d.abs().max().item() if d.numel() else 0.0


_TIME_DIM = TIME_DIM  # the token axis of each per-token input


def time_slice(kw: dict, start: int, end: int) -> dict:
    return {key: (val.narrow(_TIME_DIM[key], start, end - start) if key in _TIME_DIM else val)
            for key, val in kw.items()}


def state_slice(s: Mamba3State | None, i: int) -> Mamba3State | None:
    if s is None:
        return None
    return Mamba3State(*[None if x is None else x[i:i + 1] for x in s])


def pack_batch(kw: dict) -> dict:
    """Repack a (B, L) batch as one varlen sequence (B = 1, cu_seqlens), keeping the per-row initial states."""
    B, L = kw["v"].shape[:2]
    packed = {}
    for key, val in kw.items():
        if key in _TIME_DIM:
            d = _TIME_DIM[key]
            packed[key] = torch.cat([val.narrow(0, b, 1) for b in range(B)], dim=d)
        else:
            packed[key] = val
    packed["cu_seqlens"] = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=kw["v"].device)
    return packed


GOLDEN = {
    "siso_zero": dict(rotation="pairwise", rope=0.5, N=16, P=8, R=1, G=2, chunk=16),
    "siso_init": dict(rotation="pairwise", rope=0.5, N=16, P=8, R=1, G=2, chunk=16, init=True),
    "mimo_r4_div4": dict(rotation="halved", rope=0.5, N=32, P=16, R=4, G=1, chunk=8),
    "mimo_r4_div2": dict(rotation="halved", rope=1.0, N=32, P=16, R=4, G=1, chunk=8),
}



def golden_case(name: str, dtype: torch.dtype):
    """(spec, keyword arguments, raw arrays) of one golden file; skips the test if the file is absent."""
    path = GOLDEN_DIR / f"{name}.npz"
    if not path.exists():
        pytest.skip(f"golden file {path} is absent (expected the shared/ folder beside the repo)")
    g = {key: torch.from_numpy(np.asarray(val)).to(dtype) for key, val in np.load(path).items()}
    spec = make_spec(**GOLDEN[name])
    init = None
    if "Init_SSM" in g:
        init = Mamba3State(g["Init_Angle"], g["Init_SSM"], g["Init_K"], g["Init_V"])
    kw = dict(q=g["Q"], k=g["K"], v=g["V"], adt=g["ADT"], dt=g["DT"], trap=g["Trap"], q_bias=g["Q_bias"],
              k_bias=g["K_bias"], angles=g["Angles"], D=g["D"], z=g["Z"], initial_states=init)
    if spec.dims.mimo_rank > 1:
        kw.update(mimo_v=g["MIMO_V"], mimo_z=g["MIMO_Z"], mimo_o=g["MIMO_Out"])
    return spec, kw, g


def golden_errors(spec: Spec, out, state: Mamba3State, g: dict) -> dict:
    """Relative error of the output and of every final state the golden file holds."""
    errs = {"Out": rel_err(out, g["Out"])}
    if spec.dims.mimo_rank > 1:
        errs["Final_SSM"] = rel_err(state.ssm.transpose(-1, -2), g["Final_SSM"])  # golden MIMO H is (B, H, N, P)
        errs["Final_K"] = rel_err(state.k, g["Final_K"])  # (B, R, H, N), our layout for R > 1
    else:
        errs["Final_SSM"] = rel_err(state.ssm, g["Final_SSM"])
        errs["Final_K"] = rel_err(state.k, g["Final_K"])
        errs["Final_V"] = rel_err(state.v, g["Final_V"])
        errs["Final_Angle"] = angle_diff(state.angle, g["Final_Angle"]) / g["Final_Angle"].abs().max().item()
    return errs


def ssd_head(kw, H, G, init_ssm):
    """Quadratic ("attention") form of SSD, written independently of both references:
    y_t = Σ_{s≤t} exp(Σ_{r=s+1..t} a_r)·Δ_s·(q̃_t·k̃_s)·v_s + exp(Σ_{r≤t} a_r)·H_init q̃_t + D v_t, then ⊙ silu(z);
    H_final = Σ_s exp(Σ_{r=s+1..L-1} a_r)·Δ_s·v_s k̃_sᵀ + exp(Σ_r a_r)·H_init."""
    kw = to_float64(kw)
    heads = torch.arange(H) // (H // G)
    q = kw["q"][:, :, heads] + kw["q_bias"]  # (B, L, H, N)
    k = kw["k"][:, :, heads] + kw["k_bias"]
    v = kw["v"]
    a, dt = kw["adt"], kw["dt"]  # (B, H, L)
    cum = torch.cumsum(a, dim=-1)
    L = v.shape[1]
    seg = cum[..., :, None] - cum[..., None, :]  # (B, H, t, s): Σ_{r=s+1..t} a_r
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    W = torch.exp(seg.masked_fill(~causal, float("-inf"))) * dt[..., None, :]  # (B, H, t, s)
    scores = torch.einsum("bthn,bshn->bhts", q, k) * W
    y = torch.einsum("bhts,bshp->bthp", scores, v)
    y = y + torch.exp(cum).transpose(1, 2)[..., None] * torch.einsum("bhpn,bthn->bthp", init_ssm, q)
    y = y + kw["D"][:, None] * v
    y = y * F.silu(kw["z"])
    w_end = torch.exp(cum[..., -1:] - cum) * dt  # (B, H, s)
    H_fin = torch.einsum("bhs,bshp,bshn->bhpn", w_end, v, k) + torch.exp(cum[..., -1])[..., None, None] * init_ssm
    return y, H_fin
