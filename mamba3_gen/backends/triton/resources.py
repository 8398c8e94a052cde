"""Resource model of the forward kernel: autotune configs that fit the target, and a shared-memory estimate.

Triton's allocator gives each shared buffer (dot operands, layout conversions, reduction scratch) a slot and reuses
slots whose lifetimes do not overlap, so a block uses the *peak* of simultaneously live buffers, not their sum. Which
buffers exist depends on how the target runs the kernel's dots (the *engine*), on the operand dtype and on the input
dtype (the layout conversions of the loaded tiles), so the estimate is a table per engine, compute dtype, SISO/MIMO,
real/complex state and input dtype, fitted from the AOT sweep ``benchmarks/smem_sweep.py`` (Triton 3.6: the
``ttg.shared`` the allocation pass writes, as ``triton.compile`` reports it; shipped specs x compute dtypes and
variants of N, P, chunk, R, real/complex and input dtype on sm_89 and sm_90a, the official specs on sm_80 and sm_120;
``benchmarks/results/smem_sweep.csv``; ``--fit`` gives each entry's starting point). Engines:

    wgmma   sm_90a with chunk rows C·R >= 64 and tf32 / bf16 operands: Hopper's warp-group MMA reads its operands from
            shared memory, so the [C·R, N/2] Q/K halves and the [C·R, P] V rows stay there across the dots.
    mma     sm_80 / sm_86 / sm_89 / sm_120 (Ampere, Ada and consumer Blackwell: mma.sync; all four allocate the same
            bytes in the sweep), and sm_90a with C·R < 64 (a warp-group MMA needs 64 rows, so Triton falls back):
            operands pass through short-lived staging buffers, so the peak is one or two tiles at a time.
    fma     fp32 operands (ieee): no tensor cores on any target; the dots run on FMA units with operand tiles in
            shared memory, the same bytes on every target.

Each table entry is a max over *phases* (the buffers live together at one point), each phase a sum over the
kernel's tiles, in elements, times bytes per element: QK = C·R·BN2 (a Q or K half; BN2 = N/2 padded to a power of two
>= 16), V = C·R·BP (the V rows; BP = the P block), CC = (C·R)^2 (the masked Q Kᵀ scores), H = BP·BN2 (a state half).
4 bytes per element is an fp32 tile, 2 a bf16 one, 16 (= 4 x 4) four fp32 tiles of that shape, and so on. Over the
sweep the table is within 15 % of the compiler except in the cases NOTES.md issue 10 lists (at most 17 % off, and
mma.sync bf16 real SISO, whose allocation is not monotonic in N or BP: held to the safe side, up to 67 % above).
All configs use one pipeline stage; for more, the estimate counts the per-chunk tiles
once per stage (not measured: an upper bound). A config over the target's per-block limit is dropped at build time;
a spec with no config left is refused with the numbers and every single field change that would make it fit.
``mamba3-gen check --aot`` compiles for sm_90a and reports what was actually allocated.
"""
from __future__ import annotations

from dataclasses import dataclass

# phases (bytes per element of QK, V, CC, H[, only below this many chunk rows, only at BP at most this]; None: no
# bound) per (engine, compute dtype, "siso"/"mimo", "real"/"complex", input dtype); a CC entry of -1 is _cc_bytes
_Phases = tuple[tuple[int, ...], ...]
_MODEL: dict[tuple[str, str, str, str, str], _Phases] = {
    # fp32 operands: 4 fp32 Q/K halves and the V rows (x 1.5 on a real state) live across the FMA dots
    ("fma", "fp32", "siso", "complex", "bf16"): ((16, 4, 0, 0),),
    ("fma", "fp32", "mimo", "complex", "bf16"): ((16, 4, 0, 0),),
    ("fma", "fp32", "siso", "real", "bf16"): ((16, 6, 0, 0),),
    ("fma", "fp32", "mimo", "real", "bf16"): ((16, 6, 0, 0),),
    # Hopper tf32: the wgmma operands (Q/K halves, V rows) plus, on complex SISO, the rotation's conversions
    ("wgmma", "tf32", "siso", "complex", "bf16"): ((16, 4, 0, 0),),
    ("wgmma", "tf32", "mimo", "complex", "bf16"): ((8, 4, 0, 0),),
    ("wgmma", "tf32", "siso", "real", "bf16"): ((8, 6, 0, 0),),
    ("wgmma", "tf32", "mimo", "real", "bf16"): ((8, 6, 0, 0),),
    # Hopper bf16: register A operands; the fp32 score tile's conversion dominates on SISO
    # (at BP <= 32 four Q/K half-tiles are staged beside the scores: 52 KiB at N = 256, BP = 32, 40 KiB at BP = 64)
    ("wgmma", "bf16", "siso", "complex", "bf16"): ((2, 2, 5, 0), (3, 0, 5, 0), (4, 0, 5, 0, None, 32)),
    ("wgmma", "bf16", "mimo", "complex", "bf16"): ((4, 0, 0, 0), (0, 4, 0, 0)),
    ("wgmma", "bf16", "siso", "real", "bf16"): ((0, 2, 4, 0), (0, 0, 0, 4)),
    ("wgmma", "bf16", "mimo", "real", "bf16"): ((4, 0, 0, 0), (0, 4, 0, 0)),
    # mma.sync tf32: four fp32 Q/K staging tiles (complex SISO); the fp32 score tile or a state half (real SISO);
    # two fp32 V-row tiles or the score tile (MIMO; 8 warps: 4 warps sometimes stage less, e.g. 24 KiB for 32 at N = 64)
    ("mma", "tf32", "siso", "complex", "bf16"): ((16, 0, 0, 0),),
    ("mma", "tf32", "mimo", "complex", "bf16"): ((0, 8, 0, 0), (0, 0, 4, 0)),
    ("mma", "tf32", "siso", "real", "bf16"): ((0, 0, 4, 0), (0, 0, 0, 4)),
    ("mma", "tf32", "mimo", "real", "bf16"): ((0, 8, 0, 0),),
    # mma.sync bf16: the fp32 score tile (bf16 at C·R >= 128 with BP <= 32, see _cc_bytes) or Q/K tile plus bf16 V;
    # real SISO is an upper bound (the compiler sometimes stages less: 12 KiB instead of 20 at N = 128, BP = 32)
    ("mma", "bf16", "siso", "complex", "bf16"): ((4, 2, 0, 0), (0, 2, -1, 0)),
    ("mma", "bf16", "mimo", "complex", "bf16"): ((0, 8, 0, 0), (4, 0, 0, 0)),
    ("mma", "bf16", "siso", "real", "bf16"): ((0, 2, -1, 0), (0, 0, 0, 4, 64, None)),
    ("mma", "bf16", "mimo", "real", "bf16"): ((0, 8, 0, 0), (4, 0, 0, 0)),
    # fp32 inputs convert wider loaded tiles (measured where they differ from bf16 inputs)
    ("mma", "tf32", "siso", "complex", "fp32"): ((16, 5, 0, 0),),
    ("mma", "tf32", "mimo", "complex", "fp32"): ((0, 3, 3, 0), (0, 5, 1, 0), (0, 5, 2, 0)),
    ("mma", "tf32", "siso", "real", "fp32"): ((0, 8, 0, 0), (0, 4, 4, 0)),
    ("mma", "bf16", "siso", "real", "fp32"): ((0, 8, 0, 0),),
    ("wgmma", "tf32", "siso", "real", "fp32"): ((5, 0, 4, 3),),
    ("fma", "fp32", "siso", "real", "fp32"): ((16, 4, 0, 0),),
    ("wgmma", "bf16", "siso", "real", "fp32"): ((4, 0, 0, 0),),
    ("mma", "bf16", "siso", "complex", "fp32"): ((0, 8, 0, 0),),
    ("mma", "bf16", "mimo", "complex", "fp32"): ((0, 8, 0, 0),),
    ("wgmma", "bf16", "siso", "complex", "fp32"): ((6, 0, 0, 0), (1, 0, 6, 0)),
    ("wgmma", "bf16", "mimo", "complex", "fp32"): ((4, 0, 0, 0),),
}


def engine(capability: int, rows: int, compute: str) -> str:
    """How the target runs the kernel's dots: "wgmma", "mma" or "fma" (module docstring)."""
    if compute == "fp32":
        return "fma"
    return "wgmma" if capability == 90 and rows >= 64 else "mma"


def _cc_bytes(rows: int, block_p: int) -> int:
    # mma.sync bf16: the fp32 [C·R, C·R] score tile is converted through shared memory, except at C·R >= 128 with
    # BP <= 32, where only its bf16 copy is staged (sweep: 40 KiB instead of 72 KiB at C = 128, BP = 32)
    return 2 if rows >= 128 and block_p <= 32 else 4


@dataclass(frozen=True)
class KernelConfig:
    block_p: int
    num_warps: int
    num_stages: int
    smem_estimate: int
    maxnreg: int | None = None  # register cap per thread (None: the compiler's choice)


def smem_bytes(rows: int, bn2: int, block_p: int, compute: str, *, real: bool, rank: int, capability: int,
               input_dtype: str = "bf16", num_stages: int = 1) -> int:
    """Bytes of shared memory per block of the forward kernel: the table of the module docstring.

    Args:
        rows: chunk rows C·R. bn2: the half state dim padded to a power of two (>= 16). block_p: the P block.
        compute: dtypes.compute (bf16, tf32, fp32). real: a real state (else complex). rank: R (1 is SISO).
        capability: the target's compute capability (80, 86, 89, 90, 120). input_dtype: dtypes.input.
        num_stages: pipeline depth of the config (the per-chunk tiles count once per stage).
    Source: the AOT sweep (benchmarks/smem_sweep.py); an upper bound only where stated there.
    """
    eng = engine(capability, rows, compute)
    key = (eng, compute, "siso" if rank == 1 else "mimo", "real" if real else "complex")
    phases = _MODEL.get(key + (input_dtype,)) or _MODEL[key + ("bf16",)]
    tiles = (rows * bn2, rows * block_p, rows * rows, block_p * bn2)
    cc = _cc_bytes(rows, block_p)
    peak = max(sum((cc if b < 0 else b) * n for b, n in zip(ph[:4], tiles)) for ph in phases
               if len(ph) == 4 or ((ph[4] is None or rows < ph[4]) and (ph[5] is None or block_p <= ph[5])))
    if capability == 90 and eng == "mma" and block_p >= 64:
        # sm_90a below 64 chunk rows: the state update (M = BP rows) still runs as a warp-group MMA on a fp32 state
        # half; a real state read from fp32 inputs stages its fp32 K rows for it as well (24 KiB at C = 32, BP = 64)
        peak = max(peak, 4 * block_p * bn2 + (4 * rows * bn2 if real and input_dtype == "fp32" else 0))
    return int(peak * max(1, num_stages))


def _spec_bytes(spec, target, block_p: int, num_stages: int = 1) -> int:
    d = spec.dims
    return smem_bytes(d.chunk_size * d.mimo_rank, max(16, _pow2(d.d_state // 2)), block_p, spec.dtypes.compute,
                      real=not spec.is_complex, rank=d.mimo_rank, capability=target.capability,
                      input_dtype=spec.dtypes.input, num_stages=num_stages)


def smem_estimate(low, block_p: int, num_stages: int) -> int:
    """:func:`smem_bytes` of a lowered spec for one config on its target."""
    return _spec_bytes(low.spec, low.target, block_p, num_stages)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _with(spec, **changes):
    """A copy of the spec with dims (chunk_size, d_state, headdim) or dtypes (compute) changed, not re-validated."""
    dims = {k: v for k, v in changes.items() if k != "compute"}
    update = {}
    if dims:
        update["dims"] = spec.dims.model_copy(update=dims)
    if "compute" in changes:
        update["dtypes"] = spec.dtypes.model_copy(update={"compute": changes["compute"]})
    return spec.model_copy(update=update)


def _smallest(spec, target) -> int:
    """The smallest estimate over the configs the build would try for the spec on the target."""
    return min(c.smem_estimate for c in candidate_configs(spec, target))


def fit_advice(spec, limit: int, target, min_rows: int = 16) -> list[str]:
    """Every single change of one field that makes the spec's forward fit ``limit`` bytes on ``target``, each with its
    estimate, one entry per field: dtypes.compute (tf32, else bf16, else fp32: the first that fits), the largest
    smaller chunk_size (keeping C·R >= ``min_rows``), the largest smaller d_state and headdim (powers of two)."""
    d, compute = spec.dims, spec.dtypes.compute
    C, N, P = d.chunk_size, d.d_state, d.headdim
    out = []

    def kib(n: int) -> str:
        return f"about {n / 1024:.0f} KiB"

    for dt in ("tf32", "bf16", "fp32"):  # the default first, then the smaller operands; only the first that fits
        if dt != compute:
            est = _smallest(_with(spec, compute=dt), target)
            if est <= limit:
                out.append(f"dtypes.compute: {dt} ({kib(est)})")
                break
    c = C // 2
    while c >= 1 and c * d.mimo_rank >= min_rows:
        est = _smallest(_with(spec, chunk_size=c), target)
        if est <= limit:
            out.append(f"dims.chunk_size: {c} ({kib(est)})")
            break
        c //= 2
    n = _pow2(N) // 2  # powers of two below N
    while n >= 4:
        est = _smallest(_with(spec, d_state=n), target)
        if est <= limit and n < N:
            out.append(f"dims.d_state: {n} ({kib(est)})")
            break
        n //= 2
    p = _pow2(P) // 2
    while p >= 4:
        est = _smallest(_with(spec, headdim=p), target)
        if est <= limit and p < P:
            out.append(f"dims.headdim: {p} ({kib(est)})")
            break
        p //= 2
    return out


def candidate_configs(spec, target) -> list[KernelConfig]:
    """Every autotune config of the fused forward the build would try on ``target`` (a Target or an arch name),
    with its estimate, before those over the target's limit are dropped."""
    from mamba3_gen.backends.device import get_target

    target = get_target(target) if isinstance(target, str) else target
    bp_full = max(16, _pow2(spec.dims.headdim))
    bp_half = bp_full // 2 if bp_full >= 32 else bp_full
    # Measured on an H100 at B8 L4096 H32 (benchmarks/gpu_run.py): the full P block wins (a P split recomputes
    # Q Kᵀ); 8 warps for SISO, 4 for MIMO R4. The 128-register cap lets two programs share an SM (more spills).
    # bf16 operands with 4 warps gave wrong results (Triton 3.6, H100), so bf16 keeps 8 warps.
    shapes = [(bp_full, 8, None), (bp_full, 4, None), (bp_full, 8, 128), (bp_half, 8, None)]
    if spec.dtypes.compute == "bf16":
        shapes = [sh for sh in shapes if sh[1] == 8]
    return [KernelConfig(block_p, num_warps, 1, _spec_bytes(spec, target, block_p), maxnreg)
            for block_p, num_warps, maxnreg in dict.fromkeys(shapes)]


def choose_configs(low) -> list[KernelConfig]:
    d = low.dims
    candidates = candidate_configs(low.spec, low.target)
    limit = low.target.smem_per_block
    fitting = [c for c in candidates if c.smem_estimate <= limit]
    if not fitting:
        smallest = min(candidates, key=lambda c: c.smem_estimate)
        from mamba3_gen.backends.triton.build import BuildError

        advice = fit_advice(low.spec, limit, low.target, low.target.min_dot_k)
        bigger = "" if low.target.capability == 90 else ", or a GPU with more shared memory (--arch sm_90a: 227 KiB)"
        hint = ("try one of: " + "; ".join(advice)) if advice else (
            "no single change of dtypes.compute, dims.chunk_size, dims.d_state or dims.headdim fits; try lowering "
            f"several of them{bigger}")
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
    num_stages: int  # the prep kernel: its walk's LOOP_STAGES (tl.range); the others: the config's num_stages
    smem_estimate: int
    block_k: int | None = None  # states and prep kernels: rotation pairs per tile
    block_t: int | None = None  # prep kernel: tokens per step
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
    compute = spec.dtypes.compute

    def est(k: int, p: int) -> int:  # the fused kernel's model with the tile's pair count (not fitted to these two)
        return smem_bytes(rows, k, p, compute, real=not spec.is_complex, rank=d["R"],
                          capability=target.capability if target.is_gpu else 90, input_dtype=spec.dtypes.input)
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
            # kernel (Triton 3.6, H100). The out tile once more under a 128-register cap (two programs of 8 warps
            # per SM; same tile and addressing, so nothing the crash could hide behind): mimo_r4 B8 L4096 on an
            # H100, chunk_out 3.29 -> 2.07 ms (sm_90a PREPPED: 138 -> 128 registers, 16 B spilled). The cap spills
            # more elsewhere (mimo_r2 142 B, Euler real 520 B; not timed): the autotuner chooses between the two
            # (benchmarks/NOTES.md, third session of 2026-12-05).
            states, out = states[:1], [out[0], (bp, 8, 128)]
    limit = target.smem_per_block
    res = {"states": [], "out": []}
    for p, k, w, m in dict.fromkeys(states):
        e = est(k, p)
        if e <= limit:
            res["states"].append(ChunkedConfig(p, w, 1, e, block_k=k, maxnreg=m))
    for p, w, m in dict.fromkeys(out):
        e = est(bn2, p)
        if e <= limit:
            res["out"].append(ChunkedConfig(p, w, 1, e, maxnreg=m))
    for kind, shapes in (("states", states), ("out", out)):  # none fits: the smallest (the fused kernel, with the
        if not res[kind]:                                       # out kernel's tiles, was refused already if so)
            p, *rest = min(shapes, key=lambda sh: sh[0] * (sh[1] if kind == "states" else bn2))
            k = rest[0] if kind == "states" else None
            res[kind].append(ChunkedConfig(p, rest[-2], 1, est(k or bn2, p), block_k=k, maxnreg=rest[-1]))
    # the rotation pre-pass (complex states): a walk over blocks of BLOCK_T tokens (any block carries Θ: the chunk is
    # the other kernels' unit), elementwise on [BLOCK_T·R, BLOCK_K] tiles, no dots, no shared memory to speak of.
    # Measured on an H200 at BLOCK_T = C (SISO N128 B8 L4096, benchmarks/NOTES.md 2026-12-03): 32 pairs 0.56 ms, 16
    # pairs 0.69, 64 pairs (8 warps) 0.72, 8 pairs (2 warps) 1.67, two stages no change (a config's num_stages never
    # pipelines this dot-free loop: LOOP_STAGES does, through tl.range); MIMO R4: 32 pairs 1.66, 16 pairs 3.1. It is latency-bound at 2 programs per SM (227 registers at 32 pairs, 4 warps; ncu on an H100: 8.8
    # cycles per issued instruction, DRAM 40 %): more programs per SM did not help (32-token blocks 0.54 vs 0.53 ms),
    # overlapping the next block's loads did (H100, benchmarks/NOTES.md 2026-12-06). The interpreter's tile splits
    # the chunk, so the CPU tests walk several blocks per chunk.
    C = d["C"]
    if not target.is_gpu:
        res["prep"] = [ChunkedConfig(1, 4, 1, 0, block_k=max(1, bn2 // 4), block_t=max(1, C // 2))]
    else:
        t16, t32 = max(1, 16 // d["R"]), max(1, 32 // d["R"])  # 16 or 32 tile rows (a chunk of C = 16 or 32
        tiles = ((C, 32, 4, 1), (C, 32, 8, 1), (C, 16, 4, 1), (C, 64, 8, 1),  # would repeat some: kept once)
                 (C, 16, 8, 1), (t16, 32, 2, 1), (t32, 32, 4, 1), (t32, 64, 4, 1), (t16, 64, 4, 1))
        if d["R"] == 1:  # the walk pipelined (LOOP_STAGES 2): SISO 0.53 -> 0.41 ms at B8, 0.96 -> 0.68 at B1 L16384;
            # MIMO R4 1.61 -> 2.14 (53 KB of stage buffers): not offered. The pipelined 32-token tile replaces the
            # single-stage one (0.45 vs 0.54 ms at B8 on an H100; with the segment prefix the latter spills 4 bytes)
            tiles = tuple(x for x in tiles if x != (t32, 32, 4, 1)) + ((C, 32, 4, 2), (t32, 32, 4, 2))
        res["prep"] = [ChunkedConfig(1, w, s, 0, block_k=min(bn2, k), block_t=t)
                       for t, k, w, s in dict.fromkeys((t, min(bn2, k), w, s) for t, k, w, s in tiles)]
    return res
