"""Launch adapter of a generated CuTe DSL decode step (``generated/<name>/step_cute.py``).

``CuteStep(module)(tensors, H, G, angles_strides)`` compiles ``module.mamba3_step_cute`` once per key
(input dtype, state dtype, which tensors are present, device) and launches it on the current torch CUDA stream,
so a CUDA graph captures it. Every tensor is passed as a raw gmem pointer (``cute.runtime.make_ptr``) rather than
through DLPack: the kernel builds its own layouts from B and H (runtime Int32s), so one compile serves any batch
size and head count, and a call costs one pointer object per tensor plus the compiled function's launch.
"""
from __future__ import annotations

from typing import Optional

import torch

from mamba3_gen.errors import InputError


class CuteStep:
    """Compiled-once launcher of one spec's CuTe step. ``tensors``: {name: tensor or None} with the names of
    ``module.CUTE_ARGS`` (q k v adt dt trap q_bias k_bias angles D z mimo_v mimo_z mimo_o out angle_in ssm_in k_in
    v_in angle_out ssm_out k_out v_out); extra names are ignored, a None for a tensor the spec needs is an error.
    All tensors must be contiguous except angles, which is read through ``angles_strides`` = (batch stride, head
    stride) in elements (the head stride may be 0). Out/state-out tensors may alias the state-in ones."""

    def __init__(self, module):
        import cutlass
        from cutlass.cute.typing import AddressSpace

        self.module = module
        self.meta = module.META
        self.roles = dict(module.CUTE_ARG_ROLES)
        self.ptr_names = [a for a in module.CUTE_ARGS if a in self.roles]
        self._compiled: dict = {}
        self._gmem = AddressSpace.gmem
        self._dtypes = {torch.float32: cutlass.Float32, torch.bfloat16: cutlass.BFloat16,
                        torch.float16: cutlass.Float16}

    def __repr__(self):
        return f"<CuteStep {self.meta['name']} ({len(self._compiled)} compiled)>"

    # -------------------------------------------------------------------------------------------------------
    def _pointers(self, tensors: dict, for_compile: bool):
        from cutlass.cute.runtime import make_ptr

        ptrs = []
        for name in self.ptr_names:
            t = tensors.get(name)
            if t is None:
                raise InputError(f"CuTe step of spec {self.meta['name']!r}: tensor {name!r} is required")
            role, align = self.roles[name]
            addr = t.data_ptr()
            if align and addr % align:
                if name == "out" or name.endswith(("_in", "_out")):  # written (or maybe aliased): no copy
                    raise InputError(f"CuTe step: {name} must be {align}-byte aligned (got address {addr:#x}); "
                                     "pass a fresh contiguous tensor (e.g. .clone())")
                t = t.clone()  # an input view off the 16-byte grid: a fresh allocation is aligned
                tensors[name] = t  # keep it alive until the launch is queued
                addr = t.data_ptr()
            if name != "angles" and not t.is_contiguous():
                raise InputError(f"CuTe step: {name} must be contiguous")
            ptrs.append(make_ptr(self._dtypes[t.dtype], 0 if for_compile else addr, self._gmem,
                                 assumed_align=align))
        return ptrs

    def _key(self, tensors: dict):
        v = tensors["v"]
        st = tensors["ssm_in"]
        present = tuple(tensors.get(n) is not None for n in self.ptr_names)
        return (v.dtype, st.dtype, tensors["out"].dtype, present, v.device)

    def compile(self, tensors: dict):
        """The compiled function for these tensors' dtypes and device (compiled on first use)."""
        key = self._key(tensors)
        fn = self._compiled.get(key)
        if fn is None:
            import cutlass
            import cutlass.cute as cute
            from cutlass.cute.runtime import make_fake_stream

            for name in self.ptr_names:  # element types must match the roles' dtypes
                t = tensors.get(name)
                if t is not None and self.roles[name][0] == "fp32" and t.dtype != torch.float32:
                    raise InputError(f"CuTe step: {name} must be float32, got {t.dtype}")
            args = self._pointers(tensors, for_compile=True)
            args += [cutlass.Int32(1)] * 4 + [make_fake_stream()]
            dev = tensors["v"].device
            if dev.type == "cuda":
                with torch.cuda.device(dev):
                    fn = cute.compile(self.module.mamba3_step_cute, *args)
            else:  # compile-only use (tests on a machine without a GPU): target sm_90a
                fn = cute.compile(self.module.mamba3_step_cute, *args, options="--gpu-arch sm_90a")
            self._compiled[key] = fn
        return fn

    def __call__(self, tensors: dict, H: int, G: int, angles_strides: tuple = (0, 0),
                 stream: Optional[torch.cuda.Stream] = None):
        from cuda.bindings.driver import CUstream

        if G != self.meta["G"]:
            raise InputError(f"CuTe step of spec {self.meta['name']!r} is compiled for G={self.meta['G']} groups, "
                             f"got G={G}")
        v = tensors["v"]
        B = v.shape[0]
        if B == 0 or H == 0:
            return
        tensors = dict(tensors)  # _pointers may swap in aligned copies of inputs
        fn = self.compile(tensors)
        s = stream if stream is not None else torch.cuda.current_stream(v.device)
        sb, sh = (int(angles_strides[0]), int(angles_strides[1])) if angles_strides else (0, 0)
        fn(*self._pointers(tensors, for_compile=False), B, H, sb, sh, CUstream(s.cuda_stream))
