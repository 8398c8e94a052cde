"""Variants for `benchmarks/ablate.py`: the rotation pre-pass's walk (bf16 dot operands), fewer instructions per block
and the next block's loads in flight during this one.

    python benchmarks/ablate.py siso_trap_complex --variants benchmarks/variants/prep_walk.py --modes fused/prepass
    python benchmarks/ablate.py mimo_r4 --variants benchmarks/variants/prep_walk.py --modes chunked/prepass \
        --only m_base,m_dotcum,m_prefetch,m_all

Each variant rewrites the prep kernel's block loop of the spec's generated `fwd.py` (bf16 build: run
`mamba3-gen build --set dtypes.compute=bf16` or the ablation's own build first; the loop text is read from
`generated/<spec>/fwd.py` at import, so write the variant modules here with --write-only):
- ``dotcum``: the in-block token cumsum of the step angles as a lower-triangular dot of their tf32 hi/lo split (two
  tf32 dots, fp32 accumulation: exact to ~2^-21 of each step) instead of `tl.cumsum`'s shuffle/shared-memory scan;
- ``bias``: (pairwise SISO) the per-head bias added to the loaded [ROWS, 2·BLOCK_K] row before the pair split, in the
  load's layout (today it is split first and each half's bias converted between layouts every block);
- ``prefetch``: the next block's Δ, Q, K and angle loads issued before this block's arithmetic (kept in registers
  across the iteration);
- ``t32``: (SISO) 32-token blocks, for the registers the prefetch takes;
- ``st2``: the block loop as `tl.range(..., num_stages=2)`: Triton's pipeliner stages the loads through shared
  memory (cp.async), the same overlap without the registers.
"""
from pathlib import Path

BF16 = ["dtypes.compute=bf16"]
_ROOT = Path(__file__).resolve().parents[2]
_HEAD = "    for c0 in range(bos, eos, C):\n"
_ST2 = "    for c0 in tl.range(bos, eos, C, num_stages=2):\n"
_END = "tl.store(k_hat_ptr + qh_off_b, k_b.to(k_hat_ptr.dtype.element_ty), mask=mask_rn)\n"
CUMSUM = "theta_t = theta[None, :] + tl.cumsum(step_angle, axis=0)  # [C, BLOCK_K] Θ_t, fp32\n"
DOTCUM = """tri = (i_c[:, None] >= i_c[None, :]).to(tl.float32)  # [C, C] lower triangle
            sa_hi = (step_angle.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # tf32-exact part
            theta_t = theta[None, :] + (tl.dot(tri, sa_hi, input_precision="tf32")
                                        + tl.dot(tri, step_angle - sa_hi, input_precision="tf32"))  # [C, BLOCK_K]
"""


def _loop(spec: str) -> str:
    text = (_ROOT / "generated" / spec / "fwd.py").read_text()
    prep = text[text.index("def mamba3_rotate_prep_kernel("):]
    start = prep.index(_HEAD)
    return prep[start:prep.index(_END, start) + len(_END)]


def _angles(cumsum: bool, t: str = "t", mask_t: str = "mask_t") -> str:
    return f"""        if pid_k * BLOCK_K < S:
            step_angle = tl.where(i_n[None, :] < S, dt[:, None] * (PI * tanh(ang)), 0.0)
            {DOTCUM if not cumsum else CUMSUM}            theta = theta + tl.sum(step_angle, axis=0)
            theta = theta - TWO_PI * tl.floor(theta / TWO_PI)
            cos, sin = cos_sin(theta_t)
            cos = _rows2d(cos, BLOCK_K)  # [ROWS, BLOCK_K]
            sin = _rows2d(sin, BLOCK_K)
        else:
            cos = tl.full([ROWS, BLOCK_K], 1.0, tl.float32)
            sin = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
"""


_TAIL = """        q_a, q_b = q_a * cos - q_b * sin, q_a * sin + q_b * cos
        k_a, k_b = k_a * cos - k_b * sin, k_a * sin + k_b * cos
        qh_base = (((b.to(tl.int64) * H + pid_h) * L + c0) * R + 0) * N
        qh_row = i_row * N  # [ROWS]
        qh_off_a = qh_base + qh_row[:, None] + hat_a[None, :]  # [ROWS, BLOCK_K]
        qh_off_b = qh_base + qh_row[:, None] + hat_b[None, :]
        tl.store(q_hat_ptr + qh_off_a, q_a.to(q_hat_ptr.dtype.element_ty), mask=mask_rn)
        tl.store(q_hat_ptr + qh_off_b, q_b.to(q_hat_ptr.dtype.element_ty), mask=mask_rn)
        tl.store(k_hat_ptr + qh_off_a, k_a.to(k_hat_ptr.dtype.element_ty), mask=mask_rn)
        tl.store(k_hat_ptr + qh_off_b, k_b.to(k_hat_ptr.dtype.element_ty), mask=mask_rn)
"""
_ANG = ("tl.load(angles_ptr + b.to(tl.int64) * angles_sb + {t}[:, None] * angles_st + pid_h * angles_sh + i_n[None, :],"
        " mask={m}[:, None] & (i_n[None, :] < S), other=0.0)")


def siso_loop(cumsum: bool = True, bias: bool = False, prefetch: bool = False) -> str:
    """The pairwise SISO prep loop (one bias row per head), rewritten."""
    load = ("tl.load({p}_ptr + {base} + qk_row[:, None] + dim_ab[None, :], "
            "mask={mr}[:, None] & (dim_ab < N)[None, :], other=0.0)")
    if bias:
        pre = """    q_bias_ab = tl.load(q_bias_ptr + pid_h * N + dim_ab, mask=dim_ab < N, other=0.0)[None, :]
    k_bias_ab = tl.load(k_bias_ptr + pid_h * N + dim_ab, mask=dim_ab < N, other=0.0)[None, :]
"""
        split = """        q_a, q_b = tl.split(tl.reshape(q_raw.to(tl.float32) + q_bias_ab, (ROWS, BLOCK_K, 2)))
        k_a, k_b = tl.split(tl.reshape(k_raw.to(tl.float32) + k_bias_ab, (ROWS, BLOCK_K, 2)))
"""
    else:
        pre = ""
        split = """        q_a, q_b = tl.split(tl.reshape(q_raw.to(tl.float32), (ROWS, BLOCK_K, 2)))
        k_a, k_b = tl.split(tl.reshape(k_raw.to(tl.float32), (ROWS, BLOCK_K, 2)))
        q_a, q_b = q_a + tl.load(q_bias_ptr + pid_h * N + dim_a, mask=mask_n, other=0.0)[None, :], q_b + tl.load(q_bias_ptr + pid_h * N + dim_b, mask=mask_n, other=0.0)[None, :]
        k_a, k_b = k_a + tl.load(k_bias_ptr + pid_h * N + dim_a, mask=mask_n, other=0.0)[None, :], k_b + tl.load(k_bias_ptr + pid_h * N + dim_b, mask=mask_n, other=0.0)[None, :]
"""
    common = """        tok0 = tok_base + c0
        t = c0 + i_c
        mask_t = t < eos
        mask_row = (c0 + row_t) < eos  # [ROWS]
        mask_rn = mask_row[:, None] & mask_n[None, :]
"""
    qk_row = "    qk_row = i_row * (G * N)  # [ROWS]\n"
    if not prefetch:
        body = (common + "        qk_base = (tok0 * R * G + g) * N\n"
                + "        dt = tl.load(dt_ptr + step_base + t, mask=mask_t, other=0.0).to(tl.float32)\n"
                + f"        q_raw = {load.format(p='q', base='qk_base', mr='mask_row')}\n"
                + f"        k_raw = {load.format(p='k', base='qk_base', mr='mask_row')}\n"
                + f"        ang = {_ANG.format(t='t', m='mask_t')}.to(tl.float32)\n")
        return pre + qk_row + _HEAD + body + split + _angles(cumsum) + _TAIL
    first = ("    t1 = bos + i_c\n    mask_t1 = t1 < eos\n    mask_row1 = (bos + row_t) < eos\n"
             "    qk_base1 = ((tok_base + bos) * R * G + g) * N\n"
             "    nx_dt = tl.load(dt_ptr + step_base + t1, mask=mask_t1, other=0.0)\n"
             f"    nx_q = {load.format(p='q', base='qk_base1', mr='mask_row1')}\n"
             f"    nx_k = {load.format(p='k', base='qk_base1', mr='mask_row1')}\n"
             f"    nx_ang = {_ANG.format(t='t1', m='mask_t1')}\n")
    nxt = ("        dt = nx_dt.to(tl.float32)\n        q_raw = nx_q\n        k_raw = nx_k\n"
           "        ang = nx_ang.to(tl.float32)\n"
           "        c1 = c0 + C  # the next block's loads, in flight during this block's arithmetic\n"
           "        t1 = c1 + i_c\n        mask_t1 = t1 < eos\n        mask_row1 = (c1 + row_t) < eos\n"
           "        qk_base1 = ((tok_base + c1) * R * G + g) * N\n"
           "        nx_dt = tl.load(dt_ptr + step_base + t1, mask=mask_t1, other=0.0)\n"
           f"        nx_q = {load.format(p='q', base='qk_base1', mr='mask_row1')}\n"
           f"        nx_k = {load.format(p='k', base='qk_base1', mr='mask_row1')}\n"
           f"        nx_ang = {_ANG.format(t='t1', m='mask_t1')}\n")
    return pre + qk_row + first + _HEAD + common + nxt + split + _angles(cumsum) + _TAIL


def mimo_loop(cumsum: bool = True, prefetch: bool = False) -> str:
    """The halved MIMO prep loop (bias rows per head and rank), rewritten."""
    loads = {f"{p}_{h}": f"tl.load({p}_ptr + {{base}} + qk_row[:, None] + dim_{h}[None, :], mask={{mr}}[:, None] & mask_n[None, :], other=0.0)"
             for p in "qk" for h in "ab"}
    bias = """        q_a = q_a.to(tl.float32) + tl.load(q_bias_ptr + bias_row + dim_a[None, :], mask=mask_n[None, :], other=0.0)
        q_b = q_b.to(tl.float32) + tl.load(q_bias_ptr + bias_row + dim_b[None, :], mask=mask_n[None, :], other=0.0)
        k_a = k_a.to(tl.float32) + tl.load(k_bias_ptr + bias_row + dim_a[None, :], mask=mask_n[None, :], other=0.0)
        k_b = k_b.to(tl.float32) + tl.load(k_bias_ptr + bias_row + dim_b[None, :], mask=mask_n[None, :], other=0.0)
"""
    common = """        tok0 = tok_base + c0
        t = c0 + i_c
        mask_t = t < eos
        mask_row = (c0 + row_t) < eos  # [ROWS]
        mask_rn = mask_row[:, None] & mask_n[None, :]
"""
    pre = "    qk_row = i_row * (G * N)  # [ROWS]\n    bias_row = ((pid_h * R + row_r) * N)[:, None]\n"
    if not prefetch:
        body = (common + "        qk_base = (tok0 * R * G + g) * N\n"
                + "        dt = tl.load(dt_ptr + step_base + t, mask=mask_t, other=0.0).to(tl.float32)\n"
                + "".join(f"        {n} = {v.format(base='qk_base', mr='mask_row')}\n" for n, v in loads.items())
                + f"        ang = {_ANG.format(t='t', m='mask_t')}.to(tl.float32)\n")
        return pre + _HEAD + body + bias + _angles(cumsum) + _TAIL
    first = ("    t1 = bos + i_c\n    mask_t1 = t1 < eos\n    mask_row1 = (bos + row_t) < eos\n"
             "    qk_base1 = ((tok_base + bos) * R * G + g) * N\n"
             "    nx_dt = tl.load(dt_ptr + step_base + t1, mask=mask_t1, other=0.0)\n"
             + "".join(f"    nx_{n} = {v.format(base='qk_base1', mr='mask_row1')}\n" for n, v in loads.items())
             + f"    nx_ang = {_ANG.format(t='t1', m='mask_t1')}\n")
    nxt = ("        dt = nx_dt.to(tl.float32)\n        ang = nx_ang.to(tl.float32)\n"
           + "".join(f"        {n} = nx_{n}\n" for n in loads)
           + "        c1 = c0 + C  # the next block's loads, in flight during this block's arithmetic\n"
           "        t1 = c1 + i_c\n        mask_t1 = t1 < eos\n        mask_row1 = (c1 + row_t) < eos\n"
           "        qk_base1 = ((tok_base + c1) * R * G + g) * N\n"
           "        nx_dt = tl.load(dt_ptr + step_base + t1, mask=mask_t1, other=0.0)\n"
           + "".join(f"        nx_{n} = {v.format(base='qk_base1', mr='mask_row1')}\n" for n, v in loads.items())
           + f"        nx_ang = {_ANG.format(t='t1', m='mask_t1')}\n")
    return pre + first + _HEAD + common + nxt + bias + _angles(cumsum) + _TAIL


PREP_SISO = 'triton.Config({"BLOCK_P": 1, "BLOCK_K": 32, "BLOCK_T": 64}, num_warps=4, num_stages=1),'
T32 = (PREP_SISO, PREP_SISO.replace('"BLOCK_T": 64', '"BLOCK_T": 32'))
PREP_MIMO = 'triton.Config({"BLOCK_P": 1, "BLOCK_K": 32, "BLOCK_T": 16}, num_warps=4, num_stages=1),'
W8 = (PREP_MIMO, PREP_MIMO.replace("num_warps=4", "num_warps=8"))


def _v(spec: str, new: str, *extra) -> dict:
    try:
        old = _loop(spec + "_bf")
    except (OSError, ValueError):  # not built here: the variant is listed but cannot be written
        old = "<generated/%s_bf/fwd.py missing>" % spec
    return {"sets": BF16, "edits": [(old, new), *extra]}


VARIANTS = {
    "s_base": {"sets": BF16},
    "s_same": _v("siso_trap_complex", siso_loop()),  # the rewrite itself, nothing changed: must time as s_base
    "s_dotcum": _v("siso_trap_complex", siso_loop(cumsum=False)),
    "s_bias": _v("siso_trap_complex", siso_loop(bias=True)),
    "s_prefetch": _v("siso_trap_complex", siso_loop(prefetch=True)),
    "s_prefetch_t32": _v("siso_trap_complex", siso_loop(prefetch=True), T32),
    "s_all": _v("siso_trap_complex", siso_loop(cumsum=False, bias=True, prefetch=True)),
    "s_all_t32": _v("siso_trap_complex", siso_loop(cumsum=False, bias=True, prefetch=True), T32),
    "s_base_t32": {"sets": BF16, "edits": [T32]},
    "s_st2": _v("siso_trap_complex", siso_loop().replace(_HEAD, _ST2)),  # Triton's pipeliner (cp.async)
    "s_st2_t32": _v("siso_trap_complex", siso_loop().replace(_HEAD, _ST2), T32),
    "s_dotcum_bias": _v("siso_trap_complex", siso_loop(cumsum=False, bias=True)),
    "m_base": {"sets": BF16},
    "m_same": _v("mimo_r4", mimo_loop()),
    "m_dotcum": _v("mimo_r4", mimo_loop(cumsum=False)),
    "m_prefetch": _v("mimo_r4", mimo_loop(prefetch=True)),
    "m_all": _v("mimo_r4", mimo_loop(cumsum=False, prefetch=True)),
    "m_base_w8": {"sets": BF16, "edits": [W8]},
    "m_st2": _v("mimo_r4", mimo_loop().replace(_HEAD, _ST2)),
    "m_c32": {"sets": BF16 + ["dims.chunk_size=32"]},  # the forward's chunk (fwd-only MIMO was faster at 32 in tf32)
    "m_prefetch_w8": _v("mimo_r4", mimo_loop(prefetch=True), W8),
}

# After the template change (2026-12-06: the tri-dot cumsum and, pairwise, the bias before the split, in the pre-pass
# only; the pipelined walk as LOOP_STAGES in the prep configs): the tree as built, and its first config pipelined.
_NEW_S = 'triton.Config({"BLOCK_P": 1, "BLOCK_K": 32, "BLOCK_T": 64, "LOOP_STAGES": 1}, num_warps=4, num_stages=1),'
_NEW_M = 'triton.Config({"BLOCK_P": 1, "BLOCK_K": 32, "BLOCK_T": 16, "LOOP_STAGES": 1}, num_warps=4, num_stages=1),'
VARIANTS.update({
    "n_s": {"sets": BF16},
    "n_s_st2": {"sets": BF16, "edits": [(_NEW_S, _NEW_S.replace('"LOOP_STAGES": 1', '"LOOP_STAGES": 2'))]},
    "n_m": {"sets": BF16},
    "n_m_w8": {"sets": BF16, "edits": [(_NEW_M, _NEW_M.replace("num_warps=4", "num_warps=8"))]},
})
