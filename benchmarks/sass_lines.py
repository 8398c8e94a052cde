"""Where a generated kernel's instructions are, without a GPU: compile one kernel for sm_90a (Triton + ptxas),
disassemble it (nvdisasm -g) and count SASS instructions per source line, inside the kernel's main loop (the
backward branch spanning most instructions: the chunk loop, whose static count is its per-chunk count) or in the
whole kernel.

    python benchmarks/sass_lines.py SPEC [--kernel NAME] [--source FWD.py] [--prepped] [--config I] [--top N] [--all]

SPEC: a spec name under specs/ or a YAML path (its dims and dtypes give the signature); --source: a fwd.py to take
the kernel from (default generated/<spec>/fwd.py; e.g. a variant written by benchmarks/ablate.py --write-only);
--kernel: mamba3_fwd_kernel (default), mamba3_chunk_states_kernel, mamba3_chunk_out_kernel,
mamba3_rotate_prep_kernel, or a backward kernel (mamba3_bwd_chunk_qk_kernel, ..._chunk_v_,
..._chunk_coef_, ..._dstate_, ..._steps_: taken from the spec's built package); --prepped: as after the rotation
pre-pass. Prints registers,
spills, shared memory, the instruction counts by opcode and the --top source lines with their leading opcodes.
Needs nvdisasm (Triton bundles it under triton/backends/nvidia/bin). Never with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

_INSTR = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRA = re.compile(r"\bBRA\s+`?\(?(\.L_x_\d+)")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')


def per_line(disasm: str, loop_only: bool = True) -> tuple[Counter, dict, int, bool]:
    """(instructions per (file, line), opcodes per (file, line), instructions counted, whether that is the whole
    kernel) of an `nvdisasm -g` listing,
    in the longest loop (a backward branch to an earlier label) or, without `loop_only`, without a loop or when the
    longest loop holds under a quarter of the kernel (no chunk loop), everywhere."""
    lines = disasm.splitlines()
    labels, bras, idx = {}, [], 0
    for line in lines:
        if m := _LABEL.match(line):
            labels[m.group(1)] = idx
        if _INSTR.match(line):
            if m := _BRA.search(line):
                bras.append((idx, m.group(1)))
            idx += 1
    loops = [(labels[t], i) for i, t in bras if t in labels and labels[t] <= i]
    lo, hi = max(loops, key=lambda x: x[1] - x[0]) if (loops and loop_only) else (0, idx - 1)
    if hi - lo + 1 < idx // 4:  # no chunk loop (e.g. only the varlen binary search): the whole kernel
        lo, hi = 0, idx - 1
    count, ops, where, idx = Counter(), {}, None, 0
    for line in lines:
        if m := _LINE.search(line):
            where = (Path(m.group(1)).name, int(m.group(2)))
            continue
        if m := _INSTR.match(line):
            if lo <= idx <= hi and where is not None:
                count[where] += 1
                ops.setdefault(where, Counter())[m.group(1)] += 1
            idx += 1
    return count, ops, hi - lo + 1, (lo, hi) == (0, idx - 1)


def _nvdisasm() -> str:
    found = shutil.which("nvdisasm")
    if found:
        return found
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    if bundled.exists():
        return str(bundled)
    raise SystemExit("nvdisasm not found: put CUDA's or Triton's (triton/backends/nvidia/bin) on PATH")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--kernel", default="mamba3_fwd_kernel")
    ap.add_argument("--source", type=Path, help="fwd.py to take the kernel from (default: generated/<spec>/fwd.py)")
    ap.add_argument("--prepped", action="store_true", help="compile as after the rotation pre-pass (PREPPED)")
    ap.add_argument("--dump", type=Path, default=None, help="also write the nvdisasm -g listing to this file")
    ap.add_argument("--store-chunks", action="store_true",
                    help="the fused kernel as it runs for a backward (STORE_CHUNKS: it keeps the per-chunk states)")
    ap.add_argument("--config", type=int, default=0, help="index of the autotune config (default: the first)")
    ap.add_argument("--top", type=int, default=30, help="source lines to print")
    ap.add_argument("--all", action="store_true", help="count the whole kernel, not only its main loop")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 is set: run the AOT compile in a clean process")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from aot_chunked import _signature
    from mamba3_gen.backends.triton.aot import ptxas_stats
    from mamba3_gen.spec.loader import load_spec

    from ablate import _spec_path

    spec_path = _spec_path(args.spec)
    spec = load_spec(str(spec_path))
    if args.kernel.startswith("mamba3_bwd_"):  # the backward's kernels: from the built package (bwd.py imports fwd.py)
        import mamba3_gen
        from mamba3_gen.backends.triton.aot_backward import backward_signature

        package = mamba3_gen.load(spec_path, arch="sm_90a")
        source = Path(package.__file__).parent / "bwd.py"
        tuner = getattr(package.bwd, args.kernel)
        cfg = tuner.configs[args.config]
        sig, const, attrs = backward_signature(spec, package.META["J"], tuner.fn, cfg)
    else:
        source = args.source or ROOT / "generated" / spec_path.stem / "fwd.py"
        sp = importlib.util.spec_from_file_location("sass_lines_module", source)
        mod = importlib.util.module_from_spec(sp)
        sys.modules[sp.name] = mod
        sp.loader.exec_module(mod)
        tuner = getattr(mod, args.kernel)
        cfg = tuner.configs[args.config]
        sig, const, attrs = _signature(spec, tuner.fn, cfg, args.prepped and spec.is_complex, args.store_chunks)
    compiled = triton.compile(ASTSource(fn=tuner.fn, signature=sig, constexprs=const, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                       **({"maxnreg": cfg.maxnreg} if getattr(cfg, "maxnreg", None) else {})})
    st = ptxas_stats(compiled.asm["ptx"], 90)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        listing = subprocess.run([_nvdisasm(), "-g", str(cubin)], capture_output=True, text=True, check=True).stdout
    if args.dump:
        args.dump.write_text(listing, encoding="utf-8")
    count, ops, n, whole = per_line(listing, loop_only=not args.all)
    total = Counter()
    for c in ops.values():
        total.update(c)
    print(f"{args.kernel} {cfg.kwargs} warps={cfg.num_warps}: {st['registers']} registers, spills "
          f"{st['spill_stores']}/{st['spill_loads']} B, shared {compiled.metadata.shared} B; "
          f"{n} instructions in the {'kernel' if whole else 'main loop'}")
    print("  " + " ".join(f"{k}:{v}" for k, v in total.most_common(16)))
    text = {}
    for (name, line), c in count.most_common(args.top):
        if name not in text:
            places = (Path(source), *(ROOT / "mamba3_gen").rglob(name), *Path(triton.__file__).parent.rglob(name))
            hit = next((p for p in places if p.name == name), None)
            text[name] = hit.read_text(encoding="utf-8").splitlines() if hit else []
        src = text[name][line - 1].strip()[:90] if line <= len(text[name]) else ""
        lead = " ".join(f"{k}:{v}" for k, v in ops[(name, line)].most_common(3))
        print(f"{c:6d}  {name}:{line}  {src}   [{lead}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
