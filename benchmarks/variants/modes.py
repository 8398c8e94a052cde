"""Variants for `benchmarks/ablate.py`: a spec as shipped (tf32 dot operands) and with bf16 dot operands, to time
`auto`'s choices of forward and rotation (runtime/forward.py) against the other modes on one GPU, default tiles.

    python benchmarks/ablate.py two_lag_complex --variants benchmarks/variants/modes.py \
        --modes fused/prepass,chunked/prepass --size 8:4096:32 --write-only --out DIR     # then --no-write on the GPU
"""
VARIANTS = {
    "tf32": {},
    "bf16": {"sets": ["dtypes.compute=bf16"]},
}
