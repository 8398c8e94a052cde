"""Ahead-of-time compile of a spec's generated forward kernel for a GPU target, without a GPU.

``compile_report(spec_path, arch="sm_90a")`` renders the spec into a temporary directory, then, in a fresh Python
subprocess (``python -m mamba3_gen.backends.triton.aot SPEC ARCH``, TRITON_INTERPRET unset, a private Triton cache so
that every compile is real), lowers the kernel through Triton's whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin)
for each autotune config, and reports per config:

    block_p, num_warps, num_stages, maxnreg
                                        the autotune config (maxnreg: register cap, None when uncapped)
    shared                              bytes of shared memory (Triton's compiled metadata)
    registers, spill_stores, spill_loads, stack_frame
                                        from the bundled ptxas -v on the kernel's PTX
    compile_s                           seconds of triton.compile for that config

The subprocess keeps the compiler out of the caller's process: an interpreter-mode Triton (TRITON_INTERPRET=1, read
by ``triton.jit`` when a kernel is decorated) must never share a process with ``triton.compile`` for a GPU target.

The signature is a representative launch of the op (runtime/forward.py): Q, K, V, Z and the output in the spec's
input dtype; A·Δ, Δ, trap, angles, biases, D, MIMO projections and all states in fp32; cu_seqlens an int32 pointer;
L, H (and G unless the spec has one group, which the JIT would specialise to the constant 1) 32-bit ints.
HAS_INIT / STORE_FINAL / IS_VARLEN are the spec's options; pointers the spec does not use are ``None`` constants,
exactly as the op passes them. Every pointer carries the 16-byte alignment hint that torch allocations get.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mamba3_gen.signature import features, pointer_types

__all__ = ["AOTCompileError", "compile_report", "kernel_signature", "ptxas_stats", "main"]

_ERROR_LINES = 20  # lines of a compiler error kept in the raised message


class AOTCompileError(RuntimeError):
    """The spec's kernel does not compile for the target (the message starts with the compiler's own words)."""


# ----------------------------------------------------------------------------------------------------------------
# signature
# ----------------------------------------------------------------------------------------------------------------
def kernel_signature(spec, arg_names: list[str], block_p: int, prepped: bool = False,
                     store_chunks: bool = False) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``triton.compiler.ASTSource`` in Triton 3.6 conventions:

    - signature: {argument name: type string} for *every* parameter: "*bf16" / "*fp32" / "*i32" pointers,
      "i32" scalars, and "constexpr" for compile-time constants (including pointers passed as None);
    - constexprs: {argument name: value} (ASTSource turns names into (index,) paths itself);
    - attrs: {(index,): [["tt.divisibility", 16]]} alignment hints, as the JIT derives them for 16-byte aligned
      tensors.

    ``prepped``: compile the kernel as it runs after the rotation pre-pass (constexpr PREPPED).
    ``store_chunks``: the fused kernel as it runs when the backward keeps its per-chunk states (STORE_CHUNKS, fp32).
    """
    io = "*bf16" if spec.dtypes.input == "bf16" else "*fp32"
    opt = spec.options
    # the op's pointers, from the signature table (mamba3_gen/signature.py): None for one the spec passes as None;
    # the state fields are compiled as fp32 pointers
    ptr_types = pointer_types(features(spec), io, state="*fp32")
    consts = {
        "HAS_INIT": bool(opt.initial_states), "STORE_FINAL": bool(opt.final_states),
        "IS_VARLEN": bool(opt.varlen), "PER_RANK": False, "BLOCK_P": int(block_p),  # the reduced output (mimo_o)
        "PREPPED": bool(prepped),  # q, k are the rotation pre-pass's Q̂, K̂ (complex states)
        # the per-chunk tensors a differentiated forward keeps (runtime/forward.py keeps_chunk_states), or none
        "STORE_CHUNKS": bool(store_chunks),
    }
    kept = {"chunk_ssm_ptr": True, "chunk_angle_ptr": spec.is_complex, "chunk_k_ptr": spec.lags > 1,
            "chunk_v_ptr": spec.lags > 1}
    ptr_types = {**ptr_types, **{n: "*fp32" if store_chunks and used else None for n, used in kept.items()}}
    if spec.dims.ngroups == 1:
        consts["G"] = 1  # the JIT specialises an int argument equal to 1 into a constant
    signature: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    attrs: dict[tuple, list] = {}
    for i, name in enumerate(arg_names):
        if name in consts:
            signature[name] = "constexpr"
            constexprs[name] = consts[name]
        elif name in ptr_types:
            ty = ptr_types[name]
            if ty is None:
                signature[name] = "constexpr"
                constexprs[name] = None
            else:
                signature[name] = ty
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("L", "H", "G", "NC", "SIZE_CLASS", "angles_sb", "angles_st", "angles_sh"):
            signature[name] = "i32"
        else:
            raise AOTCompileError(f"kernel argument {name!r} is unknown to the AOT signature; "
                                  "update mamba3_gen/backends/triton/aot.py with the template")
    return signature, constexprs, attrs


# ----------------------------------------------------------------------------------------------------------------
# ptxas
# ----------------------------------------------------------------------------------------------------------------
_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_STACK = re.compile(r"(\d+) bytes stack frame")
_RE_TARGET = re.compile(r"^\s*\.target\s+(\S+)", re.MULTILINE)


def ptxas_stats(ptx: str, capability: int) -> dict:
    """Registers, spills and stack frame of the (single) kernel in `ptx`, from Triton's bundled ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas

    m = _RE_TARGET.search(ptx)
    gpu_name = m.group(1) if m else f"sm_{capability}"
    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory(prefix="mamba3_ptxas_") as d:
        src = Path(d) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu_name}", str(src), "-o", str(Path(d) / "kernel.cubin")],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AOTCompileError(f"ptxas failed ({proc.returncode}) on the generated PTX:\n" + _first_lines(log))
    regs = _RE_REGS.search(log)
    spill = _RE_SPILL.search(log)
    stack = _RE_STACK.search(log)
    if regs is None:
        raise AOTCompileError("could not find 'Used N registers' in the ptxas -v output:\n" + _first_lines(log))
    return {
        "registers": int(regs.group(1)),
        "spill_stores": int(spill.group(1)) if spill else 0,
        "spill_loads": int(spill.group(2)) if spill else 0,
        "stack_frame": int(stack.group(1)) if stack else 0,
        "gpu_name": gpu_name,
    }


def _first_lines(text: str, n: int = _ERROR_LINES) -> str:
    lines = [ln for ln in str(text).strip().splitlines()]
    more = len(lines) - n
    return "\n".join(lines[:n]) + (f"\n... ({more} more lines)" if more > 0 else "")


# ----------------------------------------------------------------------------------------------------------------
# in-process compile (run by the subprocess)
# ----------------------------------------------------------------------------------------------------------------
def _report_in_process(spec_path: str, arch: str, max_configs: int | None = None,
                       store_chunks: bool = False) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise AOTCompileError("TRITON_INTERPRET=1 is set: the AOT compile must run without the interpreter "
                              "(use compile_report, which starts a clean subprocess)")
    from mamba3_gen.backends.device import get_target
    from mamba3_gen.backends.triton.build import KERNEL_NAME, load_module

    target = get_target(arch)
    if not target.is_gpu:
        raise AOTCompileError(f"arch {arch!r} is not a GPU target; AOT compile needs one, e.g. sm_90a")

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    with tempfile.TemporaryDirectory(prefix="mamba3_aot_") as out_dir:
        module = load_module(spec_path, out_dir, arch=arch)
        autotuner = getattr(module, KERNEL_NAME)
        fn = autotuner.fn  # the JITFunction under @triton.autotune
        spec = _load(spec_path)
        gpu = GPUTarget("cuda", target.capability, 32)
        configs = list(autotuner.configs)
        if max_configs is not None:
            configs = configs[:max_configs]
        rows = []
        for cfg in configs:
            block_p = int(cfg.kwargs["BLOCK_P"])
            signature, constexprs, attrs = kernel_signature(spec, list(fn.arg_names), block_p,
                                                            store_chunks=store_chunks)
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            maxnreg = getattr(cfg, "maxnreg", None)
            options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            if maxnreg:
                options["maxnreg"] = int(maxnreg)  # a register cap, as the autotuner passes it to the JIT
            t0 = time.perf_counter()
            try:
                compiled = triton.compile(src, target=gpu, options=options)
            except Exception as e:  # the compiler's message is the useful part
                raise AOTCompileError(
                    f"spec {spec.name!r} does not compile for {arch} (BLOCK_P={block_p}, num_warps={cfg.num_warps}, "
                    f"num_stages={cfg.num_stages}, maxnreg={maxnreg}): {type(e).__name__}:\n{_first_lines(e)}"
                ) from None
            seconds = time.perf_counter() - t0
            stats = ptxas_stats(compiled.asm["ptx"], target.capability)
            rows.append({
                "spec": spec.name, "arch": arch, "block_p": block_p, "num_warps": cfg.num_warps,
                "num_stages": cfg.num_stages, "maxnreg": maxnreg, "shared": int(compiled.metadata.shared),
                "registers": stats["registers"], "spill_stores": stats["spill_stores"],
                "spill_loads": stats["spill_loads"], "stack_frame": stats["stack_frame"],
                "compile_s": round(seconds, 3), "store_chunks": bool(store_chunks),
            })
        return rows


def _load(spec_path):
    from mamba3_gen.spec.loader import load_spec

    return load_spec(str(spec_path))


# ----------------------------------------------------------------------------------------------------------------
# public entry: subprocess
# ----------------------------------------------------------------------------------------------------------------
def compile_report(spec_path: str | os.PathLike, arch: str = "sm_90a", max_configs: int | None = None,
                   timeout: float | None = 1800, store_chunks: bool = False) -> list[dict]:
    """Compile the spec's kernel for `arch` for each autotune config (the first `max_configs` only, if given) in a
    fresh subprocess and return one dict per config (see the module docstring); `store_chunks`: as it runs when
    the backward keeps its per-chunk states. Raises AOTCompileError with the compiler's message when the spec does
    not build or compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo_root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = repo_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "mamba3_gen.backends.triton.aot", os.fspath(spec_path), arch]
    if max_configs is not None:
        cmd += ["--max-configs", str(int(max_configs))]
    if store_chunks:
        cmd.append("--store-chunks")
    with tempfile.TemporaryDirectory(prefix="mamba3_aot_cache_") as cache:
        env["TRITON_CACHE_DIR"] = cache  # a private cache: every compile is timed for real, nothing is left behind
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AOTCompileError(f"AOT compile of {spec_path} for {arch} took over {timeout} s") from None
    payload = _last_json(proc.stdout)
    if proc.returncode != 0 or payload is None or "error" in payload:
        msg = payload.get("error") if payload else None
        if not msg:
            msg = _first_lines(proc.stderr or proc.stdout or f"exit code {proc.returncode}")
        raise AOTCompileError(msg)
    return payload["configs"]


def _last_json(stdout: str):
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m mamba3_gen.backends.triton.aot",
        description="AOT-compile a spec's forward kernel for a GPU target (no GPU needed); prints JSON.",
    )
    parser.add_argument("spec", help="path of a spec YAML file")
    parser.add_argument("arch", nargs="?", default="sm_90a", help="target arch (default sm_90a)")
    parser.add_argument("--max-configs", type=int, default=None, help="compile only the first N autotune configs")
    parser.add_argument("--store-chunks", action="store_true",
                        help="compile the kernel as it runs when the backward keeps its per-chunk states")
    args = parser.parse_args(argv)
    try:
        rows = _report_in_process(args.spec, args.arch, args.max_configs, args.store_chunks)
    except Exception as e:  # report, as JSON, why the spec does not compile
        msg = str(e) if isinstance(e, AOTCompileError) else f"{type(e).__name__}: {_first_lines(e)}"
        print(json.dumps({"error": msg}))
        return 1
    print(json.dumps({"spec": args.spec, "arch": args.arch, "configs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
