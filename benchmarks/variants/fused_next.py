"""Variants for `benchmarks/ablate.py` (the next forward experiments, NOTES.md "Next GPU session"):

    python benchmarks/ablate.py siso_trap_complex --variants benchmarks/variants/fused_next.py

no_rare cuts the non-finite-V check (wrong on NaN inputs: it measures the check's cost); rare_dot marks the rows at
or after a non-finite value with a [C, C]·[C, P] dot of the lower triangle and the indicator, in every chunk (no
block-wide reduction, no branch); warps4 / p32 change the fused and out kernels' default tile.
"""
RARE_IF = "if tl.sum(tl.where(v_finite, 0, 1)) > 0:  # rare: a NaN or ±inf value in the chunk"
SEEN = "seen = _rows2d(tl.cumsum(bad_tok, axis=0), BLOCK_P) > 0"
SEEN_DOT = ('seen = tl.dot(tl.where(lag_ij >= 0, 1.0, 0.0), bad_tok.to(tl.float32), input_precision="tf32") > 0.5'
            '  # [ROWS, BLOCK_P] count of non-finite values at or before the row')
FIRST_CONFIG = 'triton.Config({"BLOCK_P": 64}, num_warps=8, num_stages=1),'

VARIANTS = {
    "no_rare": {"edits": [(RARE_IF, "if False:")]},
    "rare_dot": {"edits": [(RARE_IF, "if True:  # ablation: every chunk marks its rows by a dot"), (SEEN, SEEN_DOT)]},
    "warps4": {"edits": [(FIRST_CONFIG, FIRST_CONFIG.replace("num_warps=8", "num_warps=4"))]},
    "p32": {"edits": [(FIRST_CONFIG, FIRST_CONFIG.replace('"BLOCK_P": 64', '"BLOCK_P": 32'))]},
    "bf16": {"sets": ["dtypes.compute=bf16"]},
    "bf16_rare_dot": {"sets": ["dtypes.compute=bf16"],
                      "edits": [(RARE_IF, "if True:  # ablation: every chunk marks its rows by a dot"), (SEEN, SEEN_DOT)]},
}
