"""Host side of a generated decode step: checks one token's inputs and the carried state against the spec, then
launches the Triton step kernel (or the CuTe DSL one, ``backend="cute"``) once.

The state layout is the one the prefill forward returns as final states (state.py), so
``out, st = fwd(..., return_final_states=True)`` followed by ``y, st = step(..., state=st)`` continues the sequence.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
import triton

from mamba3_gen.errors import InputError
from mamba3_gen.runtime.checks import UNSET, check_cute_device, check_layer_inputs, check_state, resolve_mimo_o
from mamba3_gen.runtime.state import Mamba3State, state_layout, zero_state
from mamba3_gen.signature import LAYER_INPUTS, features, out_shape, per_rank

BACKENDS = ("triton", "cute")


class StepOp:
    """``step(q, k, v, adt, dt, trap=None, q_bias=None, k_bias=None, angles=None, D=None, z=None, mimo_v=None,
    mimo_z=None, mimo_o=None, *, state, inplace=False, backend="triton") -> (out, new_state)``.

    One token of B sequences: q, k (B, G, N) for R == 1 and (B, R, G, N) for R > 1; v, z (B, H, P); adt, dt, trap
    (B, H) fp32, encoded as the spec's inputs section says (adt = A·Δ or A; trap = λ logit or λ); q_bias, k_bias
    (H, N) / (H, R, N); angles (B, H, S) raw (a stride-0 head dim is read as it is); D (H,); mimo_* (H, R, P).
    ``state``: a Mamba3State of this spec (``zero_state(B, H, device)`` before the first token, or the forward's
    final states). Returns out (B, H, P) in v's dtype and the new state; with ``inplace=True`` the new state is
    written over ``state`` (whose dtypes must then be the spec's) and that same object is returned.
    With R > 1, mimo_o is required; an explicit mimo_o=None makes out the per-rank y (B, R, H, P) before the rank
    reduction, ungated (the official step's outproj=None); a spec with options.z_gate raises InputError naming
    mimo_o, and so does backend="cute" (the CuTe step has no per-rank output).
    """

    def __init__(self, meta: dict, kernel, block_p: int, num_warps: int, package: Optional[str] = None,
                 maxnreg: Optional[int] = None, head_major: bool = False):
        self.meta = meta
        self.kernel = kernel
        # launch shape (benchmarks sweep it): rows of H per program, warps per program, register cap per thread
        self.block_p = block_p
        self.num_warps = num_warps
        self.maxnreg = maxnreg
        self.head_major = head_major  # grid (H, B) instead of (B, H)
        self.stream = False  # evict-first loads and streaming stores of H
        self.package = package  # the generated package, where the CuTe DSL twin (step_cute.py) lives
        self._cute = None
        self._counters: dict = {}  # (B·H, device) -> int32 zeros: per-head arrival counters of in-place launches
        self.__doc__ = f"Mamba-3 decode step for spec {meta['name']!r}.\n\n" + (StepOp.__doc__ or "")

    def __repr__(self):
        return f"<mamba3 step {self.meta['name']} sha256={self.meta['spec_hash'][:12]}>"

    def zero_state(self, batch: int, heads: int, device=None) -> Mamba3State:
        return zero_state(self.meta, batch, heads, device)

    def __call__(self, q, k, v, adt, dt, trap=None, q_bias=None, k_bias=None, angles=None, D=None, z=None,
                 mimo_v=None, mimo_z=None, mimo_o=UNSET, *, state: Mamba3State, inplace: bool = False,
                 backend: str = "triton"):
        m = self.meta
        P, G = m["P"], m["G"]
        mimo_o = resolve_mimo_o(m, mimo_o)
        if backend not in BACKENDS:
            raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(v, torch.Tensor) or v.dim() != 3:
            raise InputError(f"v must be a tensor of shape (B, H, P={P}) (one token), got "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        B, H, _ = v.shape
        dev = v.device
        if backend == "cute":
            check_cute_device(dev)  # first: the interpreter, which the input checks suggest on the CPU, cannot run it
        if H % G:
            raise InputError(f"v has H={H} heads, not a multiple of the spec's ngroups G={G}")
        x = check_layer_inputs(m, (B,), H, dev, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z,
                               mimo_v, mimo_z, mimo_o)
        if backend == "cute" and per_rank(features(m), mimo_o):
            raise InputError("mimo_o=None is not supported by the CuTe step; use the Triton step (backend='triton') "
                             "or pass mimo_o")
        if state is None:
            raise InputError(f"state is required; start from step.zero_state({B}, {H}, device) or the forward's "
                             "final states")
        st_in = check_state(m, "state", state, B, H, dev, exact_dtype=inplace)
        if inplace:
            st_out = st_in
        else:
            layout = state_layout(m, B, H)
            st_in = Mamba3State(*[t.to(layout[f][1]) if t is not None else None
                                  for f, t in zip(Mamba3State._fields, st_in)])
            st_out = Mamba3State(*[torch.empty_like(t) if t is not None else None for t in st_in])
        out = torch.empty(out_shape(features(m), (B,), H, P, mimo_o), device=dev, dtype=v.dtype)
        if backend == "cute":
            self.cute()(dict(x, out=out, **_prefixed(st_in, "_in"), **_prefixed(st_out, "_out")), H, G,
                        _angle_strides(x["angles"]))
        else:
            self.launch(x, out, st_in, st_out, inplace)
        return out, (state if inplace and isinstance(state, Mamba3State) else st_out)

    def launch(self, x: dict, out, st_in: Mamba3State, st_out: Mamba3State, inplace: bool):
        """The bare Triton launch on checked tensors (what a CUDA graph of the step captures): the layer inputs in
        the signature table's order (mamba3_gen/signature.py), out, the state in and out, then the scalars."""
        B, H, _ = x["v"].shape
        dev = x["v"].device
        counters = self._counters.get((B * H, dev))
        if counters is None:  # zeros once; every launch leaves them zero again
            counters = self._counters[(B * H, dev)] = torch.zeros(B * H, dtype=torch.int32, device=dev)
        blocks = triton.cdiv(self.meta["P"], self.block_p)
        grid = (H, B, blocks) if self.head_major else (B, H, blocks)
        self.kernel[grid](
            *(x[n] for n in LAYER_INPUTS), out, *st_in, *st_out, H, self.meta["G"],
            *_angle_strides(x["angles"]), counters, IN_PLACE=inplace, BLOCK_P=self.block_p,
            PER_RANK=per_rank(features(self.meta), x["mimo_o"]),
            HEAD_MAJOR=self.head_major, STREAM=self.stream,
            num_warps=self.num_warps, **({"maxnreg": self.maxnreg} if self.maxnreg else {}),
        )

    def cute(self):
        """The CuTe DSL twin of this step (generated step_cute.py), loaded on first use."""
        if self._cute is None:
            if self.package is None:
                raise InputError("this step was not loaded from a generated package; no CuTe DSL kernel to use")
            try:
                module = importlib.import_module(f"{self.package}.step_cute")
            except ImportError as e:
                raise InputError(f"the CuTe DSL step needs nvidia-cutlass-dsl ({e}); install it or use "
                                 "backend='triton'") from e
            from mamba3_gen.runtime.cute_step import CuteStep

            self._cute = CuteStep(module)
        return self._cute


def _prefixed(st: Mamba3State, suffix: str) -> dict:
    return {f"{f}{suffix}": t for f, t in zip(Mamba3State._fields, st)}


def _angle_strides(angles) -> tuple:
    # (batch, head) strides of a (B, H, S) angles tensor; the head stride is 0 when one set serves all heads
    return (angles.stride(0), angles.stride(1)) if angles is not None else (0, 0)
