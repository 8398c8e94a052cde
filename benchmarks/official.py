"""Optional provider: the official Mamba-3 Triton SISO forward, for side-by-side accuracy and timing.

Nothing of it is in this repository. A developer copies `mamba_ssm/ops/triton/mamba3/` of state-spaces/mamba into
the git-ignored folder `.official/` (so that `.official/mamba_ssm/ops/triton/mamba3/*.py` exists) and names
`.official` in the device call's `carry`; an installed `mamba_ssm` works too. Without either, `load_siso()`
returns None and the benchmarks skip the official rows, saying so.

The official wrapper takes our calling convention's tensors as they are (same names in capitals, same shapes for
SISO); it casts Q, K, V, Trap, Angles, Z to bf16 itself.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_DIR = ROOT / ".official"


def _load(module: str, name: str, what: str):
    """`name` from the official `mamba_ssm.ops.triton.mamba3.<module>`, or None with the reason printed."""
    if (OFFICIAL_DIR / "mamba_ssm").is_dir() and str(OFFICIAL_DIR) not in sys.path:
        sys.path.insert(0, str(OFFICIAL_DIR))
    try:
        return getattr(importlib.import_module(f"mamba_ssm.ops.triton.mamba3.{module}"), name)
    except Exception as e:  # absent, or its dependencies are
        print(f"official {what} unavailable ({type(e).__name__}: {e}); skipping its rows", file=sys.stderr)
        return None


def load_siso():
    """`mamba3_siso_combined`, or None with the reason printed."""
    return _load("mamba3_siso_combined", "mamba3_siso_combined", "SISO kernel")


def siso_forward(fn, kw: dict, chunk_size: int = 64, return_final_states: bool = False):
    """Run the official SISO forward on our keyword arguments (a trapezoidal, complex, pairwise SISO spec)."""
    st = kw.get("initial_states")
    init = None if st is None else (st.angle, st.ssm, st.k, st.v)
    return fn(kw["q"], kw["k"], kw["v"], kw["adt"], kw["dt"], kw["trap"], kw["q_bias"], kw["k_bias"], kw["angles"],
              D=kw.get("D"), Z=kw.get("z"), Input_States=init, chunk_size=chunk_size,
              return_final_states=return_final_states, cu_seqlens=kw.get("cu_seqlens"))


def load_siso_step():
    """The official Triton `mamba3_siso_step`, or None with the reason printed."""
    return _load("mamba3_siso_step", "mamba3_siso_step", "SISO step")


def siso_step_fn(fn, inputs: dict, state):
    """A no-argument callable running the official SISO step on one token's inputs (our names) and a state."""
    init = (state.angle, state.ssm, state.k, state.v)
    return lambda: fn(inputs["q"], inputs["k"], inputs["v"], inputs["adt"], inputs["dt"], inputs["trap"],
                      inputs["q_bias"], inputs["k_bias"], inputs["angles"], D=inputs.get("D"), Z=inputs.get("z"),
                      Input_States=init)
