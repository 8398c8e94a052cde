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

from mamba3_gen.runtime.state import Mamba3State

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_REGISTERED: dict = {}  # op name -> registered custom op (one per spec and target, shared by its loaded modules)
_OP_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor adt, Tensor dt, Tensor? trap, Tensor q_bias, Tensor k_bias, "
    "Tensor? angles, Tensor? D, Tensor? z, Tensor? mimo_v, Tensor? mimo_z, Tensor? mimo_o, Tensor? init_angle, "
    "Tensor? init_ssm, Tensor? init_k, Tensor? init_v, Tensor? cu_seqlens, bool return_final_states) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


# Generated kernels are decorated at import; TRITON_INTERPRET=1 then runs them on the CPU (triton.jit reads it too).
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def autotune_configs(configs: list) -> list:
    """The configs a generated kernel autotunes over: all of them, or only the first (the default) when the CPU
    interpreter runs (it has no timer) or MAMBA3_GEN_AUTOTUNE=off (deterministic runs, no tuning compiles)."""
    if INTERPRETING or os.environ.get("MAMBA3_GEN_AUTOTUNE", "").lower() == "off":
        return configs[:1]
    return configs


class ForwardOp:
    """``op(q, k, v, adt, dt, trap=None, q_bias=None, k_bias=None, angles=None, D=None, z=None, mimo_v=None,
    mimo_z=None, mimo_o=None, initial_states=None, return_final_states=False, cu_seqlens=None)``.

    Shapes (official Mamba-3 conventions, §2/§4 of the math doc): q, k (B, L, G, N) for R == 1 and (B, L, R, G, N)
    for R > 1; v, z (B, L, H, P); adt = A·Δ, dt = Δ, trap = pre-sigmoid λ logit: (B, H, L) fp32; q_bias, k_bias
    (H, N) / (H, R, N); angles (B, L, H, S) raw per-step angles; D (H,); mimo_v, mimo_z, mimo_o (H, R, P).
    Returns out (B, L, H, P) in v's dtype, and with return_final_states also a Mamba3State (see state.py).
    """

    def __init__(self, meta: dict, kernel):
        self.meta = meta
        self.kernel = kernel
        self.op = self._register()
        self.__doc__ = f"Mamba-3 forward for spec {meta['name']!r}.\n\n" + (ForwardOp.__doc__ or "")

    def __repr__(self):
        return f"<mamba3 forward {self.meta['name']} sha256={self.meta['spec_hash'][:12]}>"

    # -- checks ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _expect(name: str, t, shape: tuple, device=None, dtypes=_FLOATS, contiguous=True):
        if t is None:
            raise ValueError(f"{name} is required by this spec; expected a tensor of shape {shape}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
        if t.dtype not in dtypes:
            raise ValueError(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")
        if device is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}; expected {device} like v")
        return t.contiguous() if contiguous else t

    def _absent(self, name: str, t, why: str):
        if t is not None:
            raise ValueError(f"{name} was given but spec {self.meta['name']!r} {why}; drop it or change the spec")

    def __call__(self, q, k, v, adt, dt, trap=None, q_bias=None, k_bias=None, angles=None, D=None, z=None,
                 mimo_v=None, mimo_z=None, mimo_o=None, initial_states: Optional[Mamba3State] = None,
                 return_final_states: bool = False, cu_seqlens=None):
        m = self.meta
        N, P, R, G, S = m["N"], m["P"], m["R"], m["G"], m["S"]
        if not isinstance(v, torch.Tensor) or v.dim() != 4:
            raise ValueError(f"v must be a tensor of shape (B, L, H, P={P}), got "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        B, L, H, _ = v.shape
        dev = v.device
        if L < 1:
            raise ValueError("v has no tokens (L == 0)")
        if H % G:
            raise ValueError(f"v has H={H} heads, not a multiple of the spec's ngroups G={G}")
        v = self._expect("v", v, (B, L, H, P), dev)
        qk_shape = (B, L, G, N) if R == 1 else (B, L, R, G, N)
        q = self._expect("q", q, qk_shape, dev)
        k = self._expect("k", k, qk_shape, dev)
        adt = self._expect("adt", adt, (B, H, L), dev)
        dt = self._expect("dt", dt, (B, H, L), dev)
        if m["has_trap"]:
            trap = self._expect("trap", trap, (B, H, L), dev)
        else:
            self._absent("trap", trap, f"takes λ from its rule ({m['lambda']})")
        bias_shape = (H, N) if R == 1 else (H, R, N)
        q_bias = torch.zeros(bias_shape, device=dev) if q_bias is None else q_bias
        k_bias = torch.zeros(bias_shape, device=dev) if k_bias is None else k_bias
        q_bias = self._expect("q_bias", q_bias, bias_shape, dev).float()
        k_bias = self._expect("k_bias", k_bias, bias_shape, dev).float()
        if S:
            # Angles are often shared by all heads (a (B, L, 1, S) tensor expanded over H): the kernel takes their
            # strides, so that stride-0 view is read as it is instead of being copied H times.
            angles = self._expect("angles", angles, (B, L, H, S), dev, contiguous=False)
            if angles.stride(3) != 1:
                angles = angles.contiguous()
        else:
            self._absent("angles", angles, "has a real state (no rotation)")
        if m["d_skip"]:
            D = self._expect("D", D, (H,), dev).float()
        else:
            self._absent("D", D, "has no D skip (options.d_skip: false)")
        if m["z_gate"]:
            z = self._expect("z", z, (B, L, H, P), dev)
        else:
            self._absent("z", z, "has no z gate (options.z_gate: false)")
        if R > 1:
            mimo_v = self._expect("mimo_v", mimo_v, (H, R, P), dev).float()
            mimo_o = self._expect("mimo_o", mimo_o, (H, R, P), dev).float()
            if m["z_gate"]:
                mimo_z = self._expect("mimo_z", mimo_z, (H, R, P), dev).float()
            else:
                self._absent("mimo_z", mimo_z, "has no z gate")
        else:
            for name, t in (("mimo_v", mimo_v), ("mimo_z", mimo_z), ("mimo_o", mimo_o)):
                self._absent(name, t, "is SISO (mimo_rank 1)")

        is_varlen = cu_seqlens is not None
        if is_varlen:
            if not m["varlen"]:
                raise ValueError(f"cu_seqlens was given but spec {m['name']!r} has options.varlen: false")
            if B != 1:
                raise ValueError(f"varlen packs sequences along L: batch must be 1, got B={B}")
            cu_seqlens = self._expect("cu_seqlens", cu_seqlens, (cu_seqlens.shape[0],), dev, (torch.int32, torch.int64))
            NS = cu_seqlens.shape[0] - 1
            if NS < 1:
                raise ValueError("cu_seqlens must hold at least two offsets (one sequence)")
        else:
            NS = B

        has_init = initial_states is not None
        if has_init:
            if not m["initial_states"]:
                raise ValueError(f"initial_states were given but spec {m['name']!r} has options.initial_states: false")
            initial_states = self._check_state("initial_states", initial_states, NS, H, dev)
        if return_final_states and not m["final_states"]:
            raise ValueError(f"return_final_states=True but spec {m['name']!r} has options.final_states: false")

        init = initial_states if has_init else Mamba3State(None, None, None, None)
        out, *final = self.op(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o,
                              *init, cu_seqlens, return_final_states)
        if not return_final_states:
            return out
        shapes = self.state_shapes(NS, H)
        return out, Mamba3State(*[t if shapes[f] is not None else None for f, t in zip(Mamba3State._fields, final)])

    # -- the registered op: launch (eager) and output shapes (tracing) ---------------------------------------------
    def _outputs(self, v, NS: int, return_final_states: bool):
        B, L, H, P = v.shape
        out = torch.empty((B, L, H, P), device=v.device, dtype=v.dtype)
        shapes = self.state_shapes(NS, H) if return_final_states else dict.fromkeys(Mamba3State._fields)
        # absent state fields are empty tensors: a registered op returns a fixed tuple of tensors
        states = [torch.empty(s if s is not None else (0,), device=v.device, dtype=torch.float32)
                  for s in shapes.values()]
        return out, states

    def _launch(self, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o,
                init_angle, init_ssm, init_k, init_v, cu_seqlens, return_final_states):
        B, L, H, P = v.shape
        NS = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        if cu_seqlens is not None:
            cpu = cu_seqlens.cpu()
            if int(cpu[0]) != 0 or int(cpu[-1]) != L or bool((cpu[1:] <= cpu[:-1]).any()):
                raise ValueError(f"cu_seqlens must start at 0, end at L={L} and strictly increase (no empty sequence)")
        out, states = self._outputs(v, NS, return_final_states)
        fin = [t if t.numel() else None for t in states]
        angle_strides = angles.stride()[:3] if angles is not None else (0, 0, 0)

        def grid(cfg):
            return (NS, H, triton.cdiv(P, cfg["BLOCK_P"]))

        self.kernel[grid](
            q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o, out,
            init_angle, init_ssm, init_k, init_v, *fin, cu_seqlens,
            L, H, self.meta["G"], *angle_strides, HAS_INIT=init_ssm is not None, STORE_FINAL=return_final_states,
            IS_VARLEN=cu_seqlens is not None,
        )
        return (out, *states)

    def _register(self):
        """A torch.library custom op per spec, so the forward is one opaque node under torch.compile(fullgraph=True)."""
        m = self.meta
        name = f"mamba3_gen::fwd_{m['name']}_{m['spec_hash'][:12]}_{m['arch']}"
        if name in _REGISTERED:
            return _REGISTERED[name]

        @torch.library.custom_op(name, mutates_args=(), schema=_OP_SCHEMA)
        def op(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o,
               init_angle, init_ssm, init_k, init_v, cu_seqlens, return_final_states):
            return self._launch(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o,
                                init_angle, init_ssm, init_k, init_v, cu_seqlens, return_final_states)

        @op.register_fake
        def _(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o,
              init_angle, init_ssm, init_k, init_v, cu_seqlens, return_final_states):
            NS = v.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
            out, states = self._outputs(v, NS, return_final_states)
            return (out, *states)

        _REGISTERED[name] = op
        return op

    # -- states ---------------------------------------------------------------------------------------------------
    def state_shapes(self, NS: int, H: int) -> dict:
        m = self.meta
        k_shape = (NS, H, m["N"]) if m["R"] == 1 else (NS, m["R"], H, m["N"])
        return {
            "angle": (NS, H, m["S"]) if m["S"] else None,
            "ssm": (NS, H, m["P"], m["N"]),
            "k": k_shape if m["carries_prev_token"] else None,
            "v": (NS, H, m["P"]) if m["carries_prev_token"] else None,
        }

    def _check_state(self, name, st, NS, H, dev) -> Mamba3State:
        if not isinstance(st, Mamba3State):
            if isinstance(st, (tuple, list)) and len(st) == 4:
                st = Mamba3State(*st)
            else:
                raise ValueError(f"{name} must be a Mamba3State(angle, ssm, k, v) (or a 4-tuple), got {type(st).__name__}")
        fields = {}
        for f, shape in self.state_shapes(NS, H).items():
            t = getattr(st, f)
            if shape is None:  # not part of this spec's state (a real state has no angle, exp_euler no k/v)
                if t is not None:
                    raise ValueError(f"{name}.{f} was given but spec {self.meta['name']!r} carries no {f}; "
                                     "is this state from another spec?")
                fields[f] = None
                continue
            fields[f] = self._expect(f"{name}.{f}", t, shape, dev).float()
        return Mamba3State(**fields)
