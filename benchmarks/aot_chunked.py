"""AOT compile report of the chunk-parallel forward's two kernels (issue 11), for a GPU target without a GPU.

    python benchmarks/aot_chunked.py specs/siso_trap_complex.yaml [more specs] [--arch sm_90a] [--max-configs N]
                                     [--prepped] [--kernels states,out,fused,prep] [--json]

Renders each spec into a temporary folder and compiles every autotune config of `mamba3_chunk_states_kernel` and
`mamba3_chunk_out_kernel` (and the fused kernel's first config, for comparison; `--kernels prep`: every config of
the rotation pre-pass, complex specs) through Triton and ptxas; prints one line per config: registers, spills,
shared memory. Runs each spec in this process: never with TRITON_INTERPRET=1
(refused). The signature is the one of `mamba3_gen.backends.triton.aot.kernel_signature` plus the chunk buffers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _signature(spec, fn, cfg, prepped: bool = False, store_chunks: bool = False):
    """The signature of a forward kernel (states, out, prep; the fused one too, compiled with STORE_CHUNKS =
    `store_chunks`: as it runs when the backward keeps its per-chunk states; the states kernel always stores)."""
    from mamba3_gen.backends.triton.aot import kernel_signature
    from mamba3_gen.backends.triton.resources import chunk_states_dtype

    extra_ptr = {
        # the fused kernel stores kept states in fp32 (runtime/forward.py _chunk_outputs)
        "chunk_ssm_ptr": "*bf16" if chunk_states_dtype(spec) == "bf16" and fn.__name__ != "mamba3_fwd_kernel"
        else "*fp32",
        "chunk_angle_ptr": "*fp32" if spec.is_complex else None,
        "chunk_k_ptr": "*fp32" if spec.lags > 1 else None,
        "chunk_v_ptr": "*fp32" if spec.lags > 1 else None,
        # the rotation pre-pass's outputs (prep kernel): Q̂, K̂ in the input dtype
        "q_hat_ptr": "*bf16" if spec.dtypes.input == "bf16" else "*fp32",
        "k_hat_ptr": "*bf16" if spec.dtypes.input == "bf16" else "*fp32",
    }
    names = list(fn.arg_names)
    known = [n for n in names if n not in extra_ptr
             and n not in ("NC", "NS", "SEARCH_STEPS", "SEGS", "BLOCK_K", "BLOCK_T", "LOOP_STAGES", "STORE_CHUNKS")]
    sig_k, const_k, _ = kernel_signature(spec, known, int(cfg.kwargs["BLOCK_P"]), prepped)
    signature, constexprs, attrs = {}, {}, {}
    for i, n in enumerate(names):
        if n in extra_ptr:
            ty = extra_ptr[n]
            signature[n] = ty if ty else "constexpr"
            if ty:
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                constexprs[n] = None
        elif n in ("NC", "NS", "SEARCH_STEPS", "SEGS"):
            signature[n] = "i32"
        elif n == "STORE_CHUNKS":
            signature[n] = "constexpr"
            constexprs[n] = store_chunks or fn.__name__ == "mamba3_chunk_states_kernel"
        elif n in ("BLOCK_K", "BLOCK_T", "LOOP_STAGES"):  # the pair block; the prep kernel's token block and stages
            signature[n] = "constexpr"
            constexprs[n] = int(cfg.kwargs[n])
        else:
            signature[n] = sig_k[n]
            if n in const_k:
                constexprs[n] = const_k[n]
            elif sig_k[n].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


KERNELS = ("states", "out", "fused", "prep")


def report(spec_path: str, arch: str = "sm_90a", max_configs: int | None = None, trial: dict | None = None,
           prepped: bool = False, kernels: tuple[str, ...] = ("states", "out", "fused")) -> list[dict]:
    """trial: {kernel name: [triton.Config]} to compile instead of the generated configs (exploring tile sizes).
    prepped: compile a complex spec's kernels as they run after the rotation pre-pass (constexpr PREPPED)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 is set: run the AOT compile in a clean process")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mamba3_gen.backends.device import get_target
    from mamba3_gen.backends.triton.aot import ptxas_stats
    from mamba3_gen.backends.triton.build import (KERNEL_NAME, OUT_KERNEL_NAME, PREP_KERNEL_NAME, STATES_KERNEL_NAME,
                                                  load_module)
    from mamba3_gen.spec.loader import load_spec

    spec = load_spec(spec_path)
    target = get_target(arch)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mamba3_aot_chunked_") as out_dir:
        module = load_module(spec_path, out_dir, arch=arch)
        names = {"states": STATES_KERNEL_NAME, "out": OUT_KERNEL_NAME, "fused": KERNEL_NAME,
                 "prep": PREP_KERNEL_NAME if spec.is_complex else None}
        for kname in filter(None, (names[k] for k in kernels)):
            autotuner = getattr(module, kname, None) or getattr(module.fwd, kname)
            configs = list(autotuner.configs)
            configs = configs[:1] if kname == KERNEL_NAME else configs[:max_configs]
            if trial is not None:
                configs = trial.get(kname, [])
            for cfg in configs:
                signature, constexprs, attrs = _signature(spec, autotuner.fn, cfg, prepped and spec.is_complex)
                src = ASTSource(fn=autotuner.fn, signature=signature, constexprs=constexprs, attrs=attrs)
                opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                if getattr(cfg, "maxnreg", None):
                    opts["maxnreg"] = int(cfg.maxnreg)
                compiled = triton.compile(src, target=GPUTarget("cuda", target.capability, 32), options=opts)
                st = ptxas_stats(compiled.asm["ptx"], target.capability)
                rows.append({"spec": spec.name, "kernel": kname, **{k: int(v) for k, v in cfg.kwargs.items()},
                             "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                             "shared": int(compiled.metadata.shared), "registers": st["registers"],
                             "spill_stores": st["spill_stores"], "spill_loads": st["spill_loads"]})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--max-configs", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--prepped", action="store_true", help="compile as after the rotation pre-pass (PREPPED)")
    ap.add_argument("--kernels", default="states,out,fused", type=lambda t: tuple(t.split(",")),
                    help=f"comma-separated, of {', '.join(KERNELS)}")
    ap.add_argument("--trial", default=None, help="compile these tiles instead: 'states:PxKxW,...;out:PxW,...'")
    args = ap.parse_args()
    trial = None
    if args.trial:
        import triton

        from mamba3_gen.backends.triton.build import OUT_KERNEL_NAME, STATES_KERNEL_NAME

        trial = {}
        for part in args.trial.split(";"):
            kind, cfgs = part.split(":")
            for c in cfgs.split(","):
                x = [int(v) for v in c.split("x")]
                if kind == "states":
                    cfg = triton.Config({"BLOCK_P": x[0], "BLOCK_K": x[1]}, num_warps=x[2], num_stages=1)
                else:
                    cfg = triton.Config({"BLOCK_P": x[0]}, num_warps=x[1], num_stages=1)
                trial.setdefault(STATES_KERNEL_NAME if kind == "states" else OUT_KERNEL_NAME, []).append(cfg)
    for p in args.specs:
        for r in report(p, args.arch, args.max_configs, trial, args.prepped, args.kernels):
            if args.json:
                print(json.dumps(r))
            else:
                tiles = " ".join(f"{k}={r[k]}" for k in ("BLOCK_P", "BLOCK_K", "BLOCK_T") if k in r)
                print(f"{r['spec']:<28} {r['kernel']:<28} {tiles:<22} warps={r['num_warps']} "
                      f"stages={r['num_stages']}  regs={r['registers']:<4} spills={r['spill_stores']}/"
                      f"{r['spill_loads']}  smem={r['shared']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
