"""Variants for `benchmarks/ablate.py`: the price of the double-float (two_sum) decay cumsum in the chunk loop with
bf16 dot operands. The two_sum scan keeps segment sums free of cancellation (fp32 error ≤ 1e-4 with a strong decay
before a weak one); with bf16 operands the products round to 2^-9 anyway, so a plain fp32 cumsum might do there.
sm_90a SASS of the fused PREPPED loop (siso_trap_complex, bf16): 2402 static instructions -> 2263 (−139) plain.

    python benchmarks/ablate.py siso_trap_complex --variants benchmarks/variants/plain_cumsum.py \\
        --modes fused/prepass --size 8:4096:32 --write-only --out DIR     # then --no-write on the GPU
"""
BF16 = ["dtypes.compute=bf16"]
SCAN = ("hi_tok, lo_tok = tl.associative_scan((a_fin, zero_c), 0, two_sum)",
        "hi_tok, lo_tok = tl.cumsum(a_fin, axis=0), zero_c")
END = ("hi_end, lo_end = tl.reduce((a_fin, zero_c), 0, two_sum)", "hi_end, lo_end = tl.sum(a_fin, axis=0), 0.0")
VARIANTS = {
    "base": {"sets": BF16},
    "plain": {"sets": BF16, "edits": [SCAN, END]},
}
