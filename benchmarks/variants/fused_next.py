"""Variants for `benchmarks/ablate.py` (the next forward experiments, NOTES.md "Next GPU session"):

    python benchmarks/ablate.py siso_trap_complex --variants benchmarks/variants/fused_next.py

one_dot: the product runs once on V with its non-finite values zeroed and the rare branch only marks rows (measured
in the third session of 2026-12-02 together with the contiguous pair loads, then reverted: it frees one fp32 V tile
of shared memory, which the resource table must be re-fitted for); rare_dot: one_dot with the rows' mark made in
every chunk by a [C, C]·[C, P] dot of the lower triangle and the non-finite indicator (no block-wide reduction, no
branch; equal to the branch on NaN/inf inputs in the interpreter); no_rare cuts the non-finite check (wrong on NaN
inputs: it measures the check's cost); warps4 / p32 change the fused and out kernels' default tile; the bf16 ones
build the spec with bf16 dot operands first; stages2 lets
Triton pipeline the chunk loop's loads (num_stages=2).
"""
RARE_IF = 'if not (tl.abs(tl.sum(v_rows)) < float("inf")):'
SEEN = "seen = _rows2d(tl.cumsum(bad_tok, axis=0), BLOCK_P) > 0"
SEEN_DOT = ('seen = tl.dot(tl.where(lag_ij >= 0, 1.0, 0.0), bad_tok.to(tl.float32), input_precision="tf32") > 0.5'
            '  # [ROWS, BLOCK_P] count of non-finite values at or before the row')
FIRST_CONFIG = 'triton.Config({"BLOCK_P": 64}, num_warps=8, num_stages=1),'
FINITE_V = 'tl.where(tl.abs(v_rows) < float("inf"), v_rows, 0.0)'


def one_dot(bf16: bool = False) -> list:
    if bf16:
        outer = "y = tl.dot((qkw).to(tl.bfloat16), (v_rows).to(tl.bfloat16))"
        inner = "y = tl.dot((qkw).to(tl.bfloat16), (tl.where(v_finite, v_rows, 0.0)).to(tl.bfloat16))"
        return [(outer, f"y = tl.dot((qkw).to(tl.bfloat16), ({FINITE_V}).to(tl.bfloat16))"), (inner, "pass")]
    outer = 'y = tl.dot(qkw, v_rows, input_precision="tf32")'
    inner = 'y = tl.dot(qkw, tl.where(v_finite, v_rows, 0.0), input_precision="tf32")'
    return [(outer, f'y = tl.dot(qkw, {FINITE_V}, input_precision="tf32")'), (inner, "pass")]


RARE_DOT = [(RARE_IF, "if True:  # ablation: every chunk marks its rows by a dot"), (SEEN, SEEN_DOT)]
VARIANTS = {
    "one_dot": {"edits": one_dot()},
    "rare_dot": {"edits": one_dot() + RARE_DOT},
    "no_rare": {"edits": [(RARE_IF, "if False:")]},
    "warps4": {"edits": [(FIRST_CONFIG, FIRST_CONFIG.replace("num_warps=8", "num_warps=4"))]},
    "p32": {"edits": [(FIRST_CONFIG, FIRST_CONFIG.replace('"BLOCK_P": 64', '"BLOCK_P": 32'))]},
    "bf16": {"sets": ["dtypes.compute=bf16"]},
    "bf16_one_dot": {"sets": ["dtypes.compute=bf16"], "edits": one_dot(bf16=True)},
    "bf16_rare_dot": {"sets": ["dtypes.compute=bf16"], "edits": one_dot(bf16=True) + RARE_DOT},
    "stages2": {"edits": [(FIRST_CONFIG, FIRST_CONFIG.replace("num_stages=1", "num_stages=2"))]},
    "bf16_no_rare": {"sets": ["dtypes.compute=bf16"], "edits": [(RARE_IF, "if False:")]},
    "bf16_stages2": {"sets": ["dtypes.compute=bf16"],
                     "edits": [(FIRST_CONFIG, FIRST_CONFIG.replace("num_stages=1", "num_stages=2"))]},
}
