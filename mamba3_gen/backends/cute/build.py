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

from mamba3_gen.backends.printing import cute_printer, input_codes, print_prologue
from mamba3_gen.backends.templating import template_env, templates_hash
from mamba3_gen.paths import templates_dir
from mamba3_gen.signature import cute_roles, features

REPO_ROOT = Path(__file__).resolve().parents[3]
TEMPLATE_DIR = templates_dir("cute")  # the checkout's templates/, or the copy inside an installed wheel
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
    """Thread tiling of the state for the step kernel. Any even N and any P: rows or column vectors past the
    state's are padding lanes that compute on a real row/vector and store nothing."""
    N, P, S = meta["N"], meta["P"], meta["S"]
    # The widest vector (at most 16 bytes) that tiles a row, and each half of it for the halved rotation.
    vec = math.gcd(VECTOR_BYTES // STATE_BYTES[meta["state_dtype"]], N // 2 if rotation == "halved" else N)
    nv = N // vec  # vectors per state row
    tc = min(WARP, 1 << (nv - 1).bit_length())  # threads per row: a power of two for the butterfly
    nch = -(-nv // tc)  # vectors per thread per row; lanes past nv are masked
    rpp = math.gcd(P, MAX_THREADS // tc)  # rows per pass (both powers of two -> the largest that divides P)
    padded = tc * rpp < WARP
    if padded:  # too few rows per pass for a whole warp: fill one, the last pass is partial (masked rows)
        rpp = WARP // tc
    nt = tc * rpp
    npass = -(-P // rpp)
    return {"VEC": vec, "NV": nv, "TC": tc, "NCH": nch, "PADCOL": nch * tc != nv, "RPP": rpp, "NT": nt,
            "NPASS": npass, "PADDED": padded,
            "S_ITERS": -(-S // nt) if S else 0, "P_ITERS": -(-P // nt)}


def arg_roles(meta: dict) -> dict:
    """{kernel pointer argument: (role, alignment in bytes)} in the host function's order; role is the element
    type: 'input' (the input dtype), 'state' (the state dtype) or 'fp32'; alignment None means the element size
    (scalar accesses only), 16 marks tensors read with 16-byte vectors (the adapter checks the address)."""
    # the pointers and their element types from the signature table (mamba3_gen/signature.py); q, k, the biases and
    # the state's ssm and k are read with 16-byte vectors
    vectors = ("q", "k", "q_bias", "k_bias", "ssm_in", "ssm_out", "k_in", "k_out")
    return {name: (role, VECTOR_BYTES if name in vectors else None) for name, role in cute_roles(features(meta))}


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
    ctx = dict(
        header=dict(header, cute_template_hash=template_hash()), spec_name=spec.name, meta=meta,
        N=meta["N"], P=meta["P"], R=meta["R"], S=meta["S"], G=meta["G"], N2=meta["N"] // 2,
        rotation=rotation, has_trap=meta["has_trap"], J=meta["J"], d_skip=meta["d_skip"], z_gate=meta["z_gate"],
        input_dtype=meta["input_dtype"], state_dtype=meta["state_dtype"],
        prologue=print_prologue(low.lowered, cute_printer()), input_codes=input_codes(spec, low.lowered, sigmoid="_sigmoid"),
        roles=roles, arg_names=list(roles), scalar_args=list(SCALAR_ARGS),
        cute_dtypes=CUTE_DTYPES, bfly=tuple(tiling["TC"] >> (i + 1) for i in range(tiling["TC"].bit_length() - 1)),
        **tiling,
    )
    return _env().get_template(STEP_TEMPLATE).render(**ctx)
