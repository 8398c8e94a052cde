"""Time a spec's generated forward on a GPU (median of triton.testing.do_bench), with its hardware floor.

`mamba3-gen bench` (mamba3_gen/bench.py) is the full tool: providers side by side, output checks, table, JSON, plot.
This script is the single-spec timing that benchmarks/gpu_run.py calls (bench, bench_inputs, measure_ceilings).

    python -m benchmarks.bench_forward specs/mimo_r4.yaml --batch 8 --seqlen 4096 --heads 32

Prints ms, the bytes and FLOPs the forward must move/do at least, and the resulting floors from the measured copy
bandwidth and bf16 matmul rate of this GPU (both measured in the same run).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mamba3_gen  # noqa: E402
from mamba3_gen.bench import (LOW_PRECISION, build_inputs, measure_ceilings,  # noqa: E402,F401 - gpu_run imports
                              workload_bytes, workload_flops)
from mamba3_gen.spec.loader import load_spec  # noqa: E402


def work(spec, B, L, H, inputs: dict | None = None) -> dict:
    """Minimum bytes (each input read once, output written once) and tensor-core FLOPs of the chunked forward
    (mamba3_gen.bench.workload_bytes / workload_flops; `inputs` is not needed and kept for old callers)."""
    return {"bytes": workload_bytes(spec, B, L, H), "flops": workload_flops(spec, B, L, H)}


def bench_inputs(spec, B, L, H, dtype=torch.bfloat16) -> dict:
    """The timed inputs (seed 0, on the GPU; mamba3_gen.bench.build_inputs): Q, K, V, Z in `dtype`; A·Δ, Δ, trap,
    angles, biases, D and the MIMO projections in fp32, as the official wrappers and the layer take them."""
    inputs = build_inputs(spec, B, L, H, "fwd", device="cuda")
    return {k: (v.to(dtype) if k in LOW_PRECISION else v) for k, v in inputs.items()}


def bench(spec_path, B=8, L=4096, H=32, dtype=torch.bfloat16, ceilings=None, with_states=False) -> dict:
    import triton

    spec = load_spec(str(spec_path))
    mod = mamba3_gen.load(spec_path)
    inputs = bench_inputs(spec, B, L, H, dtype)
    fn = lambda: mod.mamba3_forward(**inputs, return_final_states=with_states)  # noqa: E731
    fn()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    w = work(spec, B, L, H, inputs)
    res = {"spec": spec.name, "B": B, "L": L, "H": H, "dtype": str(dtype).replace("torch.", ""), "ms": ms, **w}
    best = getattr(mod.mamba3_fwd_kernel, "best_config", None)
    res["config"] = str(best) if best is not None else None
    if ceilings:
        res["floor_bytes_ms"] = w["bytes"] / ceilings["copy_GBps"] / 1e6
        res["floor_flops_ms"] = w["flops"] / ceilings["bf16_TFLOPs"] / 1e9
        res["pct_of_copy_bw"] = 100 * res["floor_bytes_ms"] / ms
    return res


def main(spec_path, batch=8, seqlen=4096, heads=32):
    if not torch.cuda.is_available():
        print("bench needs a CUDA GPU; none is visible", file=sys.stderr)
        return 1
    ceil = measure_ceilings()
    print(f"device {torch.cuda.get_device_name()}: copy {ceil['copy_GBps']:.0f} GB/s, bf16 mm {ceil['bf16_TFLOPs']:.0f} TFLOP/s")
    r = bench(spec_path, batch, seqlen, heads, ceilings=ceil)
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    a = ap.parse_args()
    sys.exit(main(a.spec, a.batch, a.seqlen, a.heads))
