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
    candidates = []
    # Measured on an H100 (benchmarks/gpu_run.py): the half-P block with 8 warps won for every shipped spec; the
    # full-P block and 4 warps stay as candidates for other shapes. Every candidate costs a compile at first call.
    for block_p in (bp_full // 2, bp_full):
        if block_p < 16 and block_p != bp_full:
            continue
        for num_warps in (8, 4):
            for num_stages in (1,):  # the chunk loop carries the state: deeper pipelining only added smem (AOT + H100 runs)
                candidates.append(KernelConfig(block_p, num_warps, num_stages, smem_estimate(low, block_p, num_stages)))
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
