"""The CuTe DSL decode step (templates/cute/step.py.jinja -> generated/<name>/step_cute.py), without a GPU.

- Rendering is deterministic: the same spec renders byte-identically twice, with the header the build writes.
- Every shipped spec's step compiles ahead of time for sm_90a (mamba3_gen.backends.cute.aot, in a subprocess: the
  DSL's MLIR context and caches never share a process with the Triton interpreter), with whole 16-byte vector
  accesses of the state and no local-memory frame. Marked `aot`; deselect with `-m "not aot"`.
- It tiles every state shape the Triton step takes (any even N, any P, both rotations, both state dtypes): rows and
  column vectors past the state's are padding lanes; a padded shape compiles too.
Numerics are checked on a GPU (the other tests' `gpu` marker).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytest.importorskip("jinja2")

from mamba3_gen.backends.cute.aot import compile_report, render_for  # noqa: E402
from mamba3_gen.backends.cute.build import step_layout  # noqa: E402
from mamba3_gen.spec.loader import load_spec  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO_ROOT / "specs").glob("*.yaml"))
MAX_REGS = 255

TINY_BF16_STATE = """\
name: tiny_bf16_state
state: {kind: complex, rotation: pairwise}
dims: {d_state: 64, headdim: 32, mimo_rank: 1, chunk_size: 16}
dtypes: {input: fp32, state: bf16}
"""


def _ids(paths):
    return [p.stem for p in paths]


@pytest.mark.parametrize("spec_path", SPECS, ids=_ids(SPECS))
def test_step_renders_byte_identically(spec_path):
    spec = load_spec(str(spec_path))
    a = render_for(spec, "sm_90a", "specs/" + spec_path.name)
    b = render_for(load_spec(str(spec_path)), "sm_90a", "specs/" + spec_path.name)
    assert a == b
    assert f"# spec: {spec.name}  sha256: " in a
    assert "Do not edit: rebuild with `mamba3-gen build specs/" in a
    tree = ast.parse(a)  # valid Python; the contract's names are there
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert {"META", "CUTE_ARGS", "CUTE_ARG_ROLES", "mamba3_step_cute", "mamba3_step_cute_kernel"} <= names


@pytest.mark.parametrize("state_dtype,elsize", [("fp32", 4), ("bf16", 2)])
@pytest.mark.parametrize("rotation", [None, "pairwise", "halved"])
def test_tiles_every_state_shape(rotation, state_dtype, elsize):
    """As general as the Triton step: every even N and every P gets a tiling of whole warps that covers the state
    with vectors of at most 16 bytes (halved: vectors within each half)."""
    for N in range(4, 258, 2):
        for P in (1, 3, 4, 6, 8, 24, 48, 64, 96, 128):
            t = step_layout({"N": N, "P": P, "S": N // 4, "state_dtype": state_dtype}, rotation)
            what = f"N={N} P={P}: {t}"
            assert t["VEC"] * elsize <= 16 and t["NV"] * t["VEC"] == N, what
            if rotation == "halved":
                assert (N // 2) % t["VEC"] == 0, what
            assert t["TC"] & (t["TC"] - 1) == 0 and t["TC"] <= 32 and t["NCH"] * t["TC"] >= t["NV"], what
            assert t["NT"] % 32 == 0 and t["NT"] == t["TC"] * t["RPP"] and t["NPASS"] * t["RPP"] >= P, what
            assert t["PADCOL"] == (t["NCH"] * t["TC"] != t["NV"]) and t["PADDED"] == (t["NPASS"] * t["RPP"] != P), what


def _check(r):
    what = (f"{r['spec']}: {r['registers']} registers, frame {r['frame_bytes']} B, "
            f"{r['vector_loads']} vector loads, {r['vector_stores']} vector stores")
    assert r["success"], what
    assert r["vector_stores"] >= r["tiling"]["NPASS"] * r["tiling"]["NCH"], what  # H' rows as 16-byte vectors
    if r["registers"] is not None:
        assert 0 < r["registers"] <= MAX_REGS, what
    return what


@pytest.mark.aot
@pytest.mark.parametrize("spec_path", SPECS, ids=_ids(SPECS))
def test_cute_step_aot_compiles_for_sm90(spec_path):
    r = compile_report(spec_path, "sm_90a")
    _check(r)
    assert r["frame_bytes"] in (0, None), _check(r)


@pytest.mark.aot
def test_cute_step_aot_bf16_state_fp32_input(tmp_path):
    p = tmp_path / "tiny_bf16_state.yaml"
    p.write_text(TINY_BF16_STATE)
    r = compile_report(p, "sm_90a")
    _check(r)
    assert (r["input_dtype"], r["state_dtype"]) == ("fp32", "bf16")


# Specs beyond the shipped ones: padded tiles (rows or column vectors past the state), and formula rules (every
# function of the formula grammar, three lags, a custom log-decay, MIMO; ZOH's series at its removable singularity).
EXTRA_SPECS = {
    "padded_cols": "name: padded_cols\nstate: {rotation: halved}\ndims: {d_state: 12, headdim: 24, mimo_rank: 2, "
                   "chunk_size: 8}\n",
    "padded_rows": "name: padded_rows\ndims: {d_state: 8, headdim: 4, chunk_size: 16}\ndtypes: {state: bf16}\n",
    "three_lags": "name: three_lags\ndiscretization:\n  rule: custom\n  log_decay: adt - 0.1 * dt\n  weights:\n"
                  "    - dt * expm1(adt) / adt + 0.1 * dt * lam\n"
                  "    - (1 - lam) * dt * exp(adt) * sigmoid(adt) + dt * softplus(adt)\n"
                  "    - 0.1 * dt * tanh(dt) * log1p(-adt)\n"
                  "    - sqrt(dt) * dt * log(1 + dt)\n"
                  "state: {rotation: halved}\ndims: {d_state: 64, headdim: 32, mimo_rank: 2, chunk_size: 16}\n",
    "zoh": "name: zoh_step\ndiscretization: {rule: zoh}\nstate: {kind: real}\n",
}


@pytest.mark.aot
@pytest.mark.parametrize("which", sorted(EXTRA_SPECS))
def test_cute_step_aot_extra_specs(which, tmp_path):
    p = tmp_path / f"{which}.yaml"
    p.write_text(EXTRA_SPECS[which])
    r = compile_report(p, "sm_90a")
    _check(r)
    if not which.startswith("padded"):  # padding lanes may keep a small frame; the formulas must not add one
        assert r["frame_bytes"] in (0, None), _check(r)
