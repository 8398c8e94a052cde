"""The input contract of the generated ops (issue 10, items 5-7 and the NaN poison), on the host side:

- every argument's type, rank, dtype and device is checked with an InputError naming it and the expected shape;
- cu_seqlens: 0-d, lists, 2-D, float, too short or on another device are refused; its values (start 0, end L,
  never decreasing) are checked on the host for CPU tensors and on the device, without a host sync, for CUDA ones;
- zero-length sequences (equal neighbours in cu_seqlens) and L == 0 are computed as the recurrence says: no tokens,
  final state = initial state (or zero);
- dtypes.input is the dtype a kernel is tuned and AOT-checked for; q, k, v, z of another float dtype (fp32, bf16,
  fp16) are read as they are (a separate JIT specialisation), the output has v's dtype; float64 and ints are refused;
- the Triton interpreter computes bf16 dot operands and fp32 -> bf16 casts as a GPU does (runtime/interpreter.py),
  saying so once, instead of multiplying raw bits;
- torch.empty in the test session is NaN-poisoned (conftest.py), so an unwritten output element fails a test.

Tolerances: fp32 kernels against the float64 recurrence use CPU_TOL (rel 1e-4, justified in test_forward.py); a
zero-length sequence's final state is a copy of its initial state, so it is compared exactly. bf16 operands carry
8 mantissa bits (relative rounding 2^-9 ≈ 2e-3 per operand); sums of a few dozen such products stay within 1e-2.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from mamba3_gen.errors import InputError
from mamba3_gen.reference import make_inputs, naive_recurrence, rel_err, to_float64
from mamba3_gen.runtime.checks import check_cu_seqlens, check_cu_seqlens_values
from tests.helpers import KernelCache, Tol, assert_matches, make_spec, respec
from tests.strategies import CPU_TOL, GPU_TOL, HAS_CUDA, INTERPRET, gpu_only, interpreter_only

BF16_TOL = Tol(rel=1e-2, atol=1e-3)  # see the module docstring
TOL = CPU_TOL if INTERPRET else GPU_TOL[torch.float32]  # tf32 dot operands on a GPU (test_forward.py's docstring)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    arch = "interpreter" if INTERPRET else None
    if arch is None:
        from tests.strategies import gpu_arch

        arch = gpu_arch()
    return KernelCache(tmp_path_factory.mktemp("kernels_inputs"), arch)


DEVICE = "cpu" if INTERPRET or not HAS_CUDA else "cuda"

CHUNK = 4 if INTERPRET else 16  # tokens per chunk: tiny for the interpreter, C·R >= 16 rows for tensor-core dots
SPECS = {
    # SISO trapezoid (one lag), complex state: the initial state has angle, ssm, k and v
    "trap": make_spec(N=16, P=8, R=1, chunk=CHUNK, init=True, varlen=True),
    # MIMO rank 2, constant λ, halved rotation
    "mimo": make_spec(lam="constant", lam_value=0.5, N=16, P=8, R=2, chunk=CHUNK // 2, init=True, varlen=True,
                      rotation="halved"),
    # exp_euler real state: no lags, no angle
    "euler": make_spec(rule="exp_euler", kind="real", N=16, P=8, chunk=CHUNK, init=True, varlen=True),
}


# ------------------------------------------------------------------------------------------------------------------
# the NaN poison
# ------------------------------------------------------------------------------------------------------------------
def test_empty_is_nan_poisoned(nan_poisoned_empty):
    if not nan_poisoned_empty:
        pytest.skip("MAMBA3_GEN_NO_POISON=1 turned the poison off")
    assert torch.isnan(torch.empty(3, 4)).all()
    assert torch.isnan(torch.empty((2,), dtype=torch.bfloat16)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(5))).all()
    assert torch.empty(3, dtype=torch.int32).dtype == torch.int32  # integers are left alone (no NaN exists)


# ------------------------------------------------------------------------------------------------------------------
# zero-length sequences and L == 0
# ------------------------------------------------------------------------------------------------------------------
LENGTHS = [[0, 5, 0, 3, 0], [6, 0], [0, 9], [0], [0, 0, 0], [4, 0, 0, 5]]


def _check_state_copied(got_state, init, lengths):
    """Every zero-length sequence's final state is its initial state, bit for bit (or zero without one)."""
    for i, n in enumerate(lengths):
        if n:
            continue
        for f in ("angle", "ssm", "k", "v"):
            got = getattr(got_state, f)
            if got is None:
                continue
            want = getattr(init, f)[i] if init is not None else torch.zeros_like(got[i])
            assert torch.equal(got[i].float(), want.float().to(got.device)), f"sequence {i} (empty): state.{f}"


@pytest.mark.parametrize("with_init", [True, False], ids=["init", "zero"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: "-".join(map(str, x)))
@pytest.mark.parametrize("which", sorted(SPECS))
def test_zero_length_sequences_match_recurrence(kernels, which, lengths, with_init):
    spec = SPECS[which]
    module = kernels(spec)
    kw = make_inputs(spec, 1, 0, 2, nseq_lengths=lengths, with_initial_states=with_init, seed=len(lengths),
                     device=DEVICE)
    out, state = module.mamba3_forward(**kw, return_final_states=True)
    ref = naive_recurrence(spec, **to_float64(kw))
    assert out.shape == (1, sum(lengths), 2, 8)
    assert_matches((out, state), ref, TOL, what=f"lengths {lengths}")
    _check_state_copied(state, kw.get("initial_states"), lengths)


@pytest.mark.parametrize("which", sorted(SPECS))
def test_no_tokens_without_varlen(kernels, which):
    """L == 0 in a batch: no output rows, and each row's final state is its initial state."""
    spec = SPECS[which]
    module = kernels(spec)
    kw = make_inputs(spec, 2, 0, 2, with_initial_states=True, device=DEVICE)
    out, state = module.mamba3_forward(**kw, return_final_states=True)
    assert out.shape == (2, 0, 2, 8)
    assert_matches((out, state), naive_recurrence(spec, **to_float64(kw)), TOL)
    _check_state_copied(state, kw["initial_states"], [0, 0])


# ------------------------------------------------------------------------------------------------------------------
# cu_seqlens: structure (host, no values read) and values
# ------------------------------------------------------------------------------------------------------------------
class TestCuSeqlens:
    @staticmethod
    def call(kernels, cu, L=8):
        spec = SPECS["trap"]
        kw = make_inputs(spec, 1, L, 2, device=DEVICE)
        return kernels(spec).mamba3_forward(**kw, cu_seqlens=cu)

    @pytest.mark.parametrize("cu, pattern", [
        (torch.tensor(8, dtype=torch.int32), r"^cu_seqlens has shape \(\) \(0-D\); expected \(NS \+ 1,\)"),
        ([0, 8], r"^cu_seqlens must be a 1-D torch.Tensor \(NS \+ 1,\) of int32/int64 offsets.*; got list"),
        ((0, 8), r"^cu_seqlens must be a 1-D torch.Tensor .*; got tuple"),
        (torch.tensor([[0, 8]], dtype=torch.int32), r"^cu_seqlens has shape \(1, 2\) \(2-D\); expected \(NS \+ 1,\)"),
        (torch.tensor([0], dtype=torch.int32), r"^cu_seqlens has shape \(1,\); expected \(NS \+ 1,\) with NS >= 1"),
        (torch.tensor([0.0, 8.0]), r"^cu_seqlens has dtype torch.float32; expected torch.int32 or torch.int64"),
        (torch.tensor([0, 8], dtype=torch.int16), r"^cu_seqlens has dtype torch.int16; expected torch.int32"),
    ], ids=["0d", "list", "tuple", "2d", "one-offset", "float", "int16"])
    def test_structure(self, kernels, cu, pattern):
        if isinstance(cu, torch.Tensor):
            cu = cu.to(DEVICE)
        with pytest.raises(InputError, match=pattern):
            self.call(kernels, cu)

    @pytest.mark.parametrize("only_v", [False, True], ids=["all-B2", "v-B2"])
    def test_batch_of_two_is_refused_first(self, kernels, only_v):
        """cu_seqlens with B = 2: the batch is named first (not another input's shape read off v's B)."""
        spec = SPECS["trap"]
        kw = make_inputs(spec, 1 if only_v else 2, 8, 2, device=DEVICE)
        if only_v:
            kw["v"] = torch.cat([kw["v"], kw["v"]])
        cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
        with pytest.raises(InputError) as info:
            kernels(spec).mamba3_forward(**kw, cu_seqlens=cu)
        assert str(info.value) == ("varlen packs sequences along L: v must have B = 1 when cu_seqlens is given; "
                                   "got B = 2")

    def test_other_device(self):
        cu = torch.tensor([0, 8], dtype=torch.int32, device="meta")
        with pytest.raises(InputError, match=r"^cu_seqlens is on meta; expected cpu like v"):
            check_cu_seqlens(cu, torch.device("cpu"))

    @interpreter_only
    @pytest.mark.parametrize("cu, pattern", [
        ([1, 8], r"cu_seqlens\[0\] is 1 in \[1, 8\]"),
        ([0, 7], r"cu_seqlens\[-1\] is 7 in \[0, 7\]"),
        ([0, 5, 3, 8], r"cu_seqlens\[2\] = 3 < cu_seqlens\[1\] = 5 in \[0, 5, 3, 8\]"),
        ([0, 9, 8], r"cu_seqlens\[2\] = 8 < cu_seqlens\[1\] = 9"),
    ], ids=["start", "end", "decreasing", "past-L"])
    def test_values_on_cpu(self, kernels, cu, pattern):
        with pytest.raises(InputError, match=r"^cu_seqlens must start at 0, end at L=8 .*never decrease.*" + pattern):
            self.call(kernels, torch.tensor(cu, dtype=torch.int64))

    def test_int64_and_noncontiguous_accepted(self, kernels):
        spec = SPECS["trap"]
        kw = make_inputs(spec, 1, 0, 2, nseq_lengths=[3, 0, 5], device=DEVICE)
        wide = torch.tensor([0, 99, 3, 99, 3, 99, 8, 99], dtype=torch.int64, device=DEVICE)[::2]  # a strided view
        out = kernels(spec).mamba3_forward(**{**kw, "cu_seqlens": wide})
        assert_matches((out, None), (naive_recurrence(spec, **to_float64(kw))[0], None), TOL)


@gpu_only
@pytest.mark.gpu
class TestCuSeqlensOnGpu:
    """On a GPU the values of cu_seqlens are checked on the device: no host sync, so CUDA graphs capture it."""

    def test_check_does_not_sync(self):
        cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
        try:
            check_cu_seqlens_values(check_cu_seqlens(cu, cu.device), 8)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()

    def test_forward_does_not_sync_and_graph_captures(self, kernels):
        spec = SPECS["trap"]
        module = kernels(spec)
        lengths = [3, 0, 5]
        kw = make_inputs(spec, 1, 0, 2, nseq_lengths=lengths, with_initial_states=True, device="cuda")
        expected, _ = module.mamba3_forward(**kw, return_final_states=True)  # warm-up: autotune, JIT compile
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            module.mamba3_forward(**kw, return_final_states=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            captured, _ = module.mamba3_forward(**kw, return_final_states=True)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, expected)


def test_check_values_accepts_empty_sequences():
    check_cu_seqlens_values(torch.tensor([0, 0, 4, 4, 4, 9]), 9)  # raises on a violation
    with pytest.raises(InputError, match=r"cu_seqlens\[1\] = -1 < cu_seqlens\[0\] = 0"):
        check_cu_seqlens_values(torch.tensor([0, -1, 9]), 9)


# ------------------------------------------------------------------------------------------------------------------
# every argument: type, rank, dtype, device
# ------------------------------------------------------------------------------------------------------------------
TENSOR_ARGS = {  # the "mimo" spec (R = 2, constant λ): every tensor it takes, with its expected shape at B=1 L=5 H=2
    "q": r"\(1, 5, 2, 1, 16\)", "k": r"\(1, 5, 2, 1, 16\)", "adt": r"\(1, 2, 5\)", "dt": r"\(1, 2, 5\)",
    "q_bias": r"\(2, 2, 16\)", "k_bias": r"\(2, 2, 16\)", "angles": r"\(1, 5, 2, 4\)", "D": r"\(2,\)",
    "z": r"\(1, 5, 2, 8\)", "mimo_v": r"\(2, 2, 8\)", "mimo_z": r"\(2, 2, 8\)", "mimo_o": r"\(2, 2, 8\)",
}


class TestArguments:
    @staticmethod
    def call(kernels, **changes):
        spec = SPECS["mimo"]
        kw = make_inputs(spec, 1, 5, 2, device=DEVICE)
        kw.update(changes)
        return kernels(spec).mamba3_forward(**kw)

    @pytest.mark.parametrize("name", sorted(TENSOR_ARGS))
    def test_not_a_tensor(self, kernels, name):
        with pytest.raises(InputError, match=rf"^{name} must be a torch.Tensor of shape {TENSOR_ARGS[name]}, got list"):
            self.call(kernels, **{name: [0.0]})

    @pytest.mark.parametrize("name", sorted(TENSOR_ARGS))
    def test_wrong_rank(self, kernels, name):
        with pytest.raises(InputError, match=rf"^{name} has shape \(3,\); expected {TENSOR_ARGS[name]}"):
            self.call(kernels, **{name: torch.zeros(3, device=DEVICE)})

    @pytest.mark.parametrize("name", sorted(TENSOR_ARGS))
    def test_wrong_dtype(self, kernels, name):
        spec = SPECS["mimo"]
        good = make_inputs(spec, 1, 5, 2, device=DEVICE)[name]
        with pytest.raises(InputError, match=rf"^{name} has dtype torch.float64; expected one of"):
            self.call(kernels, **{name: good.double()})
        with pytest.raises(InputError, match=rf"^{name} has dtype torch.int64; expected one of"):
            self.call(kernels, **{name: good.long()})

    @pytest.mark.parametrize("name", sorted(TENSOR_ARGS))
    def test_wrong_device(self, kernels, name):
        spec = SPECS["mimo"]
        good = make_inputs(spec, 1, 5, 2, device=DEVICE)[name]
        with pytest.raises(InputError, match=rf"^{name} is on meta; expected {DEVICE}"):
            self.call(kernels, **{name: good.to("meta")})

    def test_v(self, kernels):
        with pytest.raises(InputError, match=r"^v must be a torch.Tensor of shape \(B, L, H, P=8\); got list"):
            self.call(kernels, v=[[0.0]])
        with pytest.raises(InputError, match=r"^v must be a torch.Tensor of shape \(B, L, H, P=8\); got shape \(5, 2, 8\)"):
            self.call(kernels, v=torch.zeros(5, 2, 8, device=DEVICE))
        with pytest.raises(InputError, match=r"^v has shape \(1, 5, 2, 7\); expected \(1, 5, 2, 8\)"):
            self.call(kernels, v=torch.zeros(1, 5, 2, 7, device=DEVICE))

    def test_flags_and_state_types(self, kernels):
        with pytest.raises(InputError, match=r"^return_final_states must be True or False; got str"):
            self.call(kernels, return_final_states="yes")
        with pytest.raises(InputError, match=r"^initial_states must be a Mamba3State\(angle, ssm, k, v\)"):
            self.call(kernels, initial_states=torch.zeros(1, 2, 8, 16, device=DEVICE))


# ------------------------------------------------------------------------------------------------------------------
# dtypes.input: other float dtypes are read as they are
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_other_input_dtypes_are_read_as_given(kernels, dtype):
    spec = respec(SPECS["trap"], dtypes={"input": "fp32", "compute": "fp32"})
    kw = make_inputs(spec, 1, 9, 2, device=DEVICE, seed=3)
    low = {key: (val.to(dtype) if key in ("q", "k", "v", "z") else val) for key, val in kw.items()}
    out = kernels(spec).mamba3_forward(**low)
    assert out.dtype == dtype  # the output takes v's dtype
    assert_matches((out, None), (naive_recurrence(spec, **to_float64(low))[0], None), BF16_TOL)


# ------------------------------------------------------------------------------------------------------------------
# bf16 in the Triton interpreter (item 5)
# ------------------------------------------------------------------------------------------------------------------
@interpreter_only
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=["fp32-in", "bf16-in"])
def test_bf16_compute_in_interpreter_matches_recurrence(kernels, input_dtype):
    from mamba3_gen.runtime.interpreter import installed

    assert installed()
    spec = respec(make_spec(N=16, P=8, R=2, chunk=4), dtypes={"compute": "bf16"})
    kw = make_inputs(spec, 1, 9, 2, seed=1)
    kw = {key: (val.to(input_dtype) if key in ("q", "k", "v", "z") else val) for key, val in kw.items()}
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = kernels(spec).mamba3_forward(**kw)
    ref, _ = naive_recurrence(spec, **to_float64(kw))
    assert rel_err(out, ref) < BF16_TOL.rel, "bf16 dot operands must be computed, not their raw bits multiplied"
    assert_matches((out, None), (ref, None), BF16_TOL)  # the warning (once per process): test_interpreter_bf16_kernels


@interpreter_only
def test_interpreter_bf16_kernels():
    """The patched interpreter: fp32 -> bf16 rounds to nearest even like torch (and the GPU), bf16 -> fp32 is
    exact, and tl.dot on bf16 operands equals the fp32 product of the bf16 values."""
    import triton
    import triton.language as tl

    from mamba3_gen.runtime import interpreter

    @triton.jit
    def cast_kernel(x_ptr, y_ptr, z_ptr, n: tl.constexpr):
        i = tl.arange(0, n)
        x = tl.load(x_ptr + i)
        y = x.to(tl.bfloat16)
        tl.store(y_ptr + i, y)
        tl.store(z_ptr + i, y.to(tl.float32))

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, n: tl.constexpr):
        i = tl.arange(0, n)
        a = tl.load(a_ptr + i[:, None] * n + i[None, :]).to(tl.bfloat16)
        b = tl.load(b_ptr + i[:, None] * n + i[None, :]).to(tl.bfloat16)
        tl.store(c_ptr + i[:, None] * n + i[None, :], tl.dot(a, b))

    # halfway and near-halfway cases, a mantissa carry into the exponent, NaN, ±inf, a subnormal
    x = torch.tensor([1 + 2**-8, 1 + 3 * 2**-9, 1 + 2**-9, 2 - 2**-9, 3.0e38, float("inf"), -float("inf"),
                      float("nan"), 1e-40, -2.5, 0.0, 65504.0, 1 / 3, -7.0e-3, 1e30, 123.456], dtype=torch.float32)
    y = torch.empty(16, dtype=torch.bfloat16)
    z = torch.empty(16, dtype=torch.float32)
    cast_kernel[(1,)](x, y, z, 16)
    want = x.to(torch.bfloat16)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16)), (y, want)
    assert torch.equal(z.nan_to_num(), want.float().nan_to_num())

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 16, generator=gen), torch.randn(16, 16, generator=gen)
    c = torch.empty(16, 16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        interpreter._STATE["warned"] = False  # say it again for this test
        dot_kernel[(1,)](a, b, c, 16)
        dot_kernel[(1,)](a, b, c, 16)
    said = [w for w in seen if issubclass(w.category, interpreter.InterpreterPrecisionWarning)]
    assert len(said) == 1 and "bf16" in str(said[0].message)
    want = a.bfloat16().double() @ b.bfloat16().double()
    # fp32 accumulation of 16 exact products: relative error ~16 * 2^-24 of the sum of magnitudes
    assert torch.allclose(c.double(), want, rtol=1e-5, atol=1e-5)
