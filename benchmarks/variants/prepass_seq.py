"""Variants for `benchmarks/ablate.py`: the rotation pre-pass as one walk over chunks per (sequence, head, pair
block), its tile and pipelining, beside the inline rotation (run with --modes fused/inline,fused/prepass,...):

    python benchmarks/ablate.py siso_trap_complex --variants benchmarks/variants/prepass_seq.py \
        --modes fused/inline,fused/prepass,chunked/inline,chunked/prepass

prep_tT_kK_wW puts that prep config first (ablate runs the first config only; SISO specs, chunk 64: the edit
anchors on the first config's text); bf16 builds the spec with bf16 dot operands; one_dot is fused_next.py's (the
rare path's single product).
"""
import runpy
from pathlib import Path

_next = runpy.run_path(str(Path(__file__).with_name("fused_next.py")))
PREP_FIRST = 'triton.Config({"BLOCK_P": 1, "BLOCK_K": 32, "BLOCK_T": 64}, num_warps=4, num_stages=1),'


def prep_first(block_t: int, block_k: int, warps: int) -> list:
    return [(PREP_FIRST, f'triton.Config({{"BLOCK_P": 1, "BLOCK_K": {block_k}, "BLOCK_T": {block_t}}}, '
                         f'num_warps={warps}, num_stages=1),')]


VARIANTS = {
    "bf16": {"sets": ["dtypes.compute=bf16"]},
    "one_dot": {"edits": _next["one_dot"]()},
    "bf16_one_dot": {"sets": ["dtypes.compute=bf16"], "edits": _next["one_dot"](bf16=True)},
    **{f"prep_t{t}_k{k}_w{w}": {"edits": prep_first(t, k, w)}
       for t, k, w in ((16, 32, 2), (32, 32, 4), (32, 64, 4), (16, 64, 4), (64, 16, 8), (64, 32, 8))},
    **{f"bf16_prep_t{t}_k{k}_w{w}": {"sets": ["dtypes.compute=bf16"], "edits": prep_first(t, k, w)}
       for t, k, w in ((16, 32, 2), (32, 32, 4), (64, 16, 8))},
}
