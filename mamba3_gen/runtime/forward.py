"""Host side of a generated forward: checks the tensors against the spec, allocates, launches; registers the
launch as a torch.library custom op (one per spec) so torch.compile sees one opaque node.

The generated module holds the Triton kernel and a META dict of the spec's constants; this class is shared by all
generated modules so that shape checks and launch plumbing are written once.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from mamba3_gen.errors import InputError
from mamba3_gen.runtime.checks import (UNSET, check_cu_seqlens, check_cu_seqlens_values, check_layer_inputs,
                                       check_state, check_varlen, resolve_mimo_o)
from mamba3_gen.runtime.state import Mamba3State, state_layout
from mamba3_gen.signature import LAYER_INPUTS, STATE_FIELDS, features, forward_schema, out_shape, per_rank

# The layer inputs in the order the kernels and the registered ops take them, and the op's schema: both from the
# signature table (mamba3_gen/signature.py); the op's Python parameters below are checked against it by
# tests/test_signature.py.
_LAYER_INPUTS = LAYER_INPUTS
_REGISTERED: dict = {}  # op name -> registered custom op (one per spec and target, shared by its loaded modules)
_OP_SCHEMA = forward_schema()


# Generated kernels are decorated at import; TRITON_INTERPRET=1 then runs them on the CPU (triton.jit reads it too).
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETING:  # bf16 dots and casts as a GPU computes them (the interpreter multiplies raw bf16 bits)
    from mamba3_gen.runtime.interpreter import install as _install_interpreter_fixes

    _install_interpreter_fixes()


FORWARDS = ("auto", "fused", "chunked")
_STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_SM_COUNTS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query costs microseconds per call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def env_choice(var: str, choices: tuple) -> str:
    """The value of the run-time variable `var`, lower-cased; unset or empty gives ``choices[0]`` (the default).

    Raises:
        InputError: the value is none of `choices` (the message names the variable, the choices and the default)."""
    name = os.environ.get(var, choices[0]).strip().lower() or choices[0]
    if name not in choices:
        raise InputError(f"{var}={name!r}; expected one of {', '.join(choices)}; try "
                         f"{var}={choices[0]} (the default) or unset it")
    return name


def selected_forward(meta: Optional[dict] = None, NS: int = 0, H: int = 0,
                     device: Optional[torch.device] = None, has_chunked: bool = True,
                     rotation: str = "inline") -> str:
    """The forward MAMBA3_GEN_FORWARD selects, read at each call: ``fused`` (one kernel, one program per sequence,
    head and P block walks every chunk), ``chunked`` (a states kernel over state tiles, then an out kernel over every
    chunk at once) or ``auto`` (the default): ``chunked`` where it was measured faster (benchmarks/NOTES.md,
    sessions 2026-12-02, 2026-12-03 on an H200 and 2026-12-06 third on an H100) — MIMO (R > 1); with tf32 or fp32
    dot operands a real state with N > 64 or a rule with J ≥ 2 lags (:func:`chunked_below`); or few (sequence,
    head) pairs NS·H (the fused kernel's programs would leave SMs idle): fewer than the
    GPU's SMs with the inline rotation, fewer than half of them after the rotation pre-pass (``rotation``, the
    call's :func:`selected_rotation`; bf16 dot operands, H100: B1 L16384 H32 chunked 1.42 vs fused 2.27 ms, B2 L8192
    1.06 vs 1.30, B4 L4096 0.91 vs 0.84) — else ``fused``. Under the CPU interpreter, and for a module without the
    chunked forward (``has_chunked=False``: built by an older generator), ``auto`` is ``fused``.

    Raises:
        InputError: MAMBA3_GEN_FORWARD names none of ``auto``, ``fused``, ``chunked``.
    """
    name = env_choice("MAMBA3_GEN_FORWARD", FORWARDS)
    if name != "auto":
        return name
    if meta is None or device is None or device.type != "cuda" or INTERPRETING or not has_chunked:
        return "fused"
    return auto_forward(meta, NS * H, _sm_count(device), rotation=rotation)


def chunked_below(meta: dict, rotation: str = "inline") -> float:
    """The fraction of the GPU's SM count below which ``auto`` (:func:`selected_forward`) takes the chunked forward
    for ``programs`` = NS·H (sequences × heads): ``inf`` where it always does — MIMO, and with tf32 or fp32 dot
    operands a real state with N > 64 or a rule with two or more lags (J ≥ 2: the fused kernel carries the lagged
    tokens and spills) — 1 with the inline rotation, 0.5 after the rotation pre-pass (``rotation`` ``prepass``),
    whose fused kernel is faster from half the SM count on. Measured on an H100, B8 L4096 H32 (benchmarks/NOTES.md
    2026-12-06 third): two_lag_complex tf32 chunked 2.80 vs fused 3.87 ms, bf16 after the pre-pass fused 2.03 vs
    chunked 2.30; siso_euler_real tf32 chunked 1.69 vs 2.99, bf16 fused 1.20 vs chunked 1.37 (B1 L16384: chunked
    1.02 vs 2.38)."""
    if meta["R"] > 1:
        return float("inf")
    wide = meta.get("compute_dtype") != "bf16"  # tf32 / fp32 dot operands: the fused kernel's tiles spill more
    if wide and (meta.get("J", 1) > 1 or (meta["S"] == 0 and meta["N"] > 64)):
        return float("inf")
    return 0.5 if rotation == "prepass" else 1.0


def auto_forward(meta: dict, programs: int, sms: int, rotation: str = "inline") -> str:
    """``auto``'s forward on a GPU with ``sms`` SMs (see :func:`selected_forward`): ``programs`` is NS·H,
    ``rotation`` the call's (``prepass`` or ``inline``)."""
    return "chunked" if programs < chunked_below(meta, rotation) * sms else "fused"


def auto_rotation(meta: dict, keep_states: bool = False) -> str:
    """``auto``'s rotation (see :func:`selected_rotation`): the pre-pass for a complex state with bf16 dot operands,
    unless the call is to keep its chunk states (``keep_states``, :func:`wants_chunk_states`), which the pre-pass's
    kernels cannot store."""
    return "prepass" if meta["S"] > 0 and meta.get("compute_dtype") == "bf16" and not keep_states else "inline"


def size_class(NS: int, H: int, device: torch.device) -> int:
    """The autotune key for the problem's size of the forward kernels and the backward's dstate kernel (their
    argument SIZE_CLASS, read by nothing else):
    sequences × heads NS·H below the SM count (0), below twice (1), below four times (2), or more (3); 0 off a
    GPU. The best tile depends on how many programs there are (H100: the fused kernel's B1-tuned tile ran B8
    L4096 at 1.93 ms against ~1.0 tuned there, benchmarks/NOTES.md 2026-12-06), so a batch of another class tunes
    again (a few configs timed; nothing recompiles: the argument is not specialised), which is why a CUDA graph
    must be captured after a warm-up call at its shape (README)."""
    if device.type != "cuda" or INTERPRETING:
        return 0
    programs, sms = NS * H, _sm_count(device)
    return next((i for i, f in enumerate((1, 2, 4)) if programs < f * sms), 3)


PREP_MIN_SEGMENT = 1024  # tokens: the shortest segment auto makes (its prefix re-reads Δ and the angles before it)


def prep_segments(NS: int, H: int, L: int, N2: int, device: torch.device) -> int:
    """Segments per sequence of the rotation pre-pass, read at each call from MAMBA3_GEN_PREP_SEGMENTS: a positive
    integer, or ``auto`` (the default; :func:`auto_prep_segments` on a GPU, 1 elsewhere). Each segment is walked by
    programs of its own, which first sum the step angles of the tokens before it (Δ and the angles only: the same Θ
    up to fp32 rounding), so few sequences × heads still fill the GPU. ``L`` is a sequence's length (a
    varlen pack's mean: segments split each sequence, a short one leaves its later segments idle).

    Raises:
        InputError: MAMBA3_GEN_PREP_SEGMENTS is neither ``auto`` nor a positive integer."""
    raw = os.environ.get("MAMBA3_GEN_PREP_SEGMENTS", "auto").strip().lower() or "auto"
    if raw != "auto":
        if not raw.isdigit() or int(raw) < 1:
            raise InputError(f"MAMBA3_GEN_PREP_SEGMENTS={raw!r}; expected auto or a positive integer (segments per "
                             "sequence of the rotation pre-pass); try MAMBA3_GEN_PREP_SEGMENTS=auto (the default) "
                             "or unset it")
        return int(raw)
    if device.type != "cuda" or INTERPRETING:
        return 1
    return auto_prep_segments(NS * H * triton.cdiv(N2, 32), L, _sm_count(device))


def auto_prep_segments(programs: int, length: int, sms: int) -> int:
    """``auto``'s segments per sequence for the rotation pre-pass: the largest power of two that keeps ``programs``
    (sequences × heads × pair blocks of 32) times the segments within four per SM, each segment at least
    ``PREP_MIN_SEGMENT`` tokens of a sequence of ``length``. Measured on an H100 (132 SMs, H32 N128 bf16,
    benchmarks/NOTES.md 2026-12-06): SISO B1 L16384 0.78 ms at 1 segment, 0.49 at 4, 0.42 at 8, 0.58 at 16; B2
    L8192 0.53 / 0.30 (4) / 0.41 (8); MIMO R4 B1 2.28 / 1.40 / 1.26 / 1.52, B2 1.32 / 0.96 / 1.31; B8 L4096 (512
    programs) is fastest unsegmented."""
    segs = 1
    while 2 * segs * programs <= 4 * sms and 2 * segs * PREP_MIN_SEGMENT <= length:
        segs *= 2
    return segs


def wants_chunk_states(meta: dict, differentiated: bool, has_backward: bool = True) -> bool:
    """Whether a forward call is to keep its chunk states for the backward: autograd records it
    (``differentiated``), the module has a backward, and MAMBA3_GEN_SAVE_STATES (read and checked at every call,
    differentiated or not) keeps them for this spec (:func:`keeps_chunk_states` with ``inline``). Under ``auto`` such a
    call rotates inline (:func:`auto_rotation`) so that the backward skips the states re-run: siso_trap_complex with
    bf16 operands, fwd+bwd on an H200, B8 L4096 H32 N128 9.39 ms after the pre-pass against 9.03 inline, B1 L16384
    9.30 against 7.07 (benchmarks/NOTES.md, sessions 2026-12-04).

    Raises:
        InputError: MAMBA3_GEN_SAVE_STATES names none of ``auto``, ``always``, ``never``."""
    policy = keeps_chunk_states(meta, "fused", "inline")
    return policy and differentiated and has_backward


ROTATIONS = ("auto", "prepass", "inline")


def selected_rotation(meta: dict, has_prep: bool = True, keep_states: bool = False) -> str:
    """Where a complex state's Q, K are rotated, read from MAMBA3_GEN_ROTATE at each call: ``prepass`` (one
    kernel walking each sequence's chunks writes Q̂, K̂ per head, biased and rotated, in the input dtype — fp32 for
    fp32 inputs or fp32 dot operands — and the forward kernels read them, with no angle cumsum or rotation
    in their chunk loop) or ``inline`` (each forward kernel rotates in its chunk loop). ``auto`` (the default) is
    ``prepass`` with bf16 dot operands, where storing Q̂, K̂ in bf16 rounds nothing the dots would not, and it is
    faster on an H200 (benchmarks/NOTES.md, session 2026-12-03, autotuned, B8 L4096 N128 unless said): fused 1.46
    vs 1.90 ms (B1 L16384: 2.77 vs 3.83), chunked 3.87 vs 4.10, MIMO R4 chunked 5.67 vs 7.80. With tf32 or fp32
    operands it is ``inline``: the pre-pass would round Q̂, K̂ to the bf16 input dtype (output error 2.8e-3 instead
    of 1.9e-3) for 5-12 % under the chunked forward, and the fused forward is slower with it (3.05 vs 2.68 ms). A call
    that is to keep its chunk states (``keep_states``, :func:`wants_chunk_states`) is ``inline`` under ``auto``: the
    pre-pass's kernels carry no Θ, so it would keep none (so a differentiated call and a no-grad call of a bf16 spec
    round Q̂, K̂ at different points: outputs agree to bf16 rounding, not bit for bit). A real state, or a module built
    without the pre-pass (``has_prep=False``), is always ``inline``. Chosen before the forward
    (:func:`selected_forward` reads it).

    Raises:
        InputError: MAMBA3_GEN_ROTATE names none of ``auto``, ``prepass``, ``inline``.
    """
    name = env_choice("MAMBA3_GEN_ROTATE", ROTATIONS)
    if meta["S"] == 0 or not has_prep:
        return "inline"
    if name == "auto":
        return auto_rotation(meta, keep_states)
    return name


def chunk_slots(B: int, L: int, C: int, NS: int, is_varlen: bool) -> tuple[int, int]:
    """(NC, slots): chunks per batch row, and the per-chunk tensors' slot count. Sequence s's chunk j is slot
    s·NC + j, or packed (varlen) cu[s] // C + s + j, below L // C + NS: an upper bound known from the shapes."""
    NC = triton.cdiv(L, C)
    return NC, (L // C + NS if is_varlen else B * NC)


SAVE_STATES = ("auto", "always", "never")


def keeps_chunk_states(meta: dict, forward: str, rotation: str) -> bool:
    """Whether a forward that autograd will differentiate keeps its per-chunk tensors (``CHUNK_NAMES``: the state
    entering each chunk after its first step, fp32, its Θ and carried tokens) for the backward, which then does not
    run the states kernel again (2.3 ms of 20.8 for siso_trap_complex fwd+bwd at B8 L4096 H32 on the H200, 2026-12-03).
    Read from MAMBA3_GEN_SAVE_STATES at each call: ``auto`` (the default) keeps them for SISO specs, 4·P·N/C bytes
    per token and head (537 MB at B8 L4096 H32 P64 N128 C64, where the official SISO keeps ~0.8 GB of bf16 states
    and rotated Q, K), not for MIMO ones (their chunks are short: 2.1 GB at R4 C16; the official MIMO recomputes);
    ``always``; ``never``. Never after the rotation pre-pass (its forward kernels carry no Θ). Kept states are fp32
    (the chunked forward then stores fp32 whatever MAMBA3_GEN_CHUNK_STATES says). Under activation checkpointing the
    forward runs twice and keeps them twice: ``never`` suits a checkpointed layer.

    Raises:
        InputError: MAMBA3_GEN_SAVE_STATES names none of ``auto``, ``always``, ``never``."""
    name = env_choice("MAMBA3_GEN_SAVE_STATES", SAVE_STATES)
    if name == "never" or rotation == "prepass":
        return False
    return name == "always" or meta["R"] == 1


def chunk_states_dtype(meta: dict) -> str:
    """dtype of the chunked forward's per-chunk entering states: the spec's choice (META["chunk_states_dtype"]:
    bf16 with bf16 dot operands, else fp32), or MAMBA3_GEN_CHUNK_STATES=bf16|fp32 (read at each call; bf16 halves
    the largest intermediate's traffic at the cost of rounding the state the readout dot sees to 8 mantissa bits)."""
    name = os.environ.get("MAMBA3_GEN_CHUNK_STATES", "").strip().lower() or meta.get("chunk_states_dtype", "fp32")
    if name not in _STATE_DTYPES:
        raise InputError(f"MAMBA3_GEN_CHUNK_STATES={name!r}; expected one of {', '.join(_STATE_DTYPES)}")
    return name


AUTOTUNE = ("on", "off")


def autotune_configs(configs: list) -> list:
    """The configs a generated kernel autotunes over: all of them, or only the first (the default) when the CPU
    interpreter runs (it has no timer) or MAMBA3_GEN_AUTOTUNE=off (deterministic runs, no tuning compiles). Read
    when the generated module is imported.

    Raises:
        InputError: MAMBA3_GEN_AUTOTUNE is set to neither ``on`` nor ``off``."""
    if env_choice("MAMBA3_GEN_AUTOTUNE", AUTOTUNE) == "off" or INTERPRETING:
        return configs[:1]
    return configs


def build_key(meta: dict) -> str:
    """What tells one build's registered ops from another's: spec name and hash, template hash, target, and whether
    MAMBA3_GEN_AUTOTUNE=off cut its kernels to one config (read at import, as :func:`autotune_configs` does). Two
    builds of one spec from other templates (a notebook that edits a template) or with other autotune lists must not
    share the first one's kernels."""
    key = f"{meta['name']}_{meta['spec_hash'][:12]}_{meta.get('template_hash', 'na')}_{meta['arch']}"
    return key + ("_untuned" if env_choice("MAMBA3_GEN_AUTOTUNE", AUTOTUNE) == "off" else "")


def prune_kept_states_configs(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` of the fused forward's autotuner: a launch that keeps the per-chunk states for the
    backward (``STORE_CHUNKS``, a training forward) tries only the configs with the full P block and no register cap.
    On the H200 the training forward's winner was the full block at 255 registers (siso_trap_complex B8 L4096 H32,
    ncu, 2026-12-03: grid 256); the half block and the 128-register cap were tuned for inference and cost a first
    training call two more compiles (~2 s each, first fwd+bwd call 31.8 s against the 30 s target). A small batch
    takes the chunked forward under ``auto``, where the half block's extra programs were the point. Other launches
    keep every config."""
    if not kwargs.get("STORE_CHUNKS", named_args.get("STORE_CHUNKS")):  # a keyword or a positional argument
        return configs
    full = max(c.kwargs["BLOCK_P"] for c in configs)
    kept = [c for c in configs if c.kwargs["BLOCK_P"] == full and not c.maxnreg]
    return kept or configs


class ForwardOp:
    """``op(q, k, v, adt, dt, trap=None, q_bias=None, k_bias=None, angles=None, D=None, z=None, mimo_v=None,
    mimo_z=None, mimo_o=None, initial_states=None, return_final_states=False, cu_seqlens=None)``.

    Shapes (official Mamba-3 conventions, §2/§4 of the math doc): q, k (B, L, G, N) for R == 1 and (B, L, R, G, N)
    for R > 1; v, z (B, L, H, P); adt = A·Δ, dt = Δ, trap = pre-sigmoid λ logit: (B, H, L) fp32; q_bias, k_bias
    (H, N) / (H, R, N); angles (B, L, H, S) raw per-step angles; D (H,); mimo_v, mimo_z, mimo_o (H, R, P).
    Returns out (B, L, H, P) in v's dtype, and with return_final_states also a Mamba3State (see state.py).
    With R > 1, mimo_o is required; passing mimo_o=None explicitly makes out the per-rank output y
    (B, L, R, H, P) before the rank reduction (the official MIMO_Out=None): y_r = H q̂_r + D·(v ⊙ mimo_v_r), ungated;
    a spec with options.z_gate raises InputError naming mimo_o. Its backward takes dout (B, L, R, H, P).
    """

    def __init__(self, meta: dict, kernel, chunked=None, prep=None):
        self.meta = meta
        self.kernel = kernel
        self.chunked_kernels = chunked  # (states kernel, out kernel) of the chunk-parallel forward, or None
        self.prep_kernel = prep  # the rotation pre-pass (complex states), or None
        self.op = self._register()
        self.chunked_op = self._register("chunked") if chunked is not None else None
        # the same two forwards after the rotation pre-pass: their own ops (their launches differ)
        self.prepass_ops = {}
        if prep is not None:
            self.prepass_ops["fused"] = self._register("fused", prepass=True)
            if chunked is not None:
                self.prepass_ops["chunked"] = self._register("chunked", prepass=True)
        self.__doc__ = f"Mamba-3 forward for spec {meta['name']!r}.\n\n" + (ForwardOp.__doc__ or "")

    def __repr__(self):
        return f"<mamba3 forward {self.meta['name']} sha256={self.meta['spec_hash'][:12]}>"

    def __call__(self, q, k, v, adt, dt, trap=None, q_bias=None, k_bias=None, angles=None, D=None, z=None,
                 mimo_v=None, mimo_z=None, mimo_o=UNSET, initial_states: Optional[Mamba3State] = None,
                 return_final_states: bool = False, cu_seqlens=None):
        m = self.meta
        P, G = m["P"], m["G"]
        mimo_o = resolve_mimo_o(m, mimo_o)
        if not isinstance(v, torch.Tensor) or v.dim() != 4:
            got = (f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__)
            raise InputError(f"v must be a torch.Tensor of shape (B, L, H, P={P}); got {got}")
        if not isinstance(return_final_states, bool):
            raise InputError(f"return_final_states must be True or False; got {type(return_final_states).__name__}")
        B, L, H, _ = v.shape
        dev = v.device
        if H < 1 or H % G:
            raise InputError(f"v has H={H} heads; expected a positive multiple of the spec's ngroups G={G}")
        check_varlen(m, B, cu_seqlens)  # before the other inputs' shapes, which are read off v's B
        x = check_layer_inputs(m, (B, L), H, dev, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z,
                               mimo_v, mimo_z, mimo_o)

        is_varlen = cu_seqlens is not None
        if is_varlen:
            cu_seqlens = check_cu_seqlens(cu_seqlens, dev)  # type, rank, dtype, device; values at launch
            NS = cu_seqlens.shape[0] - 1
        else:
            NS = B

        has_init = initial_states is not None
        if has_init:
            if not m["initial_states"]:
                raise InputError(f"initial_states were given but spec {m['name']!r} has options.initial_states: false")
            initial_states = check_state(m, "initial_states", initial_states, NS, H, dev, exact_dtype=False)
        if return_final_states and not m["final_states"]:
            raise InputError(f"return_final_states=True but spec {m['name']!r} has options.final_states: false")

        init = initial_states if has_init else Mamba3State(None, None, None, None)
        grads = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                                for t in (*x.values(), *init))
        wants = wants_chunk_states(m, grads, getattr(self, "backward", None) is not None)
        rotation = selected_rotation(m, self.prep_kernel is not None, keep_states=wants)
        op = self.op
        forward = selected_forward(m, NS, H, dev, has_chunked=self.chunked_op is not None, rotation=rotation)
        if forward == "chunked":
            if self.chunked_op is None:
                raise InputError(f"MAMBA3_GEN_FORWARD=chunked but the module of spec {m['name']!r} has no chunked "
                                 "forward (built by an older generator); rebuild it")
            op = self.chunked_op
        chunk_states_dtype(m)  # the variable is checked on every call, whichever forward runs
        if rotation == "prepass":
            op = self.prepass_ops[forward]
        keep = wants and keeps_chunk_states(m, forward, rotation)  # never after the pre-pass
        out, *final = op(*(x[n] for n in _LAYER_INPUTS), *init, cu_seqlens, return_final_states, keep)
        final = final[:len(STATE_FIELDS)]  # the chunk tensors after them are the backward's
        if not return_final_states:
            return out
        layout = state_layout(m, NS, H)
        return out, Mamba3State(*[t if layout[f] is not None else None for f, t in zip(Mamba3State._fields, final)])

    # -- the registered op: launch (eager) and output shapes (tracing) ---------------------------------------------
    def _outputs(self, v, NS: int, return_final_states: bool, mimo_o=None):
        B, L, H, P = v.shape
        out = torch.empty(out_shape(features(self.meta), (B, L), H, P, mimo_o), device=v.device, dtype=v.dtype)
        layout = state_layout(self.meta, NS, H) if return_final_states else dict.fromkeys(Mamba3State._fields)
        # absent state fields are empty tensors: a registered op returns a fixed tuple of tensors
        states = [torch.empty(f[0], device=v.device, dtype=f[1]) if f is not None
                  else torch.empty((0,), device=v.device, dtype=torch.float32) for f in layout.values()]
        return out, states

    def _chunk_outputs(self, v, NS: int, is_varlen: bool, save_chunks: bool, prepass: bool = False) -> list:
        """The ``CHUNK_NAMES`` tensors a forward keeps for its backward (fp32; an empty tensor for one it does not
        keep): (slots, H, P, N), (slots, H, S), (slots, J−1, R, H, N), (slots, J−1, H, P).

        Raises:
            InputError: `save_chunks` with the rotation pre-pass (its forward kernels carry no Θ to keep)."""
        if save_chunks and prepass:
            raise InputError("save_chunks=True with the rotation pre-pass: its kernels carry no Θ to keep; "
                             "MAMBA3_GEN_ROTATE=inline keeps them, or MAMBA3_GEN_SAVE_STATES=never")
        return [torch.empty(sh if save_chunks and sh is not None else (0,), device=v.device, dtype=torch.float32)
                for sh in self.chunk_shapes(v.shape, NS, is_varlen)]

    def chunk_shapes(self, v_shape, NS: int, is_varlen: bool) -> list:
        """The shapes of the ``CHUNK_NAMES`` tensors for v of shape (B, L, H, P) and NS sequences, None for one
        this spec has not (Θ of a real state, carried tokens below two lags): (slots, H, P, N), (slots, H, S),
        (slots, J−1, R, H, N), (slots, J−1, H, P). The forward keeps them; the backward's re-run fills them."""
        m = self.meta
        B, L, H, P = v_shape
        _, slots = chunk_slots(B, L, m["C"], NS, is_varlen)
        J, R = m["J"], m["R"]
        return [(slots, H, P, m["N"]), (slots, H, m["S"]) if m["S"] else None,
                (slots, J - 1, R, H, m["N"]) if J > 1 else None, (slots, J - 1, H, P) if J > 1 else None]

    def _prepass(self, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o, out,
                 init_angle, init_ssm, init_k, init_v, fin, cu_seqlens, flags):
        """The rotation pre-pass: one kernel, grid (sequence × segment, head, pair block; :func:`prep_segments`),
        walks each segment block by block carrying Θ (fp32, mod 2π, as the inline kernels do) and writes Q̂, K̂ per head, head-major (B, H, L, R, N;
        each row holds the rotation pairs' first dims, then their second), biased and rotated, in the input dtype
        (fp32 for fp32 inputs or fp32 dot operands), and the final Θ into ``fin[0]`` when it is asked for.
        Returns (Q̂, K̂), to pass as q, k with PREPPED."""
        m = self.meta
        B, L, H, _ = v.shape
        NS = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        keep = q.dtype in (torch.bfloat16, torch.float16) and m["compute_dtype"] != "fp32"
        shape = (B, H, L, m["R"], m["N"])  # head-major: a chunk's rows of one head are contiguous
        q_hat = torch.empty(shape, device=v.device, dtype=q.dtype if keep else torch.float32)
        k_hat = torch.empty_like(q_hat)

        segs = prep_segments(NS, H, L if cu_seqlens is None else L // max(NS, 1), m["N2"], v.device)

        def grid(cfg):
            return (NS * segs, H, triton.cdiv(m["N2"], cfg["BLOCK_K"]))

        self.prep_kernel[grid](q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o, out,
                               init_angle, init_ssm, init_k, init_v, *fin, q_hat, k_hat, cu_seqlens, L, H, m["G"],
                               size_class(NS, H, v.device), segs, *angles.stride()[:3], **flags)
        return q_hat, k_hat

    def _launch(self, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o,
                init_angle, init_ssm, init_k, init_v, cu_seqlens, return_final_states, save_chunks, prepass=False):
        B, L, H, P = v.shape
        NS = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        if cu_seqlens is not None:
            # Here, inside the op, so that torch.compile never traces a read of the values. On a GPU the check runs
            # on the device (no host sync, capturable by a CUDA graph); a zero-length sequence is fine: the kernel's
            # chunk loop runs zero times and its final state is its initial state (or zero).
            check_cu_seqlens_values(cu_seqlens, L)
        out, states = self._outputs(v, NS, return_final_states, mimo_o)
        fin = [t if t.numel() else None for t in states]
        angle_strides = angles.stride()[:3] if angles is not None else (0, 0, 0)
        flags = dict(HAS_INIT=init_ssm is not None, STORE_FINAL=return_final_states,
                     IS_VARLEN=cu_seqlens is not None, PER_RANK=per_rank(features(self.meta), mimo_o))
        if prepass:
            q, k = self._prepass(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o, out,
                                 init_angle, init_ssm, init_k, init_v, fin, cu_seqlens, flags)

        def grid(cfg):
            return (NS, H, triton.cdiv(P, cfg["BLOCK_P"]))

        # save_chunks: the per-chunk tensors the backward reads
        chunks = self._chunk_outputs(v, NS, cu_seqlens is not None, save_chunks, prepass)
        self.kernel[grid](
            q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o, out,
            init_angle, init_ssm, init_k, init_v, *fin, *[t if t.numel() else None for t in chunks], cu_seqlens,
            L, H, self.meta["G"], size_class(NS, H, v.device), triton.cdiv(L, self.meta["C"]), *angle_strides,
            **flags, PREPPED=prepass,
            STORE_CHUNKS=save_chunks,
        )
        return (out, *states, *chunks)

    def _launch_chunked(self, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o,
                        init_angle, init_ssm, init_k, init_v, cu_seqlens, return_final_states, save_chunks,
                        prepass=False):
        """The chunk-parallel forward: the states kernel (grid: sequence, head, P block x pair block; sequential over
        chunks) stores the state entering every chunk (after its first step), its Θ and, with two or more lags,
        the carried tokens; then the out kernel (grid: chunk slot, head, P block) computes every chunk at once. A
        packed batch gets L // C + NS slots (sequence s's chunk j is slot cu[s] // C + s + j), an upper bound
        known from the shapes, so nothing is read back from the GPU."""
        m = self.meta
        B, L, H, P = v.shape
        C, N, S, J, R = m["C"], m["N"], m["S"], m["J"], m["R"]
        is_varlen = cu_seqlens is not None
        NS = B if not is_varlen else cu_seqlens.shape[0] - 1
        if is_varlen:
            check_cu_seqlens_values(cu_seqlens, L)
        NC, slots = chunk_slots(B, L, C, NS, is_varlen)
        out, states = self._outputs(v, NS, return_final_states, mimo_o)
        fin = [t if t.numel() else None for t in states]
        angle_strides = angles.stride()[:3] if angles is not None else (0, 0, 0)
        dev = v.device
        flags = dict(HAS_INIT=init_ssm is not None, STORE_FINAL=return_final_states, IS_VARLEN=is_varlen,
                     PER_RANK=per_rank(features(m), mimo_o))
        if prepass:
            q, k = self._prepass(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o, out,
                                 init_angle, init_ssm, init_k, init_v, fin, cu_seqlens, flags)
        kept = self._chunk_outputs(v, NS, is_varlen, False, prepass=prepass and save_chunks)
        # kept for the backward: fp32 whatever MAMBA3_GEN_CHUNK_STATES says now (the fake output, traced earlier)
        states_dtype = torch.float32 if save_chunks else _STATE_DTYPES[chunk_states_dtype(m)]
        chunk_ssm = torch.empty((slots, H, P, N), device=dev, dtype=states_dtype)
        # the PREPPED out kernel needs no Θ (its Q̂, K̂ are rotated)
        chunk_angle = torch.empty((slots, H, S), device=dev, dtype=torch.float32) if S and not prepass else None
        chunk_k = torch.empty((slots, J - 1, R, H, N), device=dev, dtype=torch.float32) if J > 1 else None
        chunk_v = torch.empty((slots, J - 1, H, P), device=dev, dtype=torch.float32) if J > 1 else None
        states_kernel, out_kernel = self.chunked_kernels
        args = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o, out,
                init_angle, init_ssm, init_k, init_v, *fin, chunk_ssm, chunk_angle, chunk_k, chunk_v, cu_seqlens,
                L, H, m["G"], size_class(NS, H, dev), NC, NS, max(0, NS - 1).bit_length(), *angle_strides)
        flags["PREPPED"] = prepass

        def states_grid(cfg):
            return (NS, H, triton.cdiv(P, cfg["BLOCK_P"]) * triton.cdiv(m["N2"], cfg["BLOCK_K"]))

        def out_grid(cfg):
            return (slots, H, triton.cdiv(P, cfg["BLOCK_P"]))

        states_kernel[states_grid](*args, **flags)
        if slots:
            out_kernel[out_grid](*args, **flags)
        if save_chunks:  # the backward takes them as they are
            kept = [t if t is not None else e for t, e in zip((chunk_ssm, chunk_angle, chunk_k, chunk_v), kept)]
        return (out, *states, *kept)

    def _register(self, forward: str = "fused", prepass: bool = False):
        """A torch.library custom op per spec (and forward, and rotation), so the forward is one opaque node under
        torch.compile(fullgraph=True)."""
        m = self.meta
        name = f"mamba3_gen::fwd_{build_key(m)}"
        if forward != "fused":
            name += f"_{forward}"
        if prepass:
            name += "_prepass"
        launch = self._launch if forward == "fused" else self._launch_chunked
        if name in _REGISTERED:
            return _REGISTERED[name]

        @torch.library.custom_op(name, mutates_args=(), schema=_OP_SCHEMA)
        def op(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o,
               init_angle, init_ssm, init_k, init_v, cu_seqlens, return_final_states, save_chunks):
            return launch(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o,
                          init_angle, init_ssm, init_k, init_v, cu_seqlens, return_final_states, save_chunks,
                          prepass=prepass)

        @op.register_fake
        def _(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o,
              init_angle, init_ssm, init_k, init_v, cu_seqlens, return_final_states, save_chunks):
            NS = v.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
            out, states = self._outputs(v, NS, return_final_states, mimo_o)
            return (out, *states, *self._chunk_outputs(v, NS, cu_seqlens is not None, save_chunks, prepass))

        _REGISTERED[name] = op
        return op
