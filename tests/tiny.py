"""A spec small enough for the Triton interpreter (a forward takes about two seconds on one CPU core), and a check of
a loaded module against the float64 recurrence. Shared by the cache, error and install tests."""
from __future__ import annotations

TINY = """\
name: tiny
state:
  rotation: pairwise
dims:
  d_state: 8
  headdim: 4
  mimo_rank: 1
  chunk_size: 4
dtypes:
  input: fp32
  compute: fp32
"""
# The same layer with the other rotation: the pairs (j, j + N/2) instead of (2j, 2j + 1) give another output.
TINY_HALVED = TINY.replace("rotation: pairwise", "rotation: halved")

# B, L, H of the inputs: two chunks of four tokens and a partial one, two heads.
SHAPE = (1, 9, 2)


def forward_error(module, spec_source, seed: int = 0):
    """(out, ‖out − ref‖/‖ref‖) of ``module.mamba3_forward`` on seeded inputs of ``spec_source``, against the float64
    recurrence of that spec."""
    from mamba3_gen.reference import make_inputs, naive_recurrence, rel_err
    from mamba3_gen.spec.sources import resolve_spec

    spec, _ = resolve_spec(spec_source)
    kw = make_inputs(spec, *SHAPE, seed=seed)
    out = module.mamba3_forward(**kw)
    ref, _ = naive_recurrence(spec, **kw)
    return out, rel_err(out, ref)
