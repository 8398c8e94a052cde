"""The one signature table of a Mamba-3 op: the layer inputs and the state fields, in the order the kernels and the
registered ops take them. Everything that lists the op's arguments derives from it:

- runtime/forward.py: the forward op's schema (:func:`forward_schema`) and the order of the layer inputs
  (:data:`LAYER_INPUTS`);
- runtime/backward.py: the backward op's schema (:func:`backward_schema`) and the gradients' names
  (:data:`GRAD_NAMES`);
- runtime/checks.py: which inputs a spec takes and why it refuses the others (:attr:`Arg.used`, :attr:`Arg.absent_why`);
- runtime/step.py: the order the step kernel takes the layer inputs in (:data:`LAYER_INPUTS`);
- graph/dataflow.py: the tensors a spec's forward kernel takes (:func:`presence`);
- backends/triton/aot.py: the kernel pointers' dtypes, None for a pointer the spec passes as None
  (:func:`pointer_types`);
- backends/cute/build.py: the CuTe step's pointer roles and order (:func:`cute_roles`).

The torch.library op and fake functions keep explicit parameters (torch reads them), and the kernel templates keep
their own parameter lists; tests/test_signature.py checks both against this table.

Shapes (official Mamba-3 conventions, §2/§4 of the math doc; ``lead`` is (B, L) for the forward and (B,) for one
decode step; NS is B or the number of packed sequences):

| input   | shape                              | schema    | the spec uses it when           | pointer dtype |
|---------|------------------------------------|-----------|---------------------------------|---------------|
| q, k    | lead + (G, N) or (R, G, N)         | Tensor    | always                          | input         |
| v       | lead + (H, P)                      | Tensor    | always                          | input         |
| adt, dt | (B, H) + lead[1:]                  | Tensor    | always                          | fp32          |
| trap    | (B, H) + lead[1:]                  | Tensor?   | λ is data (meta has_trap)       | fp32          |
| q_bias, k_bias | (H, N) or (H, R, N)       | Tensor    | always (zeros when not given)   | fp32          |
| angles  | lead + (H, S)                      | Tensor?   | complex state (S > 0)           | fp32          |
| D       | (H,)                               | Tensor?   | options.d_skip                  | fp32          |
| z       | lead + (H, P)                      | Tensor?   | options.z_gate                  | input         |
| mimo_v  | (H, R, P)                          | Tensor?   | R > 1                           | fp32          |
| mimo_o  | (H, R, P)                          | Tensor?   | R > 1, may be None (per rank)   | fp32          |
| mimo_z  | (H, R, P)                          | Tensor?   | R > 1 and options.z_gate        | fp32          |

mimo_o is the one used input that may be None (``Arg.omit``): with R > 1 and mimo_o None the op returns the per-rank
SSM output y_r = H q̂_r + D·(v ⊙ mimo_v_r) (the official MIMO_Out=None) before any rank reduction, ``out`` of shape
lead + (R, H, P) instead of lead + (H, P) (:func:`per_rank`, :func:`out_shape`); the backward then takes dout of that
shape and returns no mimo_o gradient. A spec with options.z_gate refuses it (the official prefill gates the per-rank
output, the official step does not: the layer gates in its own norm, from a spec copy without z gate).

State fields (runtime/state.py has the layouts): angle (NS, H, S) fp32 when S > 0; ssm (NS, H, P, N) always;
k (NS, [J,] [R,] H, N) and v (NS, [J,] H, P) when the rule has lags (J > 0); k, v and ssm in the state dtype. The
ops take them as ``init_<field>`` (options.initial_states) and return them as ``final_<field>``
(options.final_states); the step kernels take ``<field>_in`` and ``<field>_out``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

__all__ = [
    "Arg", "Features", "LAYER_ARGS", "STATE_ARGS", "LAYER_INPUTS", "STATE_FIELDS", "GRAD_NAMES", "features", "uses",
    "presence", "CHUNK_NAMES", "forward_schema", "backward_schema", "pointer_types", "cute_roles", "FORWARD_POINTERS",
    "STEP_POINTERS", "per_rank", "out_shape",
]


class Features(NamedTuple):
    """What a spec's op takes, from a Spec or a generated module's META dict (:func:`features`)."""

    trap: bool  # λ is a per-token input
    complex: bool  # S > 0: a rotated state, angles input and angle state field
    d_skip: bool
    z_gate: bool
    R: int  # mimo rank
    lags: int  # J: previous tokens the rule reads (carried k, v state fields when > 0)
    initial_states: bool
    final_states: bool
    varlen: bool


def features(spec_or_meta) -> Features:
    """:class:`Features` of a ``Spec`` (spec/model.py) or of a META dict (Lowering.meta())."""
    if isinstance(spec_or_meta, dict):
        m = spec_or_meta
        return Features(bool(m["has_trap"]), m["S"] > 0, bool(m["d_skip"]), bool(m["z_gate"]), m["R"], m["J"],
                        bool(m["initial_states"]), bool(m["final_states"]), bool(m["varlen"]))
    s, opt = spec_or_meta, spec_or_meta.options
    return Features(bool(s.has_trap_input), bool(s.is_complex), bool(opt.d_skip), bool(opt.z_gate),
                    s.dims.mimo_rank, s.lags, bool(opt.initial_states), bool(opt.final_states), bool(opt.varlen))


@dataclass(frozen=True)
class Arg:
    """One row of the table: ``name`` as the ops and checks spell it, ``shape`` as documented, ``optional`` (a
    ``Tensor?`` in the op schemas), ``used`` (when the spec takes it, on :class:`Features`), ``dtype`` (the
    pointer's element type: 'input' = dtypes.input, 'fp32', or 'state' = dtypes.state), ``ptr`` (the Triton
    kernels' parameter name), ``absent_why`` (META dict -> why a spec without it refuses it, for the InputError),
    ``omit`` (what passing None for an input the spec uses means, for an input that may be None; "" when it is
    required)."""

    name: str
    shape: str
    optional: bool
    used: Callable[[Features], bool]
    dtype: str
    ptr: str
    absent_why: Callable[[dict], str] = lambda meta: ""
    omit: str = ""


def _always(f: Features) -> bool:
    return True


def _siso(meta: dict) -> str:
    return "is SISO (mimo_rank 1)"


LAYER_ARGS: tuple[Arg, ...] = (
    Arg("q", "lead + (G, N) | lead + (R, G, N)", False, _always, "input", "q_ptr"),
    Arg("k", "lead + (G, N) | lead + (R, G, N)", False, _always, "input", "k_ptr"),
    Arg("v", "lead + (H, P)", False, _always, "input", "v_ptr"),
    Arg("adt", "(B, H) + lead[1:]", False, _always, "fp32", "adt_ptr"),
    Arg("dt", "(B, H) + lead[1:]", False, _always, "fp32", "dt_ptr"),
    Arg("trap", "(B, H) + lead[1:]", True, lambda f: f.trap, "fp32", "trap_ptr",
        lambda m: f"takes λ from its rule ({m['lambda']})"),
    Arg("q_bias", "(H, N) | (H, R, N)", False, _always, "fp32", "q_bias_ptr"),
    Arg("k_bias", "(H, N) | (H, R, N)", False, _always, "fp32", "k_bias_ptr"),
    Arg("angles", "lead + (H, S)", True, lambda f: f.complex, "fp32", "angles_ptr",
        lambda m: "has a real state (no rotation)"),
    Arg("D", "(H,)", True, lambda f: f.d_skip, "fp32", "d_ptr", lambda m: "has no D skip (options.d_skip: false)"),
    Arg("z", "lead + (H, P)", True, lambda f: f.z_gate, "input", "z_ptr",
        lambda m: "has no z gate (options.z_gate: false)"),
    Arg("mimo_v", "(H, R, P)", True, lambda f: f.R > 1, "fp32", "mimo_v_ptr", _siso),
    Arg("mimo_z", "(H, R, P)", True, lambda f: f.R > 1 and f.z_gate, "fp32", "mimo_z_ptr",
        lambda m: "has no z gate" if m["R"] > 1 else _siso(m)),
    Arg("mimo_o", "(H, R, P)", True, lambda f: f.R > 1, "fp32", "mimo_o_ptr", _siso,
        "out is the per-rank y (lead + (R, H, P)), not reduced over ranks"),
)

# The state fields in Mamba3State's order (runtime/state.py); ``ptr`` is the field name (kernels prefix or suffix it).
STATE_ARGS: tuple[Arg, ...] = (
    Arg("angle", "(NS, H, S)", True, lambda f: f.complex, "fp32", "angle"),
    Arg("ssm", "(NS, H, P, N)", True, _always, "state", "ssm"),
    Arg("k", "(NS, [J,] [R,] H, N)", True, lambda f: f.lags > 0, "state", "k"),
    Arg("v", "(NS, [J,] H, P)", True, lambda f: f.lags > 0, "state", "v"),
)

LAYER_INPUTS: tuple[str, ...] = tuple(a.name for a in LAYER_ARGS)
STATE_FIELDS: tuple[str, ...] = tuple(a.name for a in STATE_ARGS)
INIT_NAMES: tuple[str, ...] = tuple(f"init_{f}" for f in STATE_FIELDS)
FINAL_NAMES: tuple[str, ...] = tuple(f"final_{f}" for f in STATE_FIELDS)
# The per-chunk tensors the forward keeps for its backward (the state entering each chunk after its first step, its Θ,
# the carried tokens; runtime/backward.py): outputs of the forward op, optional inputs of the backward op.
CHUNK_NAMES: tuple[str, ...] = ("chunk_ssm", "chunk_angle", "chunk_k", "chunk_v")
# The inputs the backward op returns a gradient of (an empty tensor for an input that was None), in the op's order.
GRAD_NAMES: tuple[str, ...] = LAYER_INPUTS + INIT_NAMES
# Leading parameters of the Triton kernels: forward (fused and chunked) and step.
FORWARD_POINTERS: tuple[str, ...] = (tuple(a.ptr for a in LAYER_ARGS) + ("out_ptr",)
                                     + tuple(f"{n}_ptr" for n in INIT_NAMES + FINAL_NAMES))
STEP_POINTERS: tuple[str, ...] = (tuple(a.ptr for a in LAYER_ARGS) + ("out_ptr",)
                                  + tuple(f"{f}_in_ptr" for f in STATE_FIELDS)
                                  + tuple(f"{f}_out_ptr" for f in STATE_FIELDS))
_BY_NAME = {a.name: a for a in LAYER_ARGS}


def uses(name: str, f: Features) -> bool:
    """Whether a spec with features ``f`` takes layer input ``name``."""
    return _BY_NAME[name].used(f)


def per_rank(f: Features, mimo_o) -> bool:
    """Whether a call returns the per-rank output (lead + (R, H, P)): R > 1 and mimo_o is None."""
    return f.R > 1 and mimo_o is None


def out_shape(f: Features, lead: tuple, H: int, P: int, mimo_o) -> tuple:
    """The op's ``out`` shape: lead + (R, H, P) for a per-rank call (:func:`per_rank`), else lead + (H, P)."""
    return tuple(lead) + ((f.R,) if per_rank(f, mimo_o) else ()) + (H, P)


def presence(f: Features) -> dict[str, bool]:
    """{tensor: used} for the forward op's tensors: the layer inputs, out, and init_*/final_* state fields (each
    when the state carries the field and the option is on)."""
    out = {a.name: a.used(f) for a in LAYER_ARGS}
    out["out"] = True
    for a in STATE_ARGS:
        out[f"init_{a.name}"] = f.initial_states and a.used(f)
    for a in STATE_ARGS:
        out[f"final_{a.name}"] = f.final_states and a.used(f)
    return out


def _schema_args() -> list[str]:
    return [f"Tensor{'?' if a.optional else ''} {a.name}" for a in LAYER_ARGS] + \
           [f"Tensor? {n}" for n in INIT_NAMES] + ["Tensor? cu_seqlens"]


def forward_schema() -> str:
    """The forward op's schema: layer inputs, initial state fields, cu_seqlens, return_final_states, save_chunks ->
    out, the final state fields and the :data:`CHUNK_NAMES` tensors (an empty tensor for one not returned)."""
    ret = ", ".join(["Tensor"] * (1 + len(STATE_FIELDS) + len(CHUNK_NAMES)))
    return "(" + ", ".join(_schema_args() + ["bool return_final_states", "bool save_chunks"]) + f") -> ({ret})"


def backward_schema() -> str:
    """The backward op's schema: the forward's tensor inputs, the chunk tensors it kept (:data:`CHUNK_NAMES`, None
    when it kept none), then the outputs' gradients (dout and d_<field>) -> one gradient per :data:`GRAD_NAMES`
    entry."""
    kept = [f"Tensor? {n}" for n in CHUNK_NAMES]
    grads = ["Tensor? dout"] + [f"Tensor? d_{f}" for f in STATE_FIELDS]
    return "(" + ", ".join(_schema_args() + kept + grads) + ") -> (" + ", ".join(["Tensor"] * len(GRAD_NAMES)) + ")"


def pointer_types(f: Features, io: str, state: str = "*fp32") -> dict[str, str | None]:
    """{forward kernel pointer: Triton type string, or None when the spec passes None}: ``io`` for 'input' rows,
    ``*fp32`` for 'fp32' rows, ``state`` for 'state' rows (the AOT report passes ``*fp32``, as it always has);
    cu_seqlens is ``*i32`` with options.varlen."""
    types = {"fp32": "*fp32", "input": io, "state": state}
    out = {a.ptr: types[a.dtype] if a.used(f) else None for a in LAYER_ARGS}
    out["out_ptr"] = io
    used = presence(f)
    for n in INIT_NAMES + FINAL_NAMES:
        a = STATE_ARGS[STATE_FIELDS.index(n.split("_", 1)[1])]
        out[f"{n}_ptr"] = types[a.dtype] if used[n] else None
    out["cu_seqlens_ptr"] = "*i32" if f.varlen else None
    return out


def cute_roles(f: Features) -> list[tuple[str, str]]:
    """[(CuTe step pointer, dtype rule)] in the host function's order: the used layer inputs, out, then the carried
    state fields suffixed _in and _out (a step always carries a state)."""
    out = [(a.name, a.dtype) for a in LAYER_ARGS if a.used(f)] + [("out", "input")]
    for suffix in ("_in", "_out"):
        out += [(a.name + suffix, a.dtype) for a in STATE_ARGS if a.used(f)]
    return out
