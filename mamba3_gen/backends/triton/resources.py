"""Resource model of the forward kernel: autotune configs that fit the target, and a shared-memory estimate.

Triton stages every tensor-core dot operand through shared memory. The estimate adds the operand tiles of all the
dots of one chunk (as if all were live at once, an upper bound) in the compute dtype, times the pipelining depth
for the tiles loaded inside the loop. A config over the target's per-block limit is dropped at build time; a spec
with no config left is refused with the numbers. `mamba3-gen check` also compiles for sm_90a and reports what
ptxas actually allocated.
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


def smem_estimate(low, block_p: int, num_stages: int) -> int:
    d = low.dims
    rows, bn2 = d["C"] * d["R"], d["BN2"]
    b = _BYTES[low.spec.dtypes.compute]
    loop_tiles = 4 * rows * bn2 + rows * block_p  # Q, K halves and V rows: refilled every chunk
    fixed_tiles = rows * rows + 2 * block_p * bn2  # the masked score tile and the two state halves
    return b * (loop_tiles * max(1, num_stages) + fixed_tiles)


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

        hint = "try dtypes.compute: bf16" if low.spec.dtypes.compute != "bf16" else "try a smaller chunk_size"
        raise BuildError(
            f"dims: the forward kernel needs about {smallest.smem_estimate // 1024} KiB of shared memory per block "
            f"(chunk rows {d['C'] * d['R']}, N={d['N']}, P={d['P']}, {low.spec.dtypes.compute} operands) but "
            f"{low.target.name} allows {limit // 1024} KiB; {hint}, or a smaller chunk_size"
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
