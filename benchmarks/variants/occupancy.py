"""Variants for `benchmarks/ablate.py`: more programs per SM by a register cap on the bf16-operand chunked kernels
and the rotation pre-pass (their default tiles run one or two programs per SM by registers on sm_90a).

    python benchmarks/ablate.py mimo_r4 --variants benchmarks/variants/occupancy.py --only base,states128,...
    python benchmarks/ablate.py siso_trap_complex --variants benchmarks/variants/occupancy.py --only base,prep32_128

Measured (H100, B8 L4096 H32, ms per kernel, default tiles; benchmarks/NOTES.md third session of 2026-12-05):
mimo_r4 chunked/prepass chunk_out 3.29 -> 2.07 with out128; states128, prep128 and the SISO prep tiles no gain.

sm_90a reports (benchmarks/sass_lines.py, bf16 operands, PREPPED): mimo_r4 states 134 -> 125 registers, no spills
(1 -> 2 programs of 8 warps per SM); out 138 -> 128, 16 B spilled (1 -> 2); prep (16 tokens x 32 pairs, 4 warps)
168 -> 128, 160 B spilled (3 -> 4); siso_trap_complex prep 32 tokens x 32 pairs, 4 warps, at 128: 24 B spilled
(4 programs per SM, against 2 for the default 64 x 32 tile at 229 registers).
"""
BF16 = ["dtypes.compute=bf16"]
STATES = 'triton.Config({"BLOCK_P": 64, "BLOCK_K": 32}, num_warps=8, num_stages=1),'
OUT = '''OUT_CONFIGS = autotune_configs([  # the chunked forward's out kernel
    triton.Config({"BLOCK_P": 64}, num_warps=8, num_stages=1),'''
PREP_MIMO = 'triton.Config({"BLOCK_P": 1, "BLOCK_K": 32, "BLOCK_T": 16}, num_warps=4, num_stages=1),'
PREP_SISO = 'triton.Config({"BLOCK_P": 1, "BLOCK_K": 32, "BLOCK_T": 64}, num_warps=4, num_stages=1),'


def cap(text: str) -> str:
    return text.replace("num_stages=1),", "num_stages=1, maxnreg=128),")


VARIANTS = {
    "base": {"sets": BF16},
    "states128": {"sets": BF16, "edits": [(STATES, cap(STATES))]},
    "out128": {"sets": BF16, "edits": [(OUT, cap(OUT))]},
    "prep128": {"sets": BF16, "edits": [(PREP_MIMO, cap(PREP_MIMO))]},
    "all128": {"sets": BF16, "edits": [(STATES, cap(STATES)), (OUT, cap(OUT)), (PREP_MIMO, cap(PREP_MIMO))]},
    "prep32_128": {"sets": BF16, "edits": [(PREP_SISO, cap(PREP_SISO.replace('"BLOCK_T": 64', '"BLOCK_T": 32')))]},
    "prep32": {"sets": BF16, "edits": [(PREP_SISO, PREP_SISO.replace('"BLOCK_T": 64', '"BLOCK_T": 32'))]},
    # the states kernel's chunk loop pipelined (its next chunk's K̂ and V loaded during this one): sm_90a mimo_r4
    # bf16 PREPPED 134 -> 104 registers, 31 KB shared (two programs per SM)
    "st2": {"sets": BF16, "edits": [(STATES, STATES.replace("num_stages=1", "num_stages=2"))]},
    "st2_out128": {"sets": BF16, "edits": [(STATES, STATES.replace("num_stages=1", "num_stages=2")),
                                           (OUT, cap(OUT))]},
}
