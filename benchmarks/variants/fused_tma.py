"""Variants for `benchmarks/ablate.py`: the fused forward's chunk loads through tensor descriptors (TMA on sm_90),
for a SISO spec after the rotation pre-pass (run with --modes fused/prepass):

    python benchmarks/ablate.py siso_trap_complex --variants benchmarks/variants/fused_tma.py --modes fused/prepass

The official SISO kernel loads its chunk tiles through descriptors (`q_store_desc.load([chunk_start, 0])`) and
autotunes num_stages 1-3; ours computes every element's address and waits on the loads (ncu: ~44 % of stalls on
L1TEX scoreboards). tma_vz: V and Z; tma_qk: the pre-pass's Q̂, K̂ (head-major (B, H, L, N): a [C, N/2] box per
half); tma: both; *_s2: two stages (the loop's loads issued a chunk ahead). Masks are applied after the load (the
descriptor zero-fills past L; a packed sequence's last chunk reads the next sequence's rows). The descriptors are
made in the kernel: ablate.py gives Triton an allocator. SISO only (R = 1: a chunk's rows are its tokens).
"""
ANCHOR = "kp1_0_b[None, :]\n\n    for c0 in range(bos, eos, C):"  # the fused (and states) kernel's loop, after fold_init
DESCS = {
    "vz": ("    v_desc = tl.make_tensor_descriptor(v_ptr, shape=[b + 1, L, H * P], strides=[L * H * P, H * P, 1], "
           "block_shape=[1, C, BLOCK_P])\n"
           "    z_desc = tl.make_tensor_descriptor(z_ptr, shape=[b + 1, L, H * P], strides=[L * H * P, H * P, 1], "
           "block_shape=[1, C, BLOCK_P])\n"),
    "qk": ("    bh_i = b * H + pid_h\n"
           "    q_desc = tl.make_tensor_descriptor(q_ptr, shape=[bh_i + 1, L, N], strides=[L * N, N, 1], "
           "block_shape=[1, C, BN2])\n"
           "    k_desc = tl.make_tensor_descriptor(k_ptr, shape=[bh_i + 1, L, N], strides=[L * N, N, 1], "
           "block_shape=[1, C, BN2])\n"),
}
TILE = "tl.reshape({d}.load([{row}, c0_i, {col}]), ({rows}, {cols}))"


def _vz() -> list:
    out = []
    for t in ("v", "z"):
        old = f"{t}_tok = tl.load({t}_ptr + hp_base + tok_hp, mask=mask_tp, other=0.0).to(tl.float32)  # [C, BLOCK_P]"
        tile = TILE.format(d=f"{t}_desc", row="b", col="pid_h * P + pid_p * BLOCK_P", rows="C", cols="BLOCK_P")
        out.append((old, f"{t}_tok = tl.where(mask_tp, {tile}, 0.0).to(tl.float32)  # [C, BLOCK_P] (TMA)"))
    return out


def _qk() -> list:
    out = []
    for t in ("q", "k"):
        for half, col in (("a", "0"), ("b", "N2")):
            old = (f"{t}_{half} = tl.load({t}_ptr + qk_base + qk_row[:, None] + hat_{half}[None, :], mask=mask_rn, "
                   f"other=0.0).to(tl.float32)")
            tile = TILE.format(d=f"{t}_desc", row="bh_i", col=col, rows="ROWS", cols="BN2")
            out.append((old, f"{t}_{half} = tl.where(mask_rn, {tile}, 0.0).to(tl.float32)"))
    return out


def _descs(*which: str) -> list:
    loop = ANCHOR.replace("    for c0", "".join(DESCS[w] for w in which) + "    for c0")
    return [(ANCHOR, loop + "\n        c0_i = tl.cast(c0, tl.int32)  # descriptor coordinates are int32")]


FIRST = 'triton.Config({"BLOCK_P": 64}, num_warps=8, num_stages=1),'
S2 = [(FIRST, FIRST.replace("num_stages=1", "num_stages=2"))]
BF16 = ["dtypes.compute=bf16"]
VARIANTS = {
    "tma_vz": {"edits": _descs("vz") + _vz()},
    "tma_qk": {"edits": _descs("qk") + _qk()},
    "tma": {"edits": _descs("vz", "qk") + _vz() + _qk()},
    "tma_s2": {"edits": _descs("vz", "qk") + _vz() + _qk() + S2},
    "bf16": {"sets": BF16},
    "bf16_tma": {"sets": BF16, "edits": _descs("vz", "qk") + _vz() + _qk()},
    "bf16_tma_s2": {"sets": BF16, "edits": _descs("vz", "qk") + _vz() + _qk() + S2},
    "bf16_s2": {"sets": BF16, "edits": S2},
}
