"""The signature table (mamba3_gen/signature.py) against what still lists the op's arguments by hand: the custom
ops' Python parameters (torch.library reads them), check_layer_inputs' parameters, and the parameter lists of the
generated kernels (templates/triton, templates/cute), parsed from generated/<name>/ with ast."""
from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import pytest
import torch

from mamba3_gen import signature as sig
from mamba3_gen.backends.cute.build import arg_roles
from mamba3_gen.backends.triton.build import lower
from mamba3_gen.runtime import backward, checks, forward, step
from mamba3_gen.runtime.state import Mamba3State
from mamba3_gen.spec.loader import load_spec

GENERATED = Path(__file__).resolve().parents[1] / "generated"
SPECS = Path(__file__).resolve().parents[1] / "specs"
SPEC_DIRS = sorted(p for p in GENERATED.iterdir() if (p / "fwd.py").is_file())


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def test_state_fields_are_mamba3_state():
    assert sig.STATE_FIELDS == Mamba3State._fields


def test_module_docstring_documents_every_input():
    rows = [line for line in (sig.__doc__ or "").splitlines() if line.startswith("| ")]
    documented = {n.strip() for line in rows[1:] for n in line.split("|")[1].split(",")}
    assert documented == set(sig.LAYER_INPUTS)
    for a in sig.LAYER_ARGS:  # the schema column says Tensor? exactly for the optional ones
        row = next(line for line in rows if a.name in {n.strip() for n in line.split("|")[1].split(",")})
        assert row.split("|")[3].strip() == ("Tensor?" if a.optional else "Tensor"), a.name


def test_schemas_list_the_table():
    fwd = sig.forward_schema()
    assert fwd.startswith("(Tensor q, Tensor k, Tensor v, Tensor adt, Tensor dt, Tensor? trap, ")
    assert fwd.count("Tensor?") == sum(a.optional for a in sig.LAYER_ARGS) + len(sig.STATE_FIELDS) + 1
    assert forward._OP_SCHEMA == fwd and backward._BWD_SCHEMA == sig.backward_schema()
    assert backward._GRAD_NAMES == sig.LAYER_INPUTS + tuple(f"init_{f}" for f in sig.STATE_FIELDS)


def test_explicit_python_signatures_match_the_table():
    """The op functions keep explicit parameters; they must be the table's, in its order."""
    op_params = list(sig.LAYER_INPUTS) + [f"init_{f}" for f in sig.STATE_FIELDS] + ["cu_seqlens"]
    # prepass: the launch's own option (the rotation pre-pass), after the table's
    assert _params(forward.ForwardOp._launch) == op_params + ["return_final_states", "save_chunks", "prepass"]
    assert _params(forward.ForwardOp._launch_chunked) == op_params + ["return_final_states", "save_chunks",
                                                                      "prepass"]
    assert _params(forward.ForwardOp._prepass)[:len(sig.LAYER_INPUTS)] == list(sig.LAYER_INPUTS)
    grads = ["dout"] + [f"d_{f}" for f in sig.STATE_FIELDS]
    assert _params(backward.BackwardOp._launch) == op_params + list(sig.CHUNK_NAMES) + grads
    assert _params(backward.BackwardOp.backward)[1:] == grads + ["d_chunks"]  # after ctx; the kept chunks' (None)
    layer = list(sig.LAYER_INPUTS)
    assert _params(checks.check_layer_inputs)[4:] == layer
    assert _params(forward.ForwardOp.__call__)[:len(layer)] == layer
    assert _params(step.StepOp.__call__)[:len(layer)] == layer
    for a in sig.LAYER_ARGS:  # optional in the public call exactly when optional in the schema (q_bias, k_bias: zeros)
        for call in (forward.ForwardOp.__call__, step.StepOp.__call__):
            default = inspect.signature(call).parameters[a.name].default
            if a.omit:  # an explicit None means something (mimo_o: per rank), so leaving it out is told apart
                assert default is checks.UNSET, a.name
            else:
                assert (default is None) == (a.optional or a.name in ("q_bias", "k_bias")), a.name


def test_registered_op_functions_match_the_table():
    """The functions handed to torch.library (op and fake) are nested in _register: read their parameters there."""
    for cls, schema in ((forward.ForwardOp, sig.forward_schema()), (backward.BackwardOp, sig.backward_schema())):
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls._register)))
        names = [a.split()[-1] for a in schema[1:schema.index(")")].split(", ")]
        inner = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in ("op", "_")]
        assert len(inner) == 2
        for fn in inner:
            assert [a.arg for a in fn.args.args] == names, (cls.__name__, fn.name)


def _kernels(path: Path) -> dict[str, list[str]]:
    tree = ast.parse(path.read_text())
    return {n.name: [a.arg for a in n.args.args] for n in tree.body
            if isinstance(n, ast.FunctionDef) and n.name.startswith("mamba3_")}


@pytest.mark.parametrize("d", SPEC_DIRS, ids=lambda p: p.name)
def test_generated_kernels_start_with_the_table(d):
    layer_ptrs = [a.ptr for a in sig.LAYER_ARGS]
    fwd = _kernels(d / "fwd.py")
    prepass = {"mamba3_rotate_prep_kernel"} if load_spec(SPECS / f"{d.name}.yaml").is_complex \
        else set()  # the rotation pre-pass: complex states only
    assert set(fwd) == {"mamba3_fwd_kernel", "mamba3_chunk_states_kernel", "mamba3_chunk_out_kernel", *prepass}
    for name, params in fwd.items():
        assert params[:len(sig.FORWARD_POINTERS)] == list(sig.FORWARD_POINTERS), name
    stp = _kernels(d / "step.py")["mamba3_step_kernel"]
    assert stp[:len(sig.STEP_POINTERS)] == list(sig.STEP_POINTERS)
    bwd = _kernels(d / "bwd.py")
    chunk_kernels = ("mamba3_bwd_chunk_v_kernel", "mamba3_bwd_chunk_coef_kernel", "mamba3_bwd_chunk_qk_kernel",
                     "mamba3_bwd_chunk_vc_kernel", "mamba3_bwd_fused_kernel")
    assert set(bwd) == {"mamba3_bwd_dstate_kernel", *chunk_kernels, "mamba3_bwd_steps_kernel",
                        "mamba3_bwd_qk_sums_kernel"}
    for name in ("mamba3_bwd_dstate_kernel", *chunk_kernels):
        assert bwd[name][:len(layer_ptrs) + 1] == layer_ptrs + ["dout_ptr"], name
    # the steps kernel takes only the per-step inputs, still in the table's order
    steps = [p for p in bwd["mamba3_bwd_steps_kernel"] if p in layer_ptrs]
    assert steps == [p for p in layer_ptrs if p in steps] and steps
    if (d / "step_cute.py").is_file():  # the CuTe step: the spec's used pointers (arg_roles), in the table's order
        meta = lower(load_spec(SPECS / f"{d.name}.yaml"), "interpreter").meta()
        cute = _kernels(d / "step_cute.py")["mamba3_step_cute_kernel"]
        assert cute[:len(arg_roles(meta))] == list(arg_roles(meta))
        assert list(arg_roles(meta)) == [n for n, _ in sig.cute_roles(sig.features(meta))]


def test_presence_and_pointer_types_follow_the_predicates():
    f = sig.Features(trap=False, complex=False, d_skip=True, z_gate=False, R=2, lags=0, initial_states=True,
                     final_states=False, varlen=True)
    used = sig.presence(f)
    assert not used["trap"] and not used["angles"] and used["D"] and not used["z"]
    assert used["mimo_v"] and used["mimo_o"] and not used["mimo_z"]
    assert used["init_ssm"] and not used["init_angle"] and not used["init_k"] and not used["final_ssm"]
    ptr = sig.pointer_types(f, "*bf16")
    assert ptr["q_ptr"] == "*bf16" and ptr["adt_ptr"] == "*fp32" and ptr["trap_ptr"] is None
    assert ptr["init_ssm_ptr"] == "*fp32" and ptr["final_ssm_ptr"] is None and ptr["cu_seqlens_ptr"] == "*i32"
    assert list(ptr)[:len(sig.FORWARD_POINTERS)] == list(sig.FORWARD_POINTERS)


def test_refusal_reasons():
    """check_layer_inputs refuses an input the spec does not take with the row's reason (the InputError text)."""
    why = {a.name: a.absent_why for a in sig.LAYER_ARGS}
    assert why["trap"]({"lambda": "constant"}) == "takes λ from its rule (constant)"
    assert why["angles"]({}) == "has a real state (no rotation)"
    assert why["D"]({}) == "has no D skip (options.d_skip: false)"
    assert why["z"]({}) == "has no z gate (options.z_gate: false)"
    assert why["mimo_z"]({"R": 2}) == "has no z gate" and why["mimo_z"]({"R": 1}) == "is SISO (mimo_rank 1)"
    assert why["mimo_v"]({"R": 1}) == why["mimo_o"]({"R": 1}) == "is SISO (mimo_rank 1)"


def test_per_rank_output_shape():
    """mimo_o is the one used input that may be None: with R > 1 the op then returns y per rank (lead + (R, H, P))."""
    assert [a.name for a in sig.LAYER_ARGS if a.omit] == ["mimo_o"]
    mimo = sig.Features(trap=True, complex=True, d_skip=True, z_gate=False, R=4, lags=1, initial_states=False,
                        final_states=True, varlen=False)
    siso = mimo._replace(R=1)
    assert sig.per_rank(mimo, None) and not sig.per_rank(mimo, torch.ones(1)) and not sig.per_rank(siso, None)
    assert sig.out_shape(mimo, (2, 5), 3, 8, None) == (2, 5, 4, 3, 8)
    assert sig.out_shape(mimo, (2,), 3, 8, torch.ones(1)) == (2, 3, 8)
    assert sig.out_shape(siso, (2, 5), 3, 8, None) == (2, 5, 3, 8)
