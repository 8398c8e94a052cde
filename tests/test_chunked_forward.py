"""The chunk-parallel forward (issue 11, MAMBA3_GEN_FORWARD=chunked) beyond what tests/test_forward.py runs with it:
the varlen slot map (sequence s's chunk j is slot cu[s] // C + s + j, found by binary search in the out kernel) with
empty sequences, sequences ending on chunk boundaries and many sequences; L = 0; a three-lag rule; the bf16
per-chunk states switch; the selection variable's errors. CPU interpreter, fp32."""
from __future__ import annotations

import os

import pytest
import torch

from mamba3_gen.errors import InputError
from mamba3_gen.reference import make_inputs, naive_recurrence, rel_err
from tests.helpers import assert_matches, make_spec, run_op
from tests.strategies import CPU_TOL, interpreter_only, not_in_spec_mode

pytestmark = [interpreter_only, not_in_spec_mode]


@pytest.fixture
def forward(monkeypatch):
    def use(name: str):
        monkeypatch.setenv("MAMBA3_GEN_FORWARD", name)

    return use


def test_varlen_slot_map(forward, interp_kernels):
    """Packed sequences of lengths 0, C, 1, 2C + 1, 0, C − 1, 3 (chunk 4): every slot the map gives is found by the
    out kernel's search, slots past a sequence's last chunk do nothing, and the result is the oracle's."""
    spec = make_spec(rule="exp_trapezoidal", N=16, P=8, R=1, chunk=4, init=True, varlen=True)
    kw = make_inputs(spec, 1, 0, 2, seed=3, nseq_lengths=[0, 4, 1, 9, 0, 3, 3], with_initial_states=True)
    forward("chunked")
    assert_matches(run_op(interp_kernels(spec), spec, kw), naive_recurrence(spec, **kw), CPU_TOL)


def test_empty_input(forward, interp_kernels):
    """L = 0: no out-kernel launch; the final states are the initial ones."""
    spec = make_spec(rule="exp_trapezoidal", N=16, P=8, R=1, chunk=4, init=True)
    kw = make_inputs(spec, 2, 0, 2, seed=1, with_initial_states=True)
    forward("chunked")
    out, state = run_op(interp_kernels(spec), spec, kw, final=True)
    assert out.shape[1] == 0
    assert torch.equal(state.ssm, kw["initial_states"].ssm.to(state.ssm.dtype))


def test_three_lags_mimo(forward, interp_kernels):
    """A rule reading three previous tokens (two carried tokens stored per chunk), R = 2, chunks of 2 (shorter than
    the lags: carried tokens move down), split into several tiles."""
    spec = make_spec(rule="custom", weights=["dt * lam", "0.5 * dt * exp(adt)", "0.25 * dt", "0.125 * dt * lam"],
                     N=16, P=8, R=2, chunk=2, init=True, varlen=True, rotation="halved")
    forward("chunked")
    mod = interp_kernels(spec)
    kw = make_inputs(spec, 2, 9, 2, seed=7, with_initial_states=True)
    assert_matches(run_op(mod, spec, kw), naive_recurrence(spec, **kw), CPU_TOL)
    kw = make_inputs(spec, 1, 0, 2, seed=8, nseq_lengths=[3, 1, 0, 6], with_initial_states=True)
    assert_matches(run_op(mod, spec, kw), naive_recurrence(spec, **kw), CPU_TOL)


def test_bf16_chunk_states(forward, monkeypatch, interp_kernels):
    """MAMBA3_GEN_CHUNK_STATES=bf16 stores the per-chunk entering states in bf16: the output moves by about bf16's
    rounding of the inter-chunk term, the final states (carried in fp32 registers) not at all."""
    spec = make_spec(rule="exp_trapezoidal", N=16, P=8, R=1, chunk=4, init=True)
    kw = make_inputs(spec, 2, 13, 2, seed=2, with_initial_states=True)
    forward("chunked")
    mod = interp_kernels(spec)
    out32, st32 = run_op(mod, spec, kw, final=True)
    monkeypatch.setenv("MAMBA3_GEN_CHUNK_STATES", "bf16")
    out16, st16 = run_op(mod, spec, kw, final=True)
    assert 0 < rel_err(out16, out32) < 1e-2
    assert torch.equal(st16.ssm, st32.ssm)


def test_selection_errors(forward, interp_kernels):
    spec = make_spec(rule="exp_euler", kind="real", N=16, P=8, chunk=4)
    kw = make_inputs(spec, 1, 5, 1, seed=0)
    forward("both")
    with pytest.raises(InputError, match="MAMBA3_GEN_FORWARD"):
        run_op(interp_kernels(spec), spec, kw)


def test_variables_checked_whichever_forward_runs(forward, monkeypatch, interp_kernels):
    """MAMBA3_GEN_CHUNK_STATES is checked on every call, also when the fused forward (which does not read it) runs;
    MAMBA3_GEN_AUTOTUNE accepts on / off only (`false`, `0` would otherwise leave tuning on unnoticed)."""
    from mamba3_gen.runtime.forward import autotune_configs

    spec = make_spec(rule="exp_euler", kind="real", N=16, P=8, chunk=4)
    kw = make_inputs(spec, 1, 5, 1, seed=0)
    forward("fused")
    monkeypatch.setenv("MAMBA3_GEN_CHUNK_STATES", "fp16")
    with pytest.raises(InputError, match="MAMBA3_GEN_CHUNK_STATES='fp16'; expected one of fp32, bf16"):
        run_op(interp_kernels(spec), spec, kw)
    for bad in ("false", "0"):
        monkeypatch.setenv("MAMBA3_GEN_AUTOTUNE", bad)
        with pytest.raises(InputError, match=f"MAMBA3_GEN_AUTOTUNE='{bad}'; expected one of on, off"):
            autotune_configs([1, 2])
    monkeypatch.setenv("MAMBA3_GEN_AUTOTUNE", " OFF ")
    assert autotune_configs([1, 2]) == [1]
    # a build made under AUTOTUNE=off registers ops of its own (it must not run a tuned build's kernels)
    from mamba3_gen.runtime.forward import build_key

    meta = {"name": "x", "spec_hash": "0" * 64, "template_hash": "t", "arch": "sm_90a"}
    assert build_key(meta).endswith("_untuned")
    monkeypatch.setenv("MAMBA3_GEN_AUTOTUNE", "on")
    assert build_key(meta) == "x_000000000000_t_sm_90a"


def test_default_is_auto(monkeypatch):
    """MAMBA3_GEN_FORWARD unset means auto: fused without a CUDA device (and under the interpreter), else the
    measured choice (benchmarks/NOTES.md, 2026-12-02, 2026-12-03 and 2026-12-06): chunked for MIMO; with tf32 /
    fp32 dot operands for a real state with N > 64 and for J ≥ 2 lags; and when NS·H is below the SM count (below
    half of it after the rotation pre-pass); fused from there."""
    from mamba3_gen.runtime import forward as fwd

    monkeypatch.delenv("MAMBA3_GEN_FORWARD", raising=False)
    assert fwd.selected_forward() == "fused"
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(fwd, "INTERPRETING", False)
    monkeypatch.setitem(fwd._SM_COUNTS, 0, 132)  # an H200's SMs, without asking a GPU
    siso_complex = {"R": 1, "S": 32, "N": 128}
    assert fwd.selected_forward(siso_complex, 8, 32, cuda) == "fused"  # 256 >= 132 programs
    assert fwd.selected_forward(siso_complex, 2, 32, cuda) == "chunked"  # 64 < 132
    siso_complex_bf16 = {**siso_complex, "compute_dtype": "bf16"}
    # after the pre-pass: chunked below half the SM count (B1, B2 at H32), fused from there (B4: 128 programs);
    # rotated inline (a call keeping its chunk states, or asked for), the chunked forward below the SM count
    assert fwd.selected_forward(siso_complex_bf16, 1, 32, cuda, rotation="prepass") == "chunked"
    assert fwd.selected_forward(siso_complex_bf16, 2, 32, cuda, rotation="prepass") == "chunked"  # 64 < 66
    assert fwd.selected_forward(siso_complex_bf16, 3, 32, cuda, rotation="prepass") == "fused"  # 96 >= 66
    assert fwd.selected_forward(siso_complex_bf16, 4, 32, cuda, rotation="prepass") == "fused"
    assert fwd.selected_forward(siso_complex_bf16, 1, 32, cuda, rotation="inline") == "chunked"
    assert fwd.selected_forward(siso_complex_bf16, 8, 32, cuda, rotation="inline") == "fused"
    assert fwd.selected_forward({**siso_complex_bf16, "R": 4}, 8, 32, cuda) == "chunked"
    assert fwd.selected_forward({"R": 1, "S": 0, "N": 64, "compute_dtype": "bf16"}, 1, 32, cuda) == "chunked"
    assert fwd.selected_forward({"R": 4, "S": 32, "N": 64}, 8, 32, cuda) == "chunked"
    assert fwd.selected_forward({"R": 1, "S": 0, "N": 128}, 8, 32, cuda) == "chunked"
    assert fwd.selected_forward({"R": 1, "S": 0, "N": 64}, 8, 32, cuda) == "fused"
    # bf16 dot operands: a real state with N > 64 runs fused from the SM count on (its tiles no longer spill)
    euler_bf16 = {"R": 1, "S": 0, "N": 128, "compute_dtype": "bf16"}
    assert fwd.selected_forward(euler_bf16, 8, 32, cuda) == "fused"
    assert fwd.selected_forward(euler_bf16, 2, 32, cuda) == "chunked"
    # two or more lags: chunked at any batch with tf32 operands; with bf16 ones as a one-lag rule
    two_lags = {"R": 1, "S": 32, "N": 128, "J": 2}
    assert fwd.selected_forward(two_lags, 8, 32, cuda) == "chunked"
    assert fwd.selected_forward({**two_lags, "compute_dtype": "bf16"}, 8, 32, cuda, rotation="prepass") == "fused"
    assert fwd.selected_forward({**two_lags, "compute_dtype": "bf16"}, 1, 32, cuda, rotation="prepass") == "chunked"
    assert fwd.selected_forward({"R": 1, "S": 0, "N": 64}, 8, 32, torch.device("cpu")) == "fused"
    assert fwd.selected_forward(siso_complex, 2, 32, cuda, has_chunked=False) == "fused"  # an older module
    monkeypatch.setenv("MAMBA3_GEN_FORWARD", " Chunked ")
    assert fwd.selected_forward(siso_complex, 8, 32, cuda) == "chunked"
    assert os.environ["MAMBA3_GEN_FORWARD"] == " Chunked "
    monkeypatch.setenv("MAMBA3_GEN_FORWARD", "fused")
    assert fwd.selected_forward({"R": 4, "S": 32, "N": 64}, 1, 1, cuda) == "fused"
