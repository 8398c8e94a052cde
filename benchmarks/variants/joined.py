"""Variants for `benchmarks/ablate.py`: the forward kernels with Q̂, K̂ and the state as one tile (`joined`, pairs side
by side: one dot over N where two over N/2 were; macros.py.jinja `ab`) against the halves of 649864b:

    python benchmarks/ablate.py mimo_r4 --variants benchmarks/variants/joined.py --modes chunked/inline

halves: generated/<spec>/fwd.py as committed at 649864b; joined: the spec as built now.
"""
VARIANTS = {
    "halves": {"commit": "649864b"},
    "joined": {},
}
