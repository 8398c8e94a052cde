"""Optional providers: the official kernels (Mamba-3 Triton SISO forward and step, Mamba-2 SSD, TileLang MIMO,
CuTe step), for side-by-side accuracy and timing.

Nothing of them is in this repository. A developer copies `mamba_ssm/` of state-spaces/mamba (at least
`ops/triton/`, `ops/tilelang/mamba3/`, `ops/cute/mamba3/` and `utils/`) into the git-ignored folder `.official/` (so
that `.official/mamba_ssm/ops/triton/mamba3/*.py` exists) and names `.official` in the device call's `carry`; an
installed `mamba_ssm` works too. Without either, the loaders return None and the benchmarks skip the official rows,
saying why. `provider(spec, mode)` is what `mamba3-gen bench` (mamba3_gen/bench.py) asks for: which official kernel
computes a spec, adapted to our calling convention, or the reason there is none.

The official wrapper takes our calling convention's tensors as they are (same names in capitals, same shapes for
SISO); it casts Q, K, V, Trap, Angles, Z to bf16 itself.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_DIR = ROOT / ".official"


def load(module: str, name: str):
    """(`name` from the official module `module`, None) or (None, why it cannot be imported here)."""
    if (OFFICIAL_DIR / "mamba_ssm").is_dir() and str(OFFICIAL_DIR) not in sys.path:
        sys.path.insert(0, str(OFFICIAL_DIR))
    try:
        return getattr(importlib.import_module(module), name), None
    except Exception as e:  # absent, or its dependencies are
        where = "" if (OFFICIAL_DIR / "mamba_ssm").is_dir() else " (no .official/mamba_ssm: carry .official)"
        return None, f"cannot import {module}.{name}{where}: {type(e).__name__}: {e}"[:300]


def _load(module: str, name: str, what: str):
    """`name` from the official `mamba_ssm.ops.triton.mamba3.<module>`, or None with the reason printed."""
    fn, why = load(f"mamba_ssm.ops.triton.mamba3.{module}", name)
    if fn is None:
        print(f"official {what} unavailable ({why}); skipping its rows", file=sys.stderr)
    return fn


def load_siso():
    """`mamba3_siso_combined`, or None with the reason printed."""
    return _load("mamba3_siso_combined", "mamba3_siso_combined", "SISO kernel")


def siso_forward(fn, kw: dict, chunk_size: int = 64, return_final_states: bool = False):
    """Run the official SISO forward on our keyword arguments (a trapezoidal, complex, pairwise SISO spec)."""
    st = kw.get("initial_states")
    init = None if st is None else (st.angle, st.ssm, st.k, st.v)
    return fn(kw["q"], kw["k"], kw["v"], kw["adt"], kw["dt"], kw["trap"], kw["q_bias"], kw["k_bias"], kw["angles"],
              D=kw.get("D"), Z=kw.get("z"), Input_States=init, chunk_size=chunk_size,
              return_final_states=return_final_states, cu_seqlens=kw.get("cu_seqlens"))


def load_siso_step():
    """The official Triton `mamba3_siso_step`, or None with the reason printed."""
    return _load("mamba3_siso_step", "mamba3_siso_step", "SISO step")


def siso_step_fn(fn, inputs: dict, state):
    """A no-argument callable running the official SISO step on one token's inputs (our names) and a state."""
    init = (state.angle, state.ssm, state.k, state.v)
    return lambda: fn(inputs["q"], inputs["k"], inputs["v"], inputs["adt"], inputs["dt"], inputs["trap"],
                      inputs["q_bias"], inputs["k_bias"], inputs["angles"], D=inputs.get("D"), Z=inputs.get("z"),
                      Input_States=init)


def mamba2_forward(fn, kw: dict, A, chunk_size: int = 256):
    """Mamba-2's `mamba_chunk_scan_combined` on our keyword arguments (an exp-Euler, real, SISO spec whose A is one
    value per head): x = v, B = k, C = q, dt (B, L, H) as a transposed view of ours, A (H,)."""
    return fn(kw["v"], kw["dt"].transpose(1, 2), A, kw["k"], kw["q"], chunk_size, D=kw.get("D"), z=kw.get("z"))


def mimo_forward(fn, kw: dict, spec):
    """The official TileLang `mamba3_mimo` on our keyword arguments (a trapezoidal, complex, halved-rotation MIMO
    spec)."""
    import torch

    # the TileLang kernel takes Trap in the compute dtype (bf16); ours is fp32 (a differentiable cast)
    return fn(kw["q"], kw["k"], kw["v"], kw["adt"], kw["dt"], kw["trap"].to(torch.bfloat16), kw["q_bias"], kw["k_bias"],
              kw["mimo_v"], kw.get("mimo_z"), kw["mimo_o"], kw["angles"], kw.get("D"), kw.get("z"),
              spec.dims.chunk_size, 4 if spec.state.rope_fraction == 0.5 else 2, torch.bfloat16)


def _trapezoid_complex(spec) -> bool:
    return (spec.discretization.rule == "exp_trapezoidal" and spec.discretization.lambda_ == "data"
            and spec.inputs.trap == "logit" and spec.inputs.decay == "a_dt" and spec.is_complex)


def provider(spec, mode: str, cute: bool = False):
    """The official kernel that computes `spec` in `mode` ("fwd", "bwd", "decode"), as a `make(inputs)` callable
    returning a no-argument run (mamba3_gen.bench.Provider's contract), or a string saying why there is none.

    - fwd/bwd: the Triton `mamba3_siso_combined` for trapezoidal complex pairwise SISO specs (the spec's chunk
      size); Mamba-2 `mamba_chunk_scan_combined` (chunk 256) for exp-Euler real SISO specs; TileLang `mamba3_mimo`
      for trapezoidal complex halved MIMO specs.
    - decode: the Triton `mamba3_siso_step` for trapezoidal complex pairwise SISO specs; with `cute`, the CuTe
      `mamba3_step_fn` (needs quack-kernels and nvidia-cutlass-dsl).
    """
    from mamba3_gen import bench

    R = spec.dims.mimo_rank
    rotation = getattr(spec.state, "rotation", None)
    if cute:
        if mode != "decode":
            return "decode only (the official CuTe kernel is the decode step)"
        if not (spec.discretization.rule == "exp_trapezoidal" and spec.is_complex):
            return "the official CuTe step computes the trapezoidal rule on a complex state only"
        if not spec.has_trap_input:
            return "the official CuTe step reads a per-token λ (trap); this spec has none"
        fn, why = load("mamba_ssm.ops.cute.mamba3.mamba3_step_fn", "mamba3_step_fn")
        if fn is None:
            return why
        rotary, why = load("mamba_ssm.ops.triton.mamba3.mamba3_mimo_rotary_step", "apply_rotary_qk_inference_fwd")
        if rotary is None:
            return why
        return lambda kw: cute_step_fn(fn, rotary, spec, kw)
    if mode == "decode":
        if not (_trapezoid_complex(spec) and R == 1 and rotation == "pairwise"):
            return ("the official Triton step computes trapezoidal complex pairwise SISO only"
                    + (" (MIMO decode is the official CuTe step's)" if R > 1 else ""))
        fn, why = load("mamba_ssm.ops.triton.mamba3.mamba3_siso_step", "mamba3_siso_step")
        if fn is None:
            return why

        def make_step(kw):
            from mamba3_gen.runtime.state import Mamba3State

            state = Mamba3State(*[None if t is None else t.clone() for t in kw["state"]])
            args = {k: v for k, v in kw.items() if k != "state"}
            run = siso_step_fn(fn, args, state)
            return lambda: run()[0]
        return make_step
    # prepare(kw) -> forward(args): the untimed part (A per head for Mamba-2) and the timed call
    if _trapezoid_complex(spec) and R == 1 and rotation == "pairwise":
        fn, why = load("mamba_ssm.ops.triton.mamba3.mamba3_siso_combined", "mamba3_siso_combined")
        if fn is None:
            return why
        prepare = lambda kw: lambda a: siso_forward(fn, a, chunk_size=spec.dims.chunk_size)  # noqa: E731
    elif bench.mamba2_compatible(spec):
        fn, why = load("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
        if fn is None:
            return why

        def prepare(kw):  # A per head, as build_inputs drew it: A·Δ / Δ at the first token
            A = (kw["adt"][0, :, 0] / kw["dt"][0, :, 0]).detach().float().contiguous()
            A.requires_grad_(mode == "bwd")
            return lambda a: mamba2_forward(fn, a, A)
    elif _trapezoid_complex(spec) and R > 1 and rotation == "halved":
        fn, why = load("mamba_ssm.ops.tilelang.mamba3.mamba3_mimo", "mamba3_mimo")
        if fn is None:
            return why
        prepare = lambda kw: lambda a: mimo_forward(fn, a, spec)  # noqa: E731
    else:
        return ("no official kernel computes this spec (official: trapezoidal complex SISO, exp-Euler real SISO as "
                "Mamba-2, trapezoidal complex halved MIMO)")
    if mode == "bwd":
        return lambda kw: bench._fwd_bwd(prepare(kw), kw)

    def make(kw):
        forward = prepare(kw)
        args = {k: v for k, v in kw.items() if k != "dout"}
        return lambda: forward(args)
    return make


def cute_step_fn(step_fn, rotary, spec, kw: dict):
    """A no-argument callable doing what the official layer's `step` does per token around its CuTe kernel: the
    Triton rotary step (bias, rotation by the new Θ), `mamba3_step_fn` (in place on the SSM state) and the copies of
    the new Θ, k̂ and v into the cache; returns the output (B, H, P). Untimed preparation here: the cache in the
    official layout (k̂ (B, R, H, N) and v in the input dtype, as the official layer keeps them), Q/K expanded over
    heads, A = A·Δ / Δ and λ = σ(trap) when the spec's inputs hold A·Δ and logits, the projections as (R, H, P)."""
    import torch

    R, G = spec.dims.mimo_rank, spec.dims.ngroups
    v, dt = kw["v"], kw["dt"]
    B, H, P = v.shape
    low = v.dtype

    def per_head(x):  # (B, [R,] G, N) -> (B, R, H, N), as the official layer expands B and C
        x = x[:, None] if R == 1 else x
        return x.expand(-1, -1, H, -1) if G == 1 else x.repeat_interleave(H // G, dim=2)

    def rank_major(x):  # (H, [R,] X) -> (R, H, X)
        return x[None] if R == 1 else x.permute(1, 0, 2).contiguous()

    q, k = per_head(kw["q"]), per_head(kw["k"])
    A = (kw["adt"] if spec.inputs.decay == "a" else kw["adt"] / dt).contiguous()
    lam = (kw["trap"] if spec.inputs.trap == "lambda" else torch.sigmoid(kw["trap"])).contiguous()
    bias_q, bias_k = rank_major(kw["q_bias"]), rank_major(kw["k_bias"])
    D = kw["D"] if kw.get("D") is not None else torch.zeros(H, device=v.device)
    z = kw.get("z")
    if R == 1:
        xpj = zpj = opj = torch.ones(1, H, P, device=v.device, dtype=low)
    else:
        xpj, opj = rank_major(kw["mimo_v"]), rank_major(kw["mimo_o"])
        zpj = rank_major(kw["mimo_z"]) if kw.get("mimo_z") is not None else None
    st = kw["state"]
    angle, ssm = st.angle.clone(), st.ssm.clone()
    k_state = (st.k[:, None] if R == 1 else st.k).to(low).contiguous()
    v_state = st.v.to(low).contiguous()
    out = torch.empty_like(v)
    pairwise = spec.state.rotation == "pairwise"

    def run():
        C, Bk, new_angle = rotary(q=q, k=k, angle_state=angle, angle_proj=kw["angles"], dt=dt, bias_q=bias_q,
                                  bias_k=bias_k, inplace=False, conjugate=False, rotate_pairwise=pairwise)
        step_fn(ssm, k_state, v_state, A, Bk, C, D, v, dt, lam, xpj, outproj=opj, state_out=None, out=out, z=z,
                zproj=zpj if z is not None else None, tile_D=64, num_warps=4)
        angle.copy_(new_angle)
        k_state.copy_(Bk)
        v_state.copy_(v)
        return out
    return run
