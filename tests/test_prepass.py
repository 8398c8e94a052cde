"""The rotation pre-pass (MAMBA3_GEN_ROTATE=prepass; `auto` picks inline): the angle-sums kernel,
the host's prefix over chunks (`chunk_thetas`) and the prep kernel write Q̂, K̂ per head; the forward kernels then
run PREPPED.
It must give what the inline rotation gives, under both forwards, with every feature of the shipped complex specs.

Tolerances (fp32 inputs and fp32 dot operands in the interpreter): the two paths differ only in how Θ entering a
chunk is formed (an fp32 carry mod 2π inline, a float64 prefix mod 2π in the pre-pass), a difference of a few fp32
ulps of Θ ≤ 2π, so outputs and states agree to 1e-5 relative, and both match the float64 recurrence to CPU_TOL.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from mamba3_gen.errors import InputError
from mamba3_gen.reference import make_inputs, naive_recurrence, rel_err
from mamba3_gen.runtime.forward import ForwardOp, chunk_thetas, selected_rotation
from mamba3_gen.spec.loader import load_spec
from tests.helpers import SHIPPED_SPECS, assert_matches, run_op
from tests.strategies import CPU_TOL, _interpretable, interpreter_only

COMPLEX = [p for p in SHIPPED_SPECS if load_spec(p).is_complex]
AGREE = 1e-5  # inline vs pre-pass, fp32 (module docstring)


@pytest.fixture
def env(monkeypatch):
    def set_(forward: str, rotation: str):
        monkeypatch.setenv("MAMBA3_GEN_FORWARD", forward)
        monkeypatch.setenv("MAMBA3_GEN_ROTATE", rotation)
    return set_


def _circular(a: torch.Tensor, b: torch.Tensor) -> float:
    d = torch.remainder(a.double() - b.double() + math.pi, 2 * math.pi) - math.pi
    return d.abs().max().item() if d.numel() else 0.0


@interpreter_only
@pytest.mark.parametrize("forward", ["fused", "chunked"])
@pytest.mark.parametrize("spec_path", COMPLEX, ids=[p.stem for p in COMPLEX])
def test_prepass_equals_inline(spec_path, forward, env, interp_kernels, monkeypatch):
    """Batched (two chunks, initial states where the spec has them) and packed (an empty sequence, a sequence
    shorter than a chunk): outputs and final states of the pre-pass equal the inline rotation's and the float64
    recurrence's; the pre-pass really ran (counted)."""
    spec = _interpretable(load_spec(spec_path))
    module = interp_kernels(spec)
    calls = []
    original = ForwardOp._prepass  # patched on the class: a registered op may hold an earlier load's instance
    monkeypatch.setattr(ForwardOp, "_prepass", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    C = spec.dims.chunk_size
    H = 2 * spec.dims.ngroups
    common = dict(with_initial_states=spec.options.initial_states, dt_range=(1e-3, 1.0))
    cases = [("batched", make_inputs(spec, 2, C + 5, H, seed=11, **common))]
    if spec.options.varlen:
        cases.append(("varlen", make_inputs(spec, 1, 0, H, seed=12, nseq_lengths=[C + 3, 0, 2], **common)))
    for what, kw in cases:
        ref = naive_recurrence(spec, **kw)
        env(forward, "inline")
        inline = run_op(module, spec, kw)
        n_inline = len(calls)
        env(forward, "prepass")
        pre = run_op(module, spec, kw)
        assert n_inline == 0 and len(calls) > 0, f"{what}: the pre-pass ran {n_inline} / {len(calls)} times"
        assert rel_err(pre[0], inline[0]) <= AGREE, what
        assert_matches(pre, ref if spec.options.final_states else (ref[0], None), CPU_TOL, what=what)
        if spec.options.final_states:
            for field in ("ssm", "k", "v"):
                a, b = getattr(pre[1], field), getattr(inline[1], field)
                if a is not None:
                    assert rel_err(a, b) <= AGREE, (what, field)
            assert _circular(pre[1].angle, inline[1].angle) <= 1e-5, what
        calls.clear()


def test_chunk_thetas_is_a_prefix_per_sequence():
    """Θ entering each slot = Θ_init + the sums of the sequence's earlier chunks, mod 2π; the final Θ adds all of
    them; an empty sequence keeps its initial Θ; slots no sequence uses are ignored (float64 loops as the oracle)."""
    C, H, S = 4, 2, 3
    cu = torch.tensor([0, 9, 9, 12, 25])  # lengths 9, 0, 3, 13
    NS, L = 4, 25
    slots = L // C + NS
    gen = torch.Generator().manual_seed(0)
    sums = torch.randn(slots, H, S, generator=gen) * 3
    init = torch.rand(NS, H, S, generator=gen) * 6
    first = [int(cu[s]) // C + s for s in range(NS)]
    count = [-(-(int(cu[s + 1]) - int(cu[s])) // C) for s in range(NS)]
    used = {f + j for f, n in zip(first, count) for j in range(n)}
    for j in range(slots):
        if j not in used:
            sums[j] = 0.0  # the kernel leaves them at 0 (zero-initialised)
    theta, final = chunk_thetas(sums, init, cu, NS, L, C)
    for s in range(NS):
        acc = init[s].double()
        for j in range(count[s]):
            assert _circular(theta[first[s] + j], acc) <= 1e-6
            acc = acc + sums[first[s] + j].double()
        assert _circular(final[s], acc) <= 1e-6
    assert theta.dtype == torch.float32 and bool(((theta >= 0) & (theta <= 2 * math.pi)).all())


def test_chunk_thetas_non_finite_stays_in_its_sequence():
    """A non-finite chunk sum makes Θ NaN for its sequence's later chunks and final Θ only (causality)."""
    C, H, S, NS, L = 4, 1, 2, 2, 8  # two batch rows of two chunks
    sums = torch.ones(4, H, S)
    sums[0, 0, 0] = float("inf")
    theta, final = chunk_thetas(sums, None, None, NS, L, C)
    assert torch.isnan(theta[1, 0, 0]) and torch.isfinite(theta[1, 0, 1]) and torch.isnan(final[0, 0, 0])
    assert bool(torch.isfinite(theta[2:]).all()) and bool(torch.isfinite(final[1]).all())
    assert theta[0].eq(0).all()  # the first chunk enters with Θ = 0


def test_chunk_thetas_batched_without_initial_angle():
    B, L, C, H, S = 2, 10, 4, 1, 2
    NC = 3
    sums = torch.randn(B * NC, H, S, dtype=torch.float32)
    theta, final = chunk_thetas(sums, None, None, B, L, C)
    for b in range(B):
        acc = torch.zeros(H, S, dtype=torch.float64)
        for j in range(NC):
            assert _circular(theta[b * NC + j], acc) <= 1e-6
            acc = acc + sums[b * NC + j].double()
        assert _circular(final[b], acc) <= 1e-6


def test_rotation_selection(monkeypatch):
    complex_meta, real_meta = {"S": 32}, {"S": 0}
    monkeypatch.delenv("MAMBA3_GEN_ROTATE", raising=False)
    assert selected_rotation(complex_meta, "chunked") == "inline"  # auto: measured as fast or faster (NOTES)
    assert selected_rotation(complex_meta, "fused") == "inline"
    assert selected_rotation(real_meta, "chunked") == "inline"
    assert selected_rotation(complex_meta, "chunked", has_prep=False) == "inline"
    monkeypatch.setenv("MAMBA3_GEN_ROTATE", "inline")
    assert selected_rotation(complex_meta, "chunked") == "inline"
    monkeypatch.setenv("MAMBA3_GEN_ROTATE", "prepass")
    assert selected_rotation(complex_meta, "fused") == "prepass"
    monkeypatch.setenv("MAMBA3_GEN_ROTATE", "sideways")
    with pytest.raises(InputError, match="MAMBA3_GEN_ROTATE='sideways'.*auto"):
        selected_rotation(complex_meta)
    os.environ.pop("MAMBA3_GEN_ROTATE", None)
