"""Variants for `benchmarks/ablate.py`: the forward's in-chunk decays (decay_weights) without the double-float scans,
and the rotation's cost once Θ comes from memory (bf16 dot operands; SISO and MIMO specs with one lag, J = 1).

- ``segdot``: the [C, C] segment sums Σ_{s+J < r ≤ t} a_r as one product of the 0/1 lower-triangular matrix with
  the masked steps, split into a tf32 high part and its remainder (two tf32 dots, ~2^-21 relative per term; every
  term has the same sign, so no cancellation); the decay of token s to the chunk's end is a column sum of the same
  masked steps; cs_t and the chunk's whole decay are plain fp32 scan / sum (a prefix from the chunk's start: its
  rounding is relative to the decay itself). A step that decays to zero enters the product as −1e30 (exp gives 0);
  NaN / +inf enter it as 0 and reach the rows after them through cs_t (exp(NaN)·Q·H), as the scans did.
  Predicted (sm_90a SASS, SISO bf16 PREPPED loop 1546 instructions without the rare path): about −170, −10 % of
  the fused kernel.
- ``theta_load`` (inline rotation only; wrong outputs on purpose, it measures a cost): the angles are read as Θ,
  skipping tanh, the in-chunk cumsum and the carry; sin/cos and the rotation stay. The time a "Θ pre-pass" design
  (the pre-pass writes Θ, 4 bytes per token and pair, instead of Q̂, K̂ per head) would leave in the main kernels.

    python benchmarks/ablate.py siso_trap_complex --variants benchmarks/variants/segsum_dot.py \
        --modes fused/prepass,fused/inline --write-only --out DIR          # then --no-write on the GPU
"""
BF16 = ["dtypes.compute=bf16"]

_SCANS = '''a_rest = tl.where(i_c == 0, 0.0, a0)
zero_inf = a_rest == float("-inf")
a_fin = tl.where(zero_inf, 0.0, a_rest)
hi_tok, lo_tok = tl.associative_scan((a_fin, zero_c), 0, two_sum)  # [C] Σ a over steps c0+1 .. t, as hi + lo
hi_end, lo_end = tl.reduce((a_fin, zero_c), 0, two_sum)  # to the chunk's end (a masked tail adds 0)
n_zero = tl.cumsum(zero_inf.to(tl.int32), axis=0)  # [C] decays to zero in steps c0+1 .. t
n_zero_end = tl.sum(zero_inf.to(tl.int32), axis=0)
cs_tok = tl.where(n_zero > 0, float("-inf"), hi_tok + lo_tok)  # [C]
cs_last = tl.where(n_zero_end > 0, float("-inf"), hi_end + lo_end)  # decay from step c0 to the chunk's end
# the same sums at step t + J, where token t's whole input has landed
hi_in, lo_in, n_zero_in = hi_tok, lo_tok, n_zero
hi_in, lo_in = two_sum(hi_in, lo_in, tl.where(a_s1 == float("-inf"), 0.0, a_s1), zero_c)
n_zero_in += (a_s1 == float("-inf")).to(tl.int32)
# [C, C] Σ_{r=s+J+1..t} a_r: the decay of token s's whole input up to step t (0 up to step s + J)
seg = (hi_tok[:, None] - hi_in[None, :]) + (lo_tok[:, None] - lo_in[None, :])
seg = tl.where(n_zero[:, None] == n_zero_in[None, :], seg, float("-inf"))
seg = tl.where(i_c[:, None] > i_c[None, :] + J, seg, 0.0)
'''

_DOT = '''a_rest = tl.where(i_c == 0, 0.0, a0)
cs_tok = tl.cumsum(a_rest, axis=0)  # [C] Σ a over steps c0+1 .. t
cs_last = tl.sum(a_rest, axis=0)  # decay from step c0 to the chunk's end
a_dot = tl.where(a_rest < float("inf"), tl.maximum(a_rest, -1e30), 0.0)
a_hi = (a_dot.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
after = i_c[:, None] > i_c[None, :] + J  # [C(r), C(s)]
upto = (i_c[:, None] >= i_c[None, :]).to(tl.float32)  # [C(t), C(r)]
seg = tl.dot(upto, tl.where(after, a_hi[:, None], 0.0), input_precision="tf32") \\
    + tl.dot(upto, tl.where(after, (a_dot - a_hi)[:, None], 0.0), input_precision="tf32")
seg = tl.where(after, seg, 0.0)
'''

_END_OLD = 'decay_end = tl.where(n_zero_end == n_zero_in, tl.exp((hi_end - hi_in) + (lo_end - lo_in)), 0.0)'
_END_NEW = 'decay_end = tl.exp(tl.sum(tl.where(after, a_dot[:, None], 0.0), axis=0))'

_THETA_OLD = '''step_angle = tl.where(i_n[None, :] < S, dt[:, None] * (PI * tanh(ang)), 0.0)
theta_t = theta[None, :] + tl.cumsum(step_angle, axis=0)  # [C, BN2] Θ_t, fp32
theta = theta + tl.sum(step_angle, axis=0)
theta = theta - TWO_PI * tl.floor(theta / TWO_PI)  # keep the carry in [0, 2π) so fp32 keeps its precision
'''
_THETA_NEW = '''theta_t = ang
'''


def _indent(text: str, pad: str) -> str:
    return "".join(pad + line if line.strip() else line for line in text.splitlines(keepends=True))


def _both(old: str, new: str) -> list[tuple[str, str]]:
    # the kernels' loop bodies (8 spaces) and the chunk helpers (4 spaces) render the stage at two indents
    return [(_indent(old, pad), _indent(new, pad)) for pad in ("        ", "    ")]


SEGDOT = _both(_SCANS, _DOT) + _both(_END_OLD, _END_NEW)
# the fused kernel (12 spaces), the chunk helper (8; both [C, BN2]) and the states kernel's pair blocks (16; [C, BLOCK_K])
THETA = [(_indent(_THETA_OLD, pad), _indent(_THETA_NEW, pad)) for pad in (" " * 12, " " * 8)] + [
    (_indent(_THETA_OLD.replace("BN2", "BLOCK_K"), " " * 16), _indent(_THETA_NEW, " " * 16))]

VARIANTS = {
    "base": {"sets": BF16},
    "segdot": {"sets": BF16, "edits": SEGDOT},
    "theta_load": {"sets": BF16, "edits": THETA},
    "segdot_theta": {"sets": BF16, "edits": SEGDOT + THETA},
}
