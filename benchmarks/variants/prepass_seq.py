"""Variants for `benchmarks/ablate.py`: the rotation pre-pass as one walk over chunks per (sequence, head, pair
block), its tile and pipelining, beside the inline rotation (run with --modes fused/inline,fused/prepass,...):

    python benchmarks/ablate.py siso_trap_complex --variants benchmarks/variants/prepass_seq.py \
        --modes fused/inline,fused/prepass,chunked/inline,chunked/prepass

prep_kK[wW][sS] puts that prep config first (ablate runs the first config only); bf16 builds the spec with bf16 dot
operands; one_dot is fused_next.py's (the rare path's single product).
"""
import runpy
from pathlib import Path

_next = runpy.run_path(str(Path(__file__).with_name("fused_next.py")))
PREP_FIRST = 'triton.Config({"BLOCK_P": 1, "BLOCK_K": 16}, num_warps=4, num_stages=1),'


def prep_first(block_k: int, warps: int, stages: int) -> list:
    return [(PREP_FIRST, f'triton.Config({{"BLOCK_P": 1, "BLOCK_K": {block_k}}}, num_warps={warps}, '
                         f'num_stages={stages}),')]


VARIANTS = {
    "bf16": {"sets": ["dtypes.compute=bf16"]},
    "one_dot": {"edits": _next["one_dot"]()},
    "bf16_one_dot": {"sets": ["dtypes.compute=bf16"], "edits": _next["one_dot"](bf16=True)},
    "prep_k8w2": {"edits": prep_first(8, 2, 1)},
    "prep_k32": {"edits": prep_first(32, 4, 1)},
    "prep_k64w8": {"edits": prep_first(64, 8, 1)},
    "prep_k16s2": {"edits": prep_first(16, 4, 2)},
    "prep_k8w2s2": {"edits": prep_first(8, 2, 2)},
}
