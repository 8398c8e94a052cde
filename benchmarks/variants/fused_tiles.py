"""Variants for `benchmarks/ablate.py`: the fused forward's P tile at small batch (bf16 dot operands, after the
rotation pre-pass). At B1 H32 the fused kernel runs B·H·P/BLOCK_P programs (32 at BLOCK_P 64, 64 at 32) on 132
SMs, each walking every chunk: does a smaller P tile (more programs, the chunk's Q̂K̂ᵀ recomputed per tile) pay?

    python benchmarks/ablate.py siso_trap_complex --variants benchmarks/variants/fused_tiles.py \
        --modes fused/prepass --size 1:16384:32 --write-only --out DIR     # then --no-write on the GPU

``ablate.py`` runs each variant's first config (MAMBA3_GEN_AUTOTUNE=off): each variant puts its tile first.
"""
BF16 = ["dtypes.compute=bf16"]
FIRST = '    triton.Config({"BLOCK_P": 64}, num_warps=8, num_stages=1),\n    triton.Config({"BLOCK_P": 64}, num_warps=8, num_stages=1, maxnreg=128),\n'


def _first(block_p: int, warps: int) -> dict:
    tile = f'    triton.Config({{"BLOCK_P": {block_p}}}, num_warps={warps}, num_stages=1),\n'
    return {"sets": BF16, "edits": [(FIRST, tile + FIRST)]}


# 8 warps only: with bf16 dot operands Triton 3.6 computed wrong results at 4 warps with BLOCK_P 16 / 32
# (benchmarks/NOTES.md; resources.py offers no such config), and ablate.py does not check outputs
VARIANTS = {
    "p64w8": {"sets": BF16},  # the shipped first config
    "p32w8": _first(32, 8),
    "p16w8": _first(16, 8),
    # 16 warps: 128 registers a thread (the register file's limit at 512 threads), 400 B spilled, 2279 SASS
    # instructions a thread in the loop (8 warps: 2402 with 255 registers); twice the warps to hide latency with
    "p64w16": _first(64, 16),
}
