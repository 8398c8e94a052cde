"""Ahead-of-time compile of a spec's generated backward kernels (issue 12) for a GPU target, without a GPU.

``backward_compile_report(spec_path, arch="sm_90a")`` does for the backward kernels (dstate, chunk_v, chunk_coef,
chunk_qk, steps, qk_sums, chunk_vc of MAMBA3_GEN_BWD_CHUNKS=merged, fused of MAMBA3_GEN_BWD=fused, and for rules
with J ≤ 1 chunk_qk_per_head, the deterministic mode's chunk_qk; templates/triton/bwd.py.jinja) what
``aot.compile_report`` does for the forward: in a fresh subprocess without
TRITON_INTERPRET (an interpreter-mode Triton must never share a process with a GPU compile) and with a private Triton
cache, each kernel's default (first) config goes through Triton's whole pipeline and ptxas; one row per kernel:
kernel, block_p, block_k, num_warps, shared, registers, spill_stores, spill_loads, stack_frame, compile_s.

The signature is the launch of runtime/backward.py: Q, K, V, Z and dout in the spec's input dtype, everything else
fp32; pointers the spec does not use are None constants; the flags are the spec's options (gradients of the final
states present when it has them).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mamba3_gen.backends.triton.aot import AOTCompileError, _first_lines, _last_json, ptxas_stats

__all__ = ["backward_compile_report"]

KERNELS = {"dstate": "mamba3_bwd_dstate_kernel", "chunk_v": "mamba3_bwd_chunk_v_kernel",
           "chunk_coef": "mamba3_bwd_chunk_coef_kernel", "chunk_qk": "mamba3_bwd_chunk_qk_kernel",
           "chunk_vc": "mamba3_bwd_chunk_vc_kernel", "steps": "mamba3_bwd_steps_kernel",
           "qk_sums": "mamba3_bwd_qk_sums_kernel", "fused": "mamba3_bwd_fused_kernel"}


def _pointer_types(spec, J: int) -> dict:
    io = "*bf16" if spec.dtypes.input == "bf16" else "*fp32"
    f = "*fp32"
    opt, R, cplx = spec.options, spec.dims.mimo_rank, spec.is_complex
    init, final, lags = opt.initial_states, opt.final_states, J > 0

    def on(cond, ty=f):
        return ty if cond else None

    return {
        "q_ptr": io, "k_ptr": io, "v_ptr": io, "dout_ptr": io, "z_ptr": on(opt.z_gate, io),
        "adt_ptr": f, "dt_ptr": f, "trap_ptr": on(spec.has_trap_input), "q_bias_ptr": f, "k_bias_ptr": f,
        "angles_ptr": on(cplx), "d_ptr": on(opt.d_skip), "mimo_v_ptr": on(R > 1), "mimo_z_ptr": on(R > 1 and opt.z_gate),
        "mimo_o_ptr": on(R > 1), "init_ssm_ptr": on(init), "init_k_ptr": on(init and lags),
        "init_v_ptr": on(init and lags), "dfinal_angle_ptr": on(final and cplx), "dfinal_ssm_ptr": on(final),
        "dfinal_k_ptr": on(final and lags), "dfinal_v_ptr": on(final and lags),
        "chunk_ssm_ptr": f, "chunk_angle_ptr": on(cplx), "chunk_k_ptr": on(J > 1), "chunk_v_ptr": on(J > 1),
        "dchunk_ptr": f, "dx_ptr": f, "dinit_ssm_ptr": on(init), "de0_ptr": on(init), "dq_ptr": f, "dk_ptr": f,
        "dq_bias_ptr": on(J <= 1), "dk_bias_ptr": on(J <= 1),  # chunk_qk's token sums where HEAD_SUMS is on
        "dv_ptr": io if J <= 1 else f, "dz_ptr": on(opt.z_gate, io),  # the inputs' dtypes (runtime/backward.py)
        "dtheta_ptr": on(cplx), "da_ptr": f, "dc_ptr": f, "dD_ptr": on(opt.d_skip),
        "dmv_ptr": on(R > 1), "dmz_ptr": on(R > 1 and opt.z_gate), "dmo_ptr": on(R > 1), "dadt_ptr": f,
        "ddt_ptr": f, "dtrap_ptr": on(spec.has_trap_input), "dangles_ptr": on(cplx),
        "dinit_angle_ptr": on(init and cplx), "dinit_k_ptr": on(init and lags), "dinit_v_ptr": on(init and lags),
        "dinit_mv_ptr": on(init and lags and R > 1), "cu_seqlens_ptr": on(opt.varlen, "*i32"),
        "dchunk_k_ptr": on(J > 1), "dchunk_v_ptr": on(J > 1),  # J >= 2: the carried tokens' gradients
        "dh_ptr": f, "din_ptr": io, "dbias_ptr": f,  # qk_sums: chunk_qk's per-head output, its two reductions
    }


def backward_signature(spec, J: int, fn, cfg, head_sums: bool | None = None) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``triton.compiler.ASTSource`` of one backward kernel ``fn`` at autotune
    config ``cfg``, as the JIT sees it for ``spec`` (J: the rule's lags, ``META["J"]``): every option the spec has
    switched on, the reduced output (PER_RANK False), chunk_qk's GQA sum by atomics where the rule allows it
    (HEAD_SUMS, runtime/backward.py sums_heads_in_chunk_qk; ``head_sums=False``: the per-head variant of
    deterministic mode), G = 1 specialised.

    Raises:
        AOTCompileError: ``fn`` has an argument this table does not know (the template gained one)."""
    head_sums = J <= 1 if head_sums is None else head_sums
    ptrs = _pointer_types(spec, J)
    if not head_sums:
        ptrs["dq_bias_ptr"] = ptrs["dk_bias_ptr"] = None
    opt = spec.options
    consts = {"HAS_INIT": bool(opt.initial_states), "HAS_DFINAL": bool(opt.final_states),
              "IS_VARLEN": bool(opt.varlen), "PER_RANK": False, "HEAD_SUMS": head_sums,
              **{k: int(v) for k, v in cfg.kwargs.items()}}
    if spec.dims.ngroups == 1:
        consts["G"] = 1
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name], constexprs[name] = "constexpr", consts[name]
        elif name in ptrs:
            if ptrs[name] is None:
                signature[name], constexprs[name] = "constexpr", None
            else:
                signature[name] = ptrs[name]
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("L", "H", "G", "NC", "NS", "SEARCH_STEPS", "SIZE_CLASS", "angles_sb", "angles_st", "angles_sh",
                      "T"):
            signature[name] = "i32"
        else:
            raise AOTCompileError(f"backward kernel argument {name!r} is unknown to aot_backward.py")
    return signature, constexprs, attrs


def _report_in_process(spec_path: str, arch: str) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise AOTCompileError("TRITON_INTERPRET=1 is set: run backward_compile_report (a clean subprocess)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mamba3_gen.backends.device import get_target
    from mamba3_gen.backends.triton.build import load_module
    from mamba3_gen.runtime.backward import QK_SUMS_BLOCK_T
    from mamba3_gen.spec.loader import load_spec

    target = get_target(arch)
    spec = load_spec(str(spec_path))
    rows = []
    with tempfile.TemporaryDirectory(prefix="mamba3_aot_bwd_") as out_dir:
        module = load_module(spec_path, out_dir, arch=arch)
        meta = module.META
        # chunk_qk twice where the rule allows the atomics: as it runs by default and per head (deterministic mode)
        kinds = [*KERNELS.items()] + ([("chunk_qk_per_head", KERNELS["chunk_qk"])] if meta["J"] <= 1 else [])
        for kind, kname in kinds:
            autotuner = getattr(module.bwd, kname)
            if hasattr(autotuner, "configs"):
                fn, cfg = autotuner.fn, autotuner.configs[0]
            else:  # a plain jit kernel whose block the host picks (qk_sums)
                fn, cfg = autotuner, triton.Config({"BLOCK_T": QK_SUMS_BLOCK_T}, num_warps=4, num_stages=1)
            signature, constexprs, attrs = backward_signature(
                spec, meta["J"], fn, cfg, head_sums=False if kind == "chunk_qk_per_head" else None)
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            t0 = time.perf_counter()
            try:
                compiled = triton.compile(src, target=GPUTarget("cuda", target.capability, 32),
                                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            except Exception as e:
                raise AOTCompileError(f"{spec.name} backward {kind} kernel does not compile for {arch}: "
                                      f"{type(e).__name__}:\n{_first_lines(e)}") from None
            stats = ptxas_stats(compiled.asm["ptx"], target.capability)
            rows.append({"spec": spec.name, "kernel": kind, "block_p": constexprs.get("BLOCK_P"),
                         "block_k": constexprs.get("BLOCK_K"), "num_warps": cfg.num_warps,
                         "shared": int(compiled.metadata.shared), **{k: stats[k] for k in (
                             "registers", "spill_stores", "spill_loads", "stack_frame")},
                         "compile_s": round(time.perf_counter() - t0, 3)})
    return rows


def backward_compile_report(spec_path, arch: str = "sm_90a", timeout: float | None = 1800) -> list[dict]:
    """One row per backward kernel (module docstring), compiled in a clean subprocess. Raises AOTCompileError."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo_root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = repo_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "mamba3_gen.backends.triton.aot_backward", os.fspath(spec_path), arch]
    with tempfile.TemporaryDirectory(prefix="mamba3_aot_bwd_cache_") as cache:
        env["TRITON_CACHE_DIR"] = cache
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AOTCompileError(f"AOT compile of {spec_path}'s backward took over {timeout} s") from None
    payload = _last_json(proc.stdout)
    if proc.returncode != 0 or payload is None or "error" in payload:
        raise AOTCompileError((payload or {}).get("error") or _first_lines(proc.stderr or proc.stdout))
    return payload["kernels"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path, arch = argv[0], (argv[1] if len(argv) > 1 else "sm_90a")
    try:
        rows = _report_in_process(spec_path, arch)
    except Exception as e:
        print(json.dumps({"error": str(e) if isinstance(e, AOTCompileError) else f"{type(e).__name__}: {e}"}))
        return 1
    print(json.dumps({"spec": spec_path, "arch": arch, "kernels": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
