"""Variants for `benchmarks/ablate.py`: the J-lag forward with token t−J carried through the chunk loop (before,
`commit`) against taken by the last chunk only (the template since, `{}`); sm_90a: two_lag_complex fused kernel
5955 -> 5762 static instructions in the loop (tf32, inline), 3251 -> 3236 (bf16, PREPPED; the skipped branch's
~90 included).

    python benchmarks/ablate.py two_lag_complex --variants benchmarks/variants/carry.py --write-only --out DIR
"""
VARIANTS = {
    "carried": {"commit": "cc4c029"},
    "last_chunk": {},
}
