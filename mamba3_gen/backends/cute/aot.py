"""Ahead-of-time compile of a spec's CuTe DSL decode step for a GPU target, without a GPU.

``compile_report(spec_path_or_spec, arch="sm_90a")`` renders the spec's ``step_cute.py`` into a temporary directory
and, in a fresh Python subprocess (``python -m mamba3_gen.backends.cute.aot SPEC ARCH``), imports it and runs
``cute.compile(mamba3_step_cute, *fake arguments, options="--gpu-arch <arch> --keep-ptx")``. The fake arguments are
gmem pointers at address 0 with the alignment the kernel assumes (CUTE_ARG_ROLES), Int32 scalars and a fake
stream, in the spec's input and state dtypes. It reports:

    spec, arch, input_dtype, state_dtype   what was compiled
    compile_s                              seconds of cute.compile (MLIR -> PTX -> cubin)
    threads, tiling                        CTA size and the state tiling (VEC, TC, NCH, RPP, NPASS)
    ptx_bytes                              size of the PTX
    vector_loads, vector_stores            16-byte global loads/stores in the PTX (ld/st.global.v4 / .v8.b16...)
    registers, frame_bytes                 from the cubin's .nv.info (frame_bytes > 0 means local memory:
                                           spills or a stack array)

The subprocess keeps the MLIR context, the DSL's caches and any Triton interpreter state of the caller apart.
"""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["CuteAOTError", "compile_report", "main"]

_ERROR_LINES = 30
REPO_ROOT = Path(__file__).resolve().parents[3]


class CuteAOTError(RuntimeError):
    """The spec's CuTe step does not render or compile (the message carries the reason)."""


def _first_lines(text, n: int = _ERROR_LINES) -> str:
    lines = str(text).strip().splitlines()
    more = len(lines) - n
    return "\n".join(lines[:n]) + (f"\n... ({more} more lines)" if more > 0 else "")


def render_for(spec, arch: str = "sm_90a", spec_path: str = "<spec>") -> str:
    """The step_cute.py source of a spec object (header as the build writes it)."""
    from mamba3_gen.backends.cute.build import render_step
    from mamba3_gen.backends.triton.build import file_header, lower

    return render_step(lower(spec, arch), file_header(spec, spec_path))


def fake_args(module, input_dtype: str | None = None, state_dtype: str | None = None) -> list:
    """Compile-time arguments of ``module.mamba3_step_cute``: null gmem pointers (dtype and alignment from
    CUTE_ARG_ROLES), Int32 scalars and a fake stream."""
    import cutlass
    from cutlass.cute.runtime import make_fake_stream, make_ptr
    from cutlass.cute.typing import AddressSpace

    dtypes = {"fp32": cutlass.Float32, "bf16": cutlass.BFloat16, "fp16": cutlass.Float16}
    meta = module.META
    role_dtype = {"input": dtypes[input_dtype or meta["input_dtype"]],
                  "state": dtypes[state_dtype or meta["state_dtype"]], "fp32": cutlass.Float32}
    args = []
    for name in module.CUTE_ARGS:
        if name in module.CUTE_ARG_ROLES:
            role, align = module.CUTE_ARG_ROLES[name]
            args.append(make_ptr(role_dtype[role], 0, AddressSpace.gmem, assumed_align=align))
        else:
            args.append(cutlass.Int32(1))
    args.append(make_fake_stream())
    return args


def cubin_stats(cubin: bytes) -> dict:
    """Registers and frame (stack) bytes of the kernel in a cubin, read from its ELF ``.nv.info`` section
    (EIATTR_REGCOUNT 0x2f, EIATTR_FRAME_SIZE 0x11; entries: format 0x04, attribute, u16 size, payload of
    (u32 symbol index, u32 value)). The DSL's PTX is newer than Triton's bundled ptxas, so this reads what the
    DSL's own ptxas produced. The kernel is the only function of the cubin; values of other symbols are ignored."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    stroff = secs[shstrndx][4]

    def name(off):
        return cubin[stroff + off:cubin.index(b"\0", stroff + off)].decode()

    regs, frame = {}, {}
    for sec in secs:
        if name(sec[0]) != ".nv.info":
            continue
        o, end = sec[4], sec[4] + sec[5]
        while o + 4 <= end:
            fmt, attr = cubin[o], cubin[o + 1]
            if fmt == 0x04:  # EIFMT_SVAL: u16 size + payload
                size, = struct.unpack_from("<H", cubin, o + 2)
                if attr in (0x2F, 0x11) and size == 8:
                    sym, val = struct.unpack_from("<II", cubin, o + 4)
                    (regs if attr == 0x2F else frame)[sym] = val
                o += 4 + size
            else:  # EIFMT_HVAL / EIFMT_NVAL: 4 bytes
                o += 4
    if not regs:
        return {"registers": None, "frame_bytes": None}
    sym = max(regs, key=regs.get)
    return {"registers": regs[sym], "frame_bytes": frame.get(sym, 0)}


def _report_in_process(spec_path: str, arch: str) -> dict:
    import importlib.util

    from mamba3_gen.spec.loader import load_spec

    spec = load_spec(str(spec_path))
    src = render_for(spec, arch, os.fspath(spec_path))
    with tempfile.TemporaryDirectory(prefix="mamba3_cute_aot_") as d:
        path = Path(d) / f"step_cute_{spec.name}.py"
        path.write_text(src)
        mspec = importlib.util.spec_from_file_location(f"mamba3_cute_aot_{spec.name}", path)
        module = importlib.util.module_from_spec(mspec)
        sys.modules[mspec.name] = module  # the DSL reads the function's source through its module
        mspec.loader.exec_module(module)
        import cutlass.cute as cute

        args = fake_args(module)
        dump = Path(d) / "dump"  # --keep-ptx/--keep-cubin also write files: keep them out of the caller's cwd
        dump.mkdir()
        t0 = time.perf_counter()
        try:
            compiled = cute.compile(module.mamba3_step_cute, *args,
                                    options=f"--gpu-arch {arch} --keep-ptx --keep-cubin --dump-dir {dump}")
        except Exception as e:
            raise CuteAOTError(f"spec {spec.name!r}: the CuTe step does not compile for {arch}: "
                               f"{type(e).__name__}: {_first_lines(e)}") from None
        seconds = time.perf_counter() - t0
    ptx = compiled.__ptx__ or ""
    if isinstance(ptx, bytes):
        ptx = ptx.decode(errors="replace")
    report = {
        "spec": spec.name, "arch": arch, "input_dtype": module.META["input_dtype"],
        "state_dtype": module.META["state_dtype"], "compile_s": round(seconds, 3),
        "threads": module.NUM_THREADS,
        "tiling": {k: getattr(module, k) for k in ("VEC", "TC", "NCH", "RPP", "NPASS")},
        "ptx_bytes": len(ptx),
        "vector_loads": len(re.findall(r"ld\.global(?:\.nc)?\.v[248]\.", ptx)),
        "vector_stores": len(re.findall(r"st\.global\.v[248]\.", ptx)),
    }
    cubin = compiled.__cubin__
    report.update(cubin_stats(cubin) if cubin else {"registers": None, "frame_bytes": None})
    if ptx:
        if os.environ.get("MAMBA3_CUTE_KEEP_PTX"):  # debugging: where to write the PTX
            Path(os.environ["MAMBA3_CUTE_KEEP_PTX"]).write_text(ptx)
    return report


def compile_report(spec_path_or_spec, arch: str = "sm_90a", timeout: float | None = 900) -> dict:
    """AOT-compile the spec's CuTe step for ``arch`` in a fresh subprocess; return the report (module docstring).
    ``spec_path_or_spec``: a YAML path or a Spec object. Raises CuteAOTError with the compiler's message."""
    tmp = None
    if isinstance(spec_path_or_spec, (str, os.PathLike)):
        spec_arg = os.path.abspath(os.fspath(spec_path_or_spec))  # the subprocess runs in a temporary cwd
    else:  # a Spec object: write it to a temporary YAML file for the subprocess
        from ruamel.yaml import YAML  # the project's YAML library (PyYAML is not a dependency)

        tmp = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="mamba3_cute_spec_", delete=False)
        YAML(typ="safe", pure=True).dump(spec_path_or_spec.model_dump(mode="json", by_alias=True), tmp)
        tmp.close()
        spec_arg = tmp.name
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "mamba3_gen.backends.cute.aot", spec_arg, arch]
    try:
        with tempfile.TemporaryDirectory(prefix="mamba3_cute_cwd_") as cwd:  # nothing lands in the caller's cwd
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise CuteAOTError(f"CuTe AOT compile of {spec_arg} for {arch} took over {timeout} s") from None
    finally:
        if tmp is not None:
            os.unlink(tmp.name)
    payload = None
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.strip().startswith("{"):
            try:
                payload = json.loads(line)
            except json.JSONDecodeError:
                pass
            break
    if proc.returncode != 0 or payload is None or "error" in payload:
        msg = payload.get("error") if payload else None
        raise CuteAOTError(msg or _first_lines(proc.stderr or proc.stdout or f"exit code {proc.returncode}"))
    payload["success"] = True
    return payload


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mamba3_gen.backends.cute.aot",
                                     description="AOT-compile a spec's CuTe DSL decode step (no GPU needed); "
                                                 "prints JSON.")
    parser.add_argument("spec", help="path of a spec YAML file")
    parser.add_argument("arch", nargs="?", default="sm_90a", help="target arch (default sm_90a)")
    args = parser.parse_args(argv)
    try:
        report = _report_in_process(args.spec, args.arch)
    except Exception as e:
        msg = str(e) if isinstance(e, CuteAOTError) else f"{type(e).__name__}: {_first_lines(e)}"
        print(json.dumps({"error": msg}))
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
