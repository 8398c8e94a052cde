"""fp32 math helpers shared by the generated Triton kernels (forward and step): the functions of the formula
grammar that Triton has no builtin for, and the rotation's cos/sin. On a GPU they use libdevice; the CPU
interpreter has no libdevice, so there they are built from tl.exp / tl.log with Kahan's compensation (a few ulps)."""
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from mamba3_gen.runtime.forward import INTERPRETING

TWO_PI = tl.constexpr(6.283185307179586)
INV_TWO_PI = tl.constexpr(0.15915494309189535)
LOG2E = tl.constexpr(1.4426950408889634)
NEG_2LOG2E = tl.constexpr(-2.8853900817779268)

if INTERPRETING:

    @triton.jit
    def cos_sin(theta):
        return tl.cos(theta), tl.sin(theta)

    @triton.jit
    def sigmoid(x):
        return tl.sigmoid(x)

    @triton.jit
    def exp_ftz(x):
        return tl.exp(x)

    @triton.jit
    def tanh(x):
        return 2.0 * sigmoid(2.0 * x) - 1.0

    @triton.jit
    def expm1(x):
        u = tl.exp(x)
        # Kahan: (u − 1)·x / log(u) cancels the rounding of u; exact branches where that form is 0/0 or inf/inf
        safe = (u != 1.0) & (u != 0.0) & (x < 80.0)
        den = tl.where(safe, tl.log(u), 1.0)
        return tl.where(safe, (u - 1.0) * x / den, tl.where(u == 0.0, -1.0, tl.where(x >= 80.0, u - 1.0, x)))

    @triton.jit
    def log1p(x):
        u = 1.0 + x
        safe = (u != 1.0) & (u != 0.0) & (u < 3.0e38)
        den = tl.where(safe, u - 1.0, 1.0)
        return tl.where(safe, tl.log(u) * x / den, tl.where(u == 1.0, x, tl.log(u)))

else:

    @triton.jit
    def cos_sin(theta):
        # MUFU sin/cos on Θ reduced to about [0, 2π), where their error is ~5e-7 (a product by 1/(2π), not an IEEE
        # division: a Θ that lands a rounding outside the range is as good for sin/cos)
        theta = theta - TWO_PI * tl.floor(theta * INV_TWO_PI)
        return libdevice.fast_cosf(theta), libdevice.fast_sinf(theta)

    @triton.jit
    def _exp2_ftz(x):
        # MUFU.EX2 alone: tl.exp's own ex2 (not ftz) adds a compare and two predicated multiplies per element to keep
        # results below 2^-126 (subnormal) instead of flushing them to 0
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)

    @triton.jit
    def _rcp_approx(x):
        # 1/x by MUFU.RCP alone (rcp.approx.ftz: 1 ulp; 1/inf = 0, a NaN stays NaN); x >= 1 where it is used here
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)

    @triton.jit
    def exp_ftz(x):
        # tl.exp (the same product by log2(e), the same ex2) with results below 2^-126 flushed to 0
        return _exp2_ftz(x * LOG2E)

    @triton.jit
    def sigmoid(x):
        # 1 / (1 + e^{−x}) with the approximate reciprocal (MUFU.RCP, 1 ulp; tl.sigmoid's IEEE division costs ~10
        # instructions and a branch per element, libdevice's fast_dividef a range fix-up: the fused bf16 loop's gate
        # 119 -> 78 instructions); e^{−x} = inf gives 0, as it should. e^{−x} is tl.exp's product by log2(e) and
        # ex2, flushed below 2^-126 where 1 + e^{−x} rounds to 1 anyway: the same values, 3 instructions fewer
        # (x·(−log2 e) saves the negation too, but tipped mimo_r4_init's dstate over its spill bound, 144 B on sm_90a)
        return _rcp_approx(1.0 + _exp2_ftz(-x * LOG2E))

    @triton.jit
    def tanh(x):
        # 2σ(2x) − 1 with σ's terms inline: −2·log2(e) in one constant (the same product: 2 is a power of two)
        return 2.0 * _rcp_approx(1.0 + _exp2_ftz(x * NEG_2LOG2E)) - 1.0

    @triton.jit
    def expm1(x):
        return libdevice.expm1(x)

    @triton.jit
    def log1p(x):
        return libdevice.log1p(x)


@triton.jit
def two_sum(hi1, lo1, hi2, lo2):
    """(hi1 + lo1) + (hi2 + lo2) as an unevaluated fp32 pair (hi, lo), hi the rounded sum and lo what rounding left
    out (Knuth's TwoSum, exact in fp32 arithmetic without reassociation). As the combine of a scan or reduction it
    keeps a sum of n terms to ~n·u² of their magnitude (u = 2^-24): a later difference of two such sums is then exact
    to u of the difference itself, however large the sums (used for the decay segment sums)."""
    s = hi1 + hi2
    bp = s - hi1
    err = (hi1 - (s - bp)) + (hi2 - bp)
    return s, err + (lo1 + lo2)


@triton.jit
def softplus(x):
    # log(1 + e^x) without overflow: max(x, 0) + log1p(e^{−|x|})
    return tl.maximum(x, 0.0) + log1p(tl.exp(-tl.abs(x)))
