"""The CuTe DSL decode step (templates/cute/step.py.jinja -> generated/<name>/step_cute.py), without a GPU.

- Rendering is deterministic: the same spec renders byte-identically twice, with the header the build writes.
- Every shipped spec's step compiles ahead of time for sm_90a (mamba3_gen.backends.cute.aot, in a subprocess: the
  DSL's MLIR context and caches never share a process with the Triton interpreter), with whole 16-byte vector
  accesses of the state and no local-memory frame. Marked `aot`; deselect with `-m "not aot"`.
- Dims the kernel cannot tile give a ValueError naming the spec field.
Numerics are checked on a GPU (the other tests' `gpu` marker).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytest.importorskip("jinja2")

from mamba3_gen.backends.cute.aot import CuteAOTError, compile_report, render_for  # noqa: E402
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


def test_untileable_dims_name_the_field(tmp_path):
    meta = {"N": 96, "P": 64, "S": 0, "state_dtype": "fp32"}
    with pytest.raises(ValueError, match="dims.d_state"):
        step_layout(meta, None)
    with pytest.raises(ValueError, match="dims.headdim"):
        step_layout({"N": 64, "P": 6, "S": 0, "state_dtype": "bf16"}, None)


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


@pytest.mark.aot
def test_cute_step_aot_reports_errors(tmp_path):
    bad = tmp_path / "odd_n.yaml"
    bad.write_text("name: odd_n\ndims: {d_state: 96, headdim: 64}\n")
    with pytest.raises(CuteAOTError, match="dims.d_state"):
        compile_report(bad, "sm_90a")
