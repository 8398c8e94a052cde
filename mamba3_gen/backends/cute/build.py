"""CuTe DSL backend: a lowered spec -> the decode step kernel ``generated/<name>/step_cute.py``.

One CTA per (batch, head). The CTA's threads tile the state H (P rows × N columns): ``TC`` threads cover one row
with ``VEC``-element (16-byte) vectors (``NCH`` vectors each when a row is wider than a warp), so ``RPP = NT/TC``
rows are covered per pass and each thread walks ``P/RPP`` passes. ``step_layout`` derives these numbers and rejects
dims the kernel does not tile, naming the spec field. Rendering is pure: byte-for-byte reproducible.
"""
from __future__ import annotations

import math
from pathlib import Path

import jinja2

from mamba3_gen.backends.templating import template_env, templates_hash

REPO_ROOT = Path(__file__).resolve().parents[3]
TEMPLATE_DIR = REPO_ROOT / "templates" / "cute"
STEP_TEMPLATE = "step.py.jinja"
VECTOR_BYTES = 16  # bytes of one vector load/store of the state
MAX_THREADS = 128  # threads of a CTA (one CTA per (b, h))
WARP = 32
STATE_BYTES = {"fp32": 4, "bf16": 2}
CUTE_DTYPES = {"fp32": "Float32", "bf16": "BFloat16"}


def template_hash() -> str:
    return templates_hash(TEMPLATE_DIR)


def _pow2(x: int) -> bool:
    return x > 0 and not (x & (x - 1))


def step_layout(meta: dict, rotation: str | None) -> dict:
    """Thread tiling of the state for the step kernel; ValueError (naming the field) for dims it cannot tile."""
    N, P, S = meta["N"], meta["P"], meta["S"]
    vec = VECTOR_BYTES // STATE_BYTES[meta["state_dtype"]]
    if N % vec:
        raise ValueError(f"dims.d_state: N={N} must be a multiple of {vec} for the CuTe step "
                         f"({VECTOR_BYTES}-byte vectors of the {meta['state_dtype']} state)")
    nv = N // vec  # vectors per state row
    if nv <= WARP:
        if not _pow2(nv):
            raise ValueError(f"dims.d_state: N={N} gives {nv} vectors of {vec} per row, not a power of two; the "
                             f"CuTe step needs N = {vec}·2^k (e.g. {vec * (1 << (nv.bit_length() - 1))}) or a "
                             f"multiple of {vec * WARP}")
        tc, nch = nv, 1
    else:
        if nv % WARP:
            raise ValueError(f"dims.d_state: N={N} must be a multiple of {vec * WARP} for the CuTe step (or "
                             f"{vec}·2^k up to {vec * WARP})")
        tc, nch = WARP, nv // WARP
    if rotation == "halved" and (N // 2) % vec:
        raise ValueError(f"dims.d_state: N={N}: the halved rotation needs N/2 to be a multiple of {vec} in the "
                         "CuTe step")
    rpp = math.gcd(P, MAX_THREADS // tc)  # rows per pass (both powers of two -> the largest that divides P)
    nt = tc * rpp
    if nt < WARP:
        raise ValueError(f"dims.headdim: P={P} must be a multiple of {WARP // tc} for the CuTe step "
                         f"(whole warps over the rows of the state)")
    return {"VEC": vec, "TC": tc, "NCH": nch, "RPP": rpp, "NT": nt, "NPASS": P // rpp,
            "S_ITERS": -(-S // nt) if S else 0, "P_ITERS": -(-P // nt)}


def arg_roles(meta: dict) -> dict:
    """{kernel pointer argument: (role, alignment in bytes)} in the host function's order; role is the element
    type: 'input' (the input dtype), 'state' (the state dtype) or 'fp32'; alignment None means the element size
    (scalar accesses only), 16 marks tensors read with 16-byte vectors (the adapter checks the address)."""
    R, S, carries = meta["R"], meta["S"], meta["carries_prev_token"]
    vec_align = VECTOR_BYTES
    roles: dict = {}
    roles["q"] = ("input", vec_align)
    roles["k"] = ("input", vec_align)
    roles["v"] = ("input", None)
    roles["adt"] = ("fp32", None)
    roles["dt"] = ("fp32", None)
    if meta["has_trap"]:
        roles["trap"] = ("fp32", None)
    roles["q_bias"] = ("fp32", vec_align)
    roles["k_bias"] = ("fp32", vec_align)
    if S:
        roles["angles"] = ("fp32", None)
    if meta["d_skip"]:
        roles["D"] = ("fp32", None)
    if meta["z_gate"]:
        roles["z"] = ("input", None)
    if R > 1:
        roles["mimo_v"] = ("fp32", None)
        if meta["z_gate"]:
            roles["mimo_z"] = ("fp32", None)
        roles["mimo_o"] = ("fp32", None)
    roles["out"] = ("input", None)
    for suffix in ("_in", "_out"):
        if S:
            roles["angle" + suffix] = ("fp32", None)
        roles["ssm" + suffix] = ("state", vec_align)
        if carries:
            roles["k" + suffix] = ("state", vec_align)
            roles["v" + suffix] = ("state", None)
    return roles


SCALAR_ARGS = ("B", "H", "angles_sb", "angles_sh")


def _env() -> jinja2.Environment:
    return template_env(TEMPLATE_DIR)


def render_step(low, header: dict) -> str:
    """Source of ``generated/<name>/step_cute.py`` for a Lowering (mamba3_gen.backends.triton.build.lower).

    ``header``: generated_by, spec_hash, version, template_hash (of the Triton templates, kept for reference),
    spec_path. The file's header names this backend's own template hash as well."""
    spec = low.spec
    meta = low.meta()
    rotation = spec.state.rotation if meta["S"] else None
    tiling = step_layout(meta, rotation)
    roles = arg_roles(meta)
    coef = low.lowered.step_code(exp="_exp")
    ctx = dict(
        header=dict(header, cute_template_hash=template_hash()), spec_name=spec.name, meta=meta,
        N=meta["N"], P=meta["P"], R=meta["R"], S=meta["S"], G=meta["G"], N2=meta["N"] // 2,
        rotation=rotation, has_trap=meta["has_trap"], lam_source=meta["lambda"],
        carries=meta["carries_prev_token"], d_skip=meta["d_skip"], z_gate=meta["z_gate"],
        trap_input=meta["trap_input"], decay_input=meta["decay_input"],
        input_dtype=meta["input_dtype"], state_dtype=meta["state_dtype"],
        alpha=coef["alpha"], beta=coef["beta"], gamma=coef["gamma"],
        roles=roles, arg_names=list(roles), scalar_args=list(SCALAR_ARGS),
        cute_dtypes=CUTE_DTYPES, bfly=tuple(tiling["TC"] >> (i + 1) for i in range(tiling["TC"].bit_length() - 1)),
        **tiling,
    )
    return _env().get_template(STEP_TEMPLATE).render(**ctx)
