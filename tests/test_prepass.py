"""The rotation pre-pass (MAMBA3_GEN_ROTATE=prepass): the prep kernel walks each sequence's chunks carrying Θ and
writes Q̂, K̂ per head and the final Θ; the forward kernels then run PREPPED.
It must give what the inline rotation gives, under both forwards, with every feature of the shipped complex specs.

Tolerances (fp32 inputs and fp32 dot operands in the interpreter): both paths carry Θ in fp32 mod 2π with the same
operations, but over tiles of different widths (a pair block in the prep kernel, all pairs inline), so their sums
may round apart by an ulp of Θ ≤ 2π; outputs and states agree to 1e-5 relative, and both match the float64
recurrence to CPU_TOL.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from mamba3_gen.errors import InputError
from mamba3_gen.reference import make_inputs, naive_recurrence, rel_err
from mamba3_gen.runtime.forward import PREP_MIN_SEGMENT, ForwardOp, auto_prep_segments, selected_rotation
from mamba3_gen.spec.loader import load_spec
from tests.helpers import SHIPPED_SPECS, SPECS_DIR, assert_matches, respec, run_op
from tests.strategies import CPU_TOL, GPU_TOL, _interpretable, gpu_only, interpreter_only

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


@interpreter_only
@pytest.mark.parametrize("spec_path", COMPLEX, ids=[p.stem for p in COMPLEX])
def test_prepass_segments_equal_one_walk(spec_path, env, interp_kernels, monkeypatch):
    """MAMBA3_GEN_PREP_SEGMENTS=3 (each sequence walked in three segments, each starting from the sum of the step
    angles before it) gives what one walk per sequence gives: the same Θ but for fp32 sums in another order (the
    prefix sums elementwise mod 2π, then over rows; the walk carries per block), so Θ agrees to 1e-5 and outputs
    and states to AGREE, as for the inline rotation. Batched (several blocks per segment, initial states where the
    spec has them) and packed (an empty sequence and one shorter than a block: their later segments have no
    tokens)."""
    spec = _interpretable(load_spec(spec_path))
    module = interp_kernels(spec)
    C = spec.dims.chunk_size
    H = 2 * spec.dims.ngroups
    common = dict(with_initial_states=spec.options.initial_states, dt_range=(1e-3, 1.0))
    cases = [("batched", make_inputs(spec, 2, 4 * C + 5, H, seed=21, **common))]
    if spec.options.varlen:
        # the long sequence starts off a block boundary (its prefix starts at its own bos), after an empty one
        cases.append(("varlen", make_inputs(spec, 1, 0, H, seed=22, nseq_lengths=[2, 0, 3 * C + 3, C], **common)))
    env("fused", "prepass")
    for what, kw in cases:
        monkeypatch.setenv("MAMBA3_GEN_PREP_SEGMENTS", "1")
        one = run_op(module, spec, kw)
        monkeypatch.setenv("MAMBA3_GEN_PREP_SEGMENTS", "3")
        seg = run_op(module, spec, kw)
        assert rel_err(seg[0], one[0]) <= AGREE, what
        if spec.options.final_states:
            assert _circular(seg[1].angle, one[1].angle) <= 1e-5, what
            assert rel_err(seg[1].ssm, one[1].ssm) <= AGREE, what
    monkeypatch.setenv("MAMBA3_GEN_PREP_SEGMENTS", "0")
    with pytest.raises(InputError, match="MAMBA3_GEN_PREP_SEGMENTS='0'.*positive integer"):
        run_op(module, spec, cases[0][1])


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("name", ["siso_trap_complex", "mimo_r4"])
def test_gpu_prepass_segments(name, gpu_kernels, monkeypatch):
    """Compiled, bf16 inputs and bf16 dot operands, B1 L4096 H4 (auto: 4 segments, capped by PREP_MIN_SEGMENT):
    3 and auto segments against one. Their prefix sums Θ in another register layout than the walk's carry (fp32
    sums in another order: Θ within 1e-5 of 2π, an ulp-level difference that can flip the bf16 rounding of a Q̂, K̂
    element), so outputs agree to 2e-3 relative (a few bf16 ulps of 2^-8 in a sum of 4096 terms), and each matches
    the float64 recurrence to GPU_TOL[bf16]."""
    spec = respec(load_spec(SPECS_DIR / f"{name}.yaml"), dtypes={"compute": "bf16"})
    module = gpu_kernels(spec)
    monkeypatch.setenv("MAMBA3_GEN_ROTATE", "prepass")
    monkeypatch.setenv("MAMBA3_GEN_FORWARD", "fused")
    kw = make_inputs(spec, 1, 4096, 4 * spec.dims.ngroups, dtype=torch.bfloat16, device="cuda", seed=31,
                     with_initial_states=spec.options.initial_states)
    ref = naive_recurrence(spec, **kw)
    outs = {}
    for segs in ("1", "3", "auto"):
        monkeypatch.setenv("MAMBA3_GEN_PREP_SEGMENTS", segs)
        outs[segs] = run_op(module, spec, kw)
        assert_matches(outs[segs], ref if spec.options.final_states else (ref[0], None), GPU_TOL[torch.bfloat16],
                       what=f"segments={segs}")
    for segs in ("3", "auto"):
        assert rel_err(outs[segs][0].float(), outs["1"][0].float()) <= 2e-3, segs
        if spec.options.final_states:
            assert _circular(outs[segs][1].angle, outs["1"][1].angle) <= 1e-5, segs


def test_auto_prep_segments():
    """auto: the largest power of two keeping the programs within four per SM, each segment at least
    PREP_MIN_SEGMENT tokens (the counts measured fastest on an H100: 8 at B1 L16384 H32, 4 at B2 L8192, 1 at B8)."""
    sms = 132
    assert auto_prep_segments(8 * 32 * 2, 4096, sms) == 1  # B8 H32 N128: 512 programs
    assert auto_prep_segments(4 * 32 * 2, 4096, sms) == 2
    assert auto_prep_segments(2 * 32 * 2, 8192, sms) == 4
    assert auto_prep_segments(32 * 2, 16384, sms) == 8  # B1 H32 N128: 64 programs -> 512
    assert auto_prep_segments(32 * 2, 4 * PREP_MIN_SEGMENT, sms) == 4  # capped by the segment length
    assert auto_prep_segments(32 * 2, 3 * PREP_MIN_SEGMENT, sms) == 2
    assert auto_prep_segments(32 * 2, 1500, sms) == 1
    assert auto_prep_segments(4 * sms + 1, 1 << 20, sms) == 1


def test_rotation_selection(monkeypatch):
    """auto: the pre-pass with bf16 dot operands only (it rounds Q̂, K̂ to bf16; measured faster, NOTES), unless the
    call keeps its chunk states (inline: the pre-pass's kernels carry no Θ)."""
    complex_meta, real_meta = {"S": 32, "compute_dtype": "tf32"}, {"S": 0, "compute_dtype": "bf16"}
    bf16_meta = {**complex_meta, "compute_dtype": "bf16"}
    monkeypatch.delenv("MAMBA3_GEN_ROTATE", raising=False)
    assert selected_rotation(complex_meta) == "inline"
    assert selected_rotation(bf16_meta) == "prepass"
    assert selected_rotation({**complex_meta, "compute_dtype": "fp32"}) == "inline"
    assert selected_rotation(real_meta) == "inline"
    assert selected_rotation(bf16_meta, has_prep=False) == "inline"
    assert selected_rotation(bf16_meta, keep_states=True) == "inline"
    monkeypatch.setenv("MAMBA3_GEN_ROTATE", "inline")
    assert selected_rotation(bf16_meta) == "inline"
    monkeypatch.setenv("MAMBA3_GEN_ROTATE", "prepass")
    assert selected_rotation(complex_meta) == "prepass"
    assert selected_rotation(bf16_meta, keep_states=True) == "prepass"  # asked for: no states kept then
    assert selected_rotation(real_meta) == "inline"
    monkeypatch.setenv("MAMBA3_GEN_ROTATE", "sideways")
    with pytest.raises(InputError, match="MAMBA3_GEN_ROTATE='sideways'.*auto"):
        selected_rotation(complex_meta)
    os.environ.pop("MAMBA3_GEN_ROTATE", None)


@interpreter_only
def test_training_call_rotates_inline_and_keeps_states(interp_kernels, monkeypatch):
    """Under auto, a spec with bf16 dot operands (its meta says so; the interpreter's kernels stay fp32) runs the
    pre-pass when no gradient is recorded, and rotates inline and keeps its chunk states when one is (the backward
    then skips the states re-run: 9.39 → 9.08 ms fwd+bwd on the H200, benchmarks/NOTES.md 2026-12-04); with
    MAMBA3_GEN_SAVE_STATES=never the training call keeps nothing and takes the pre-pass again. Gradients of every
    path match float64 autograd (test_backward's tolerance)."""
    from mamba3_gen.runtime.forward import wants_chunk_states
    from tests.test_backward import assert_grads_match

    monkeypatch.delenv("MAMBA3_GEN_ROTATE", raising=False)
    monkeypatch.delenv("MAMBA3_GEN_FORWARD", raising=False)
    monkeypatch.delenv("MAMBA3_GEN_SAVE_STATES", raising=False)
    spec = _interpretable(load_spec(next(p for p in COMPLEX if p.stem == "siso_trap_complex")))  # SISO keeps states
    module = interp_kernels(spec)
    op = module.mamba3_forward
    monkeypatch.setitem(op.meta, "compute_dtype", "bf16")
    prepasses, kept = [], []
    original, outputs = ForwardOp._prepass, ForwardOp._chunk_outputs
    monkeypatch.setattr(ForwardOp, "_prepass", lambda self, *a, **k: prepasses.append(1) or original(self, *a, **k))

    def chunk_outputs(self, v, NS, is_varlen, save_chunks, prepass=False):
        kept.append(save_chunks)
        return outputs(self, v, NS, is_varlen, save_chunks, prepass)

    monkeypatch.setattr(ForwardOp, "_chunk_outputs", chunk_outputs)
    kw = make_inputs(spec, 1, spec.dims.chunk_size + 3, spec.dims.ngroups, seed=5, dt_range=(1e-3, 1.0))
    run_op(module, spec, kw)
    assert prepasses and kept and not any(kept), "a call without gradients takes the pre-pass and keeps nothing"
    assert wants_chunk_states(op.meta, True) and not wants_chunk_states(op.meta, False)
    prepasses.clear(), kept.clear()
    assert_grads_match(module, spec, kw, final=False)
    assert not prepasses and kept and all(kept), "a training call rotates inline and keeps its chunk states"
    monkeypatch.setenv("MAMBA3_GEN_SAVE_STATES", "never")
    prepasses.clear(), kept.clear()
    assert_grads_match(module, spec, kw, final=False)
    assert prepasses and kept and not any(kept), "with SAVE_STATES=never the training call takes the pre-pass"
