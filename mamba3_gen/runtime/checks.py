"""Input checks shared by the prefill forward and the decode step: every mistake is an InputError (a ValueError)
that names the tensor and the shape (or dtype, or device) the spec expects, before any kernel sees it."""
from __future__ import annotations

import os

import torch

from mamba3_gen.errors import DeviceError, InputError
from mamba3_gen.runtime.state import Mamba3State, state_layout
from mamba3_gen.signature import LAYER_ARGS, LAYER_INPUTS, features

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_TO_FP32 = ("D", "mimo_v", "mimo_z", "mimo_o")  # inputs converted to fp32 on the host (besides the biases)


def expect(name: str, t, shape: tuple, device=None, dtypes=FLOATS, contiguous=True):
    if t is None:
        raise InputError(f"{name} is required by this spec; expected a tensor of shape {tuple(shape)}")
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of shape {tuple(shape)}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise InputError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    if t.dtype not in dtypes:
        raise InputError(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        raise InputError(f"{name} is on {t.device}; expected {device} like v")
    return t.contiguous() if contiguous else t


CU_SEQLENS_DTYPES = (torch.int32, torch.int64)


def check_cu_seqlens(cu_seqlens, dev) -> torch.Tensor:
    """Check what can be checked of ``cu_seqlens`` without reading its values: a 1-D int32/int64 tensor of NS + 1
    offsets (NS >= 1) on v's device. Returns it contiguous. The values are checked at launch
    (:func:`check_cu_seqlens_values`).

    Raises:
        InputError: naming cu_seqlens, what it is, and the expected shape and dtype.
    """
    expected = ("a 1-D torch.Tensor (NS + 1,) of int32/int64 offsets, e.g. "
                "torch.tensor([0, 5, 5, 9], dtype=torch.int32, device=v.device)")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise InputError(f"cu_seqlens must be {expected}; got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1:
        raise InputError(f"cu_seqlens has shape {tuple(cu_seqlens.shape)} ({cu_seqlens.dim()}-D); expected (NS + 1,): "
                         f"{expected}")
    if cu_seqlens.shape[0] < 2:
        raise InputError(f"cu_seqlens has shape {tuple(cu_seqlens.shape)}; expected (NS + 1,) with NS >= 1 sequences "
                         "(at least two offsets, e.g. [0, L])")
    if cu_seqlens.dtype not in CU_SEQLENS_DTYPES:
        raise InputError(f"cu_seqlens has dtype {cu_seqlens.dtype}; expected torch.int32 or torch.int64")
    if cu_seqlens.device != dev:
        raise InputError(f"cu_seqlens is on {cu_seqlens.device}; expected {dev} like v (the kernel reads it there)")
    return cu_seqlens.contiguous()


def check_varlen(meta: dict, B: int, cu_seqlens) -> None:
    """With ``cu_seqlens`` given: the spec takes it (options.varlen) and v has B = 1 (sequences are packed along L).
    Checked before the layer inputs' shapes, which are read off v's B: a (2, L, H, P) v would otherwise be reported
    as a mismatch of some other input's batch.

    Raises:
        InputError: naming the spec option or v's B."""
    if cu_seqlens is None:
        return
    if not features(meta).varlen:
        raise InputError(f"cu_seqlens was given but spec {meta['name']!r} has options.varlen: false")
    if B != 1:
        raise InputError(f"varlen packs sequences along L: v must have B = 1 when cu_seqlens is given; got B = {B}")


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, L: int) -> None:
    """Check the offsets: cu_seqlens[0] == 0, cu_seqlens[-1] == L, never decreasing (equal neighbours are
    zero-length sequences, which are allowed).

    On the CPU the values are read (no device to wait for) and a violation raises :class:`InputError` naming the
    first bad offset. On a GPU reading them would cost a host sync per call and break CUDA-graph capture, so the
    check runs on the device instead (``torch._assert_async``: no sync, capturable); a violation there surfaces as a
    device-side assert ("cu_seqlens must start at 0, ...") at the next synchronization, after which the CUDA context
    is unusable, as with any device assert.

    Raises:
        InputError: (CPU tensors) the offsets break one of the rules above.
    """
    if cu_seqlens.device.type == "cpu":
        cu = cu_seqlens.tolist()
        problem = None
        if cu[0] != 0:
            problem = f"cu_seqlens[0] is {cu[0]}"
        elif cu[-1] != L:
            problem = f"cu_seqlens[-1] is {cu[-1]}"
        else:
            bad = next((i for i in range(1, len(cu)) if cu[i] < cu[i - 1]), None)
            if bad is not None:
                problem = f"cu_seqlens[{bad}] = {cu[bad]} < cu_seqlens[{bad - 1}] = {cu[bad - 1]}"
        if problem is not None:
            shown = cu if len(cu) <= 12 else cu[:6] + ["..."] + cu[-3:]
            raise InputError(f"cu_seqlens must start at 0, end at L={L} (v's token count) and never decrease "
                             f"(equal offsets are empty sequences); {problem} in {shown}")
        return
    ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == L) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
    torch._assert_async(ok, f"cu_seqlens must start at 0, end at L={L} and never decrease")


class _Unset:
    """The default of ``mimo_o`` in the forward and the step: not passed (an explicit None asks for per-rank outputs)."""

    def __repr__(self):
        return "<mimo_o not passed>"


UNSET = _Unset()


def resolve_mimo_o(meta: dict, mimo_o):
    """``mimo_o`` as the kernels take it. With R > 1 a missing ``mimo_o`` is an error rather than a silently 5-D
    output: an explicit ``mimo_o=None`` asks for the per-rank output (…, R, H, P), as the official kernels'
    ``MIMO_Out=None`` does. With R == 1 not passing it is passing None.

    Raises:
        InputError: R > 1 and ``mimo_o`` was not passed.
    """
    if mimo_o is not UNSET:
        return mimo_o
    if meta["R"] > 1:
        raise InputError(f"mimo_o is required by this spec (R={meta['R']}); expected a tensor of shape "
                         f"(H, {meta['R']}, {meta['P']}), or pass mimo_o=None explicitly for the per-rank output "
                         "(…, R, H, P) before the rank reduction")
    return None


def absent(meta: dict, name: str, t, why: str):
    if t is not None:
        raise InputError(f"{name} was given but spec {meta['name']!r} {why}; drop it or change the spec")


def check_device(dev: torch.device) -> None:
    """Raise DeviceError unless the Triton kernels can run on ``dev`` here: a CUDA device, or the CPU with the Triton
    interpreter on (TRITON_INTERPRET=1 set before mamba3_gen loaded its kernels: triton.jit reads it then)."""
    if dev.type == "cuda":
        return
    from mamba3_gen.runtime import forward  # imported by now (it imports this module); its flag is read at import

    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and forward.INTERPRETING:
        return
    if dev.type != "cpu":
        raise DeviceError(f"v is on {dev}; the kernels run on a CUDA GPU (or on the CPU in the Triton interpreter); "
                          "try moving the tensors with .cuda()")
    when = ("TRITON_INTERPRET=1 was set after mamba3_gen loaded its kernels" if os.environ.get("TRITON_INTERPRET") == "1"
            else "TRITON_INTERPRET=1 is not set")
    raise DeviceError(f"v is on the CPU, but Triton runs kernels on the CPU only in its interpreter, and {when}; try "
                      "starting Python with it (`TRITON_INTERPRET=1 python script.py`; in a notebook set "
                      "os.environ['TRITON_INTERPRET'] = '1' before importing mamba3_gen, after a restart), or move "
                      "the tensors to a CUDA GPU with .cuda()")


def check_cute_device(dev: torch.device) -> None:
    """Raise DeviceError unless the CuTe DSL step can run on ``dev``: it needs a CUDA GPU (no interpreter)."""
    if dev.type == "cuda" and torch.cuda.is_available():
        return
    raise DeviceError(f"backend='cute' runs the CuTe DSL kernel, which needs a CUDA GPU, but v is on {dev}; try "
                      "backend='triton' (which also runs on the CPU under TRITON_INTERPRET=1), or move the tensors "
                      "to a CUDA GPU with .cuda()")


def check_layer_inputs(meta: dict, lead: tuple, H: int, dev, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z,
                       mimo_v, mimo_z, mimo_o) -> dict:
    """Check one call's layer inputs; ``lead`` is (B, L) for the forward and (B,) for one decode step.

    Token tensors are lead + their own dims (q, k: G, N or R, G, N; v, z: H, P; angles: H, S); the per-step
    scalars adt, dt, trap are (B, H) + the token dims after B, i.e. (B, H, L) or (B, H). Returns them normalized
    (contiguous, biases and projections fp32, zero biases filled in). mimo_o may be None for R > 1 (the per-rank
    output, mamba3_gen/signature.py), except on a spec with options.z_gate (InputError naming mimo_o)."""
    check_device(dev)
    N, P, R, G, S = meta["N"], meta["P"], meta["R"], meta["G"], meta["S"]
    B, tail = lead[0], tuple(lead[1:])
    given = dict(zip(LAYER_INPUTS, (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o)))
    # each input's shape rule (the table in mamba3_gen/signature.py documents them); which inputs the spec takes,
    # and why it refuses the others, come from that table
    qk = lead + ((G, N) if R == 1 else (R, G, N))
    step, bias, mimo = (B, H) + tail, (H, N) if R == 1 else (H, R, N), (H, R, P)
    shapes = {"q": qk, "k": qk, "v": lead + (H, P), "adt": step, "dt": step, "trap": step, "q_bias": bias,
              "k_bias": bias, "angles": lead + (H, S), "D": (H,), "z": lead + (H, P), "mimo_v": mimo, "mimo_z": mimo,
              "mimo_o": mimo}
    f = features(meta)
    out = {}
    for arg in sorted(LAYER_ARGS, key=lambda a: a.name != "v"):  # v first, as the other shapes are read off it
        name, t = arg.name, given[arg.name]
        if not arg.used(f):
            absent(meta, name, t, arg.absent_why(meta))
            out[name] = None
        elif t is None and arg.omit:  # mimo_o None: the per-rank output (signature.per_rank)
            if f.z_gate:
                raise InputError(
                    f"{name}=None asks for the per-rank output (…, R, H, P) before {name}, but spec "
                    f"{meta['name']!r} gates it with z (options.z_gate: true), and the official kernels disagree on "
                    f"whether a per-rank output is gated (prefill: yes, step: no); pass {name}, or use a copy of "
                    "the spec with options.z_gate: false and gate the per-rank output yourself")
            out[name] = None
        elif name in ("q_bias", "k_bias"):  # zeros when not given
            t = torch.zeros(bias, device=dev) if t is None else t
            out[name] = expect(name, t, bias, dev).float()
        elif name == "angles":
            # Angles are often shared by all heads (a (..., 1, S) tensor expanded over H): kernels take their strides,
            # so that stride-0 view is read as it is instead of being copied H times.
            t = expect(name, t, shapes[name], dev, contiguous=False)
            out[name] = t if t.stride(-1) == 1 else t.contiguous()
        else:
            t = expect(name, t, shapes[name], dev)
            out[name] = t.float() if name in _TO_FP32 else t
    return out


def check_state(meta: dict, name: str, st, NS: int, H: int, dev, exact_dtype: bool) -> Mamba3State:
    """A state of this spec's layout (state.py). ``exact_dtype``: the state is updated in place, so its dtypes must
    be the spec's; otherwise any float dtype is read."""
    if not isinstance(st, Mamba3State):
        if isinstance(st, (tuple, list)) and len(st) == 4:
            st = Mamba3State(*st)
        else:
            raise InputError(f"{name} must be a Mamba3State(angle, ssm, k, v) (or a 4-tuple), got {type(st).__name__}")
    fields = {}
    for f, layout in state_layout(meta, NS, H).items():
        t = getattr(st, f)
        if layout is None:  # not part of this spec's state (a real state has no angle, exp_euler no k/v)
            if t is not None:
                raise InputError(f"{name}.{f} was given but spec {meta['name']!r} carries no {f}; "
                                 "is this state from another spec?")
            fields[f] = None
            continue
        shape, dtype = layout
        dtypes = (dtype,) if exact_dtype else FLOATS
        t = expect(f"{name}.{f}", t, shape, dev, dtypes, contiguous=not exact_dtype)
        if exact_dtype and not t.is_contiguous():
            raise InputError(f"{name}.{f} is not contiguous; a state updated in place must be (use .contiguous())")
        fields[f] = t
    return Mamba3State(**fields)
