"""Resource model of the forward kernel: autotune configs that fit the target, and a shared-memory estimate.

Triton's allocator gives each shared buffer (dot operands, layout conversions) a slot and reuses slots whose
lifetimes do not overlap, so a block uses the *peak* of simultaneously live buffers, not their sum (the earlier
sum-of-all-tiles estimate was 1.6-2.7x too high and refused consumer GPUs wrongly, issue 10 item 11). The peak
is modelled from what the sm_90a AOT compile (Triton 3.6, ``compile_report``) reported for 19 kernels, in
elements of the compute dtype (b bytes: 2 for bf16, 4 for tf32 / fp32), with rows = C·R, BN2 = the padded half
state, BP = the P block:

    2·rows·BN2 + k·rows·BP            two K/Q half tiles and the V rows of a chunk (k = 1, 1.5 for a real state)
    + 2·rows·BN2·min(1, rows/64)       complex SISO only (R = 1) with tf32 / fp32 operands: the rotation's layout
                                       conversions, which outlive the dots there

It matched 17 of the 19 compiles exactly (shipped specs, rows 16-128, BN2 32-128, BP 32-128, bf16 / tf32 / fp32,
real / complex, SISO / MIMO, pairwise / halved, 0-2 lags) and the other two within 25 % on the safe side;
tests/test_resources.py holds the shipped specs to 15 % of the compiler. All configs use one pipeline stage; for
more, the per-chunk tiles are counted once per stage (not measured: an upper bound). A config over the target's
per-block limit is dropped at build time; a spec with no config left is refused with the numbers and every field
that would make it fit. `mamba3-gen check` also compiles for sm_90a and reports what ptxas actually allocated.
"""
from __future__ import annotations

from dataclasses import dataclass

_BYTES = {"bf16": 2, "tf32": 4, "fp32": 4}


@dataclass(frozen=True)
class KernelConfig:
    block_p: int
    num_warps: int
    num_stages: int
    smem_estimate: int
    maxnreg: int | None = None  # register cap per thread (None: the compiler's choice)


def smem_bytes(rows: int, bn2: int, block_p: int, compute: str, complex_siso: bool, real: bool,
               num_stages: int = 1) -> int:
    """Bytes of shared memory per block of the forward kernel (the model in the module docstring).

    Args:
        rows: chunk rows C·R. bn2: the half state dim padded to a power of two (>= 16). block_p: the P block.
        compute: dtypes.compute (bf16, tf32, fp32). complex_siso: a complex state with R == 1. real: a real state.
        num_stages: pipeline depth of the config (the per-chunk tiles count once per stage).
    """
    b = _BYTES[compute]
    tiles = 2 * rows * bn2 + (1.5 if real else 1.0) * rows * block_p
    extra = 2 * rows * bn2 * min(1.0, rows / 64) if complex_siso and compute != "bf16" else 0
    return int(b * (tiles * max(1, num_stages) + extra))


def smem_estimate(low, block_p: int, num_stages: int) -> int:
    """:func:`smem_bytes` of a lowered spec for one config."""
    d = low.dims
    spec = low.spec
    return smem_bytes(d["C"] * d["R"], d["BN2"], block_p, spec.dtypes.compute, spec.is_complex and d["R"] == 1,
                      not spec.is_complex, num_stages)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _smallest(spec, C: int, N: int, P: int, compute: str) -> int:
    """The smallest config estimate of the spec with these dims (the half P block when P >= 32)."""
    R = spec.dims.mimo_rank
    bp = max(16, _pow2(P))
    bp = bp // 2 if bp >= 32 else bp
    return smem_bytes(C * R, max(16, _pow2(N // 2)), bp, compute, spec.is_complex and R == 1, not spec.is_complex)


def fit_advice(spec, limit: int, min_rows: int = 16) -> list[str]:
    """Every single change of one field that makes the spec's forward fit ``limit`` bytes, with its estimate:
    dtypes.compute: bf16, the largest smaller chunk_size (keeping C·R >= ``min_rows``), d_state and headdim."""
    d, compute = spec.dims, spec.dtypes.compute
    C, N, P, R = d.chunk_size, d.d_state, d.headdim, d.mimo_rank
    out = []

    def kib(n: int) -> str:
        return f"about {n / 1024:.0f} KiB"

    if compute != "bf16":
        est = _smallest(spec, C, N, P, "bf16")
        if est <= limit:
            out.append(f"dtypes.compute: bf16 ({kib(est)})")
    c = C // 2
    while c >= 1 and c * R >= min_rows:
        est = _smallest(spec, c, N, P, compute)
        if est <= limit:
            out.append(f"dims.chunk_size: {c} ({kib(est)})")
            break
        c //= 2
    n = _pow2(N) // 2  # powers of two below N
    while n >= 4:
        est = _smallest(spec, C, n, P, compute)
        if est <= limit and n < N:
            out.append(f"dims.d_state: {n} ({kib(est)})")
            break
        n //= 2
    p = _pow2(P) // 2
    while p >= 4:
        est = _smallest(spec, C, N, p, compute)
        if est <= limit and p < P:
            out.append(f"dims.headdim: {p} ({kib(est)})")
            break
        p //= 2
    return out


def choose_configs(low) -> list[KernelConfig]:
    d = low.dims
    bp_full = d["BP"]
    bp_half = bp_full // 2 if bp_full >= 32 else bp_full
    # Measured on an H100 at B8 L4096 H32 (benchmarks/gpu_run.py): the full P block wins (a P split recomputes
    # Q Kᵀ); 8 warps for SISO, 4 for MIMO R4. The 128-register cap lets two programs share an SM (more spills).
    # bf16 operands with 4 warps gave wrong results (Triton 3.6, H100), so bf16 keeps 8 warps.
    shapes = [(bp_full, 8, None), (bp_full, 4, None), (bp_full, 8, 128), (bp_half, 8, None)]
    if low.spec.dtypes.compute == "bf16":
        shapes = [sh for sh in shapes if sh[1] == 8]
    candidates = []
    for block_p, num_warps, maxnreg in dict.fromkeys(shapes):
        candidates.append(KernelConfig(block_p, num_warps, 1, smem_estimate(low, block_p, 1), maxnreg))
    limit = low.target.smem_per_block
    fitting = [c for c in candidates if c.smem_estimate <= limit]
    if not fitting:
        smallest = min(candidates, key=lambda c: c.smem_estimate)
        from mamba3_gen.backends.triton.build import BuildError

        advice = fit_advice(low.spec, limit, low.target.min_dot_k)
        hint = ("try one of: " + "; ".join(advice)) if advice else (
            "no single change of dtypes.compute, dims.chunk_size, dims.d_state or dims.headdim fits; try lowering "
            "several of them, or a GPU with more shared memory (--arch sm_90a: 227 KiB)")
        raise BuildError(
            f"dims: the forward kernel needs about {smallest.smem_estimate // 1024} KiB of shared memory per block "
            f"(chunk rows {d['C'] * d['R']}, N={d['N']}, P={d['P']}, {low.spec.dtypes.compute} operands) but "
            f"{low.target.name} allows {limit // 1024} KiB; {hint}"
        )
    return fitting


@dataclass(frozen=True)
class StepConfig:
    """Launch shape of the decode step: one program per (batch row, head) walks H in passes of block_p rows."""

    block_p: int
    num_warps: int
    head_major: bool = False  # grid (H, B): neighbouring programs stream neighbouring heads of one batch row


STEP_TILE_ELEMENTS = 8192  # values of H per program (32 per lane with 8 warps)


def choose_step_config(low) -> StepConfig:
    # Measured on an H100 (benchmarks/RESULTS.md, decode): one program per head (64 x 128 fp32 of H, 8 warps) beat
    # 2-8 programs per head (16-32 rows, 2-8 warps) at every batch, by up to 1.5x at R=4 (each block recomputes q̂, k̂).
    d = low.dims
    block_p = max(1, min(d["BP"], STEP_TILE_ELEMENTS // d["BN"]))
    tile = block_p * d["BN"]
    num_warps = max(1, min(8, tile // 1024))  # one warp per 1024 values of H: 16-byte vector loads, no spills
    # Head-major grid: 94.9 % vs 91.3 % of the copy ceiling at R=1, B=256, but 59 % vs 62 % at R=4 (same run).
    return StepConfig(block_p, num_warps, head_major=d["R"] == 1)


# ------------------------------------------------------------------------------------------------------------------
# the chunk-parallel forward (MAMBA3_GEN_FORWARD=chunked): a states kernel over [BLOCK_P, BLOCK_K] tiles of the state
# (BLOCK_K rotation pairs: dims dim_a and dim_b of each), sequential over chunks; an out kernel per chunk slot
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkedConfig:
    block_p: int
    num_warps: int
    num_stages: int
    smem_estimate: int
    block_k: int | None = None  # states kernel only: rotation pairs per tile
    maxnreg: int | None = None


def chunk_states_dtype(spec) -> str:
    """dtype of the per-chunk entering states the states kernel writes and the out kernel reads. The out kernel
    uses them only as an operand of the readout dot Q·Hᵀ, which rounds H to the compute dtype: with bf16 operands
    a bf16 copy loses nothing (the fused kernel rounds its register state the same way) and halves the traffic;
    with tf32 / fp32 operands the copy stays fp32 (bf16 has 8 mantissa bits, fewer than tf32's 10; fp16 has
    tf32's mantissa but overflows at 65504). The carried state itself stays fp32 in registers either way."""
    return "bf16" if spec.dtypes.compute == "bf16" else "fp32"


def choose_chunked_configs(low) -> dict[str, list[ChunkedConfig]]:
    """Autotune configs of the two chunked kernels; the first of each is the default (the interpreter's only one).

    On a GPU (picked from the sm_90a AOT report of siso_trap_complex, benchmarks/NOTES.md "Issue 11": no spills
    at any of these; the 4-warp states tiles of 64 x 32 and the 4-warp out kernel spilled): states kernel tiles of
    the full P block x 32 pairs with 8 warps first (N = 128: 2 pair blocks per head), then smaller tiles for more
    programs at small batch (B1 L16384: NS·H·(P/BLOCK_P)·(N/2/BLOCK_K) = 32·2·2 .. 32·4·4); out kernel with the
    full P block (a P split recomputes Q Kᵀ) and 8 warps, then the half block. In the interpreter the default tiles
    split both P and the pairs, so the CPU tests exercise several tiles per head."""
    d, spec, target = low.dims, low.spec, low.target
    rows, bn2, bp = d["C"] * d["R"], d["BN2"], d["BP"]
    compute, cplx_siso, real = spec.dtypes.compute, spec.is_complex and d["R"] == 1, not spec.is_complex
    if not target.is_gpu:
        states = [(max(1, bp // 4), max(1, bn2 // 4), 4, None)]
        out = [(max(1, bp // 4), 4, None)]
    else:
        lo = max(16, target.min_dot_k)
        bk = max(lo, min(bn2, 32))
        bp_half = max(lo, bp // 2)
        states = [(bp, bk, 8, None), (bp_half, bk, 8, None), (bp_half, max(lo, bk // 2), 2, None),
                  (max(lo, bp // 4), max(lo, bk // 2), 2, None)]
        out = [(bp, 8, None), (bp_half, 8, None)]
        if compute == "bf16":
            # Only the defaults: autotuning the bf16-operand chunked kernels over these tiles hit an illegal memory
            # access on the H200 (siso_trap_complex, B2 L1024 H8 and B8 L4096 H32; tf32 and Euler real were fine),
            # while the defaults alone ran and matched the fused kernel; the failing tile is not isolated yet
            # (NOTES.md, issue 11). Fewer than 8 warps with bf16 operands also gave wrong results in the fused
            # kernel (Triton 3.6, H100).
            states, out = states[:1], out[:1]
    limit = target.smem_per_block
    res = {"states": [], "out": []}
    for p, k, w, m in dict.fromkeys(states):
        est = smem_bytes(rows, k, p, compute, cplx_siso, real)
        if est <= limit:
            res["states"].append(ChunkedConfig(p, w, 1, est, block_k=k, maxnreg=m))
    for p, w, m in dict.fromkeys(out):
        est = smem_bytes(rows, bn2, p, compute, cplx_siso, real)
        if est <= limit:
            res["out"].append(ChunkedConfig(p, w, 1, est, maxnreg=m))
    for kind, shapes in (("states", states), ("out", out)):  # none fits: the smallest (the fused kernel, with the
        if not res[kind]:                                       # out kernel's tiles, was refused already if so)
            p, *rest = min(shapes, key=lambda sh: sh[0] * (sh[1] if kind == "states" else bn2))
            k = rest[0] if kind == "states" else None
            res[kind].append(ChunkedConfig(p, rest[-2], 1, smem_bytes(rows, k or bn2, p, compute, cplx_siso, real),
                                           block_k=k, maxnreg=rest[-1]))
    return res
