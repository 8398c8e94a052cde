"""The fused backward (MAMBA3_GEN_BWD=fused) beside the chunked one on a GPU: gradients checked against each other on
identical inputs, then forward + backward timed for each, and the fused kernel alone at each candidate tile.

    python benchmarks/fused_bwd.py [--specs siso_trap_complex,mimo_r4] [--sizes 8:4096:32,1:16384:32]
                                   [--set dtypes.compute=bf16] [--configs 16:8,16:4,32:8,32:4] [--deterministic]
                                   [--name NAME] [--only chunked|fused]

Inputs as benchmarks/gpu_backward.py draws them (bf16 q/k/v/z, seed 0). Check: each gradient of the fused run
against the chunked run's, ‖g_f − g_c‖ / ‖g_c‖ (both fp32 arithmetic in another order: ≤ 1e-5 expected; bf16 outputs
one rounding, 2^-8). Times: `triton.testing.do_bench` medians (L2 flushed) of forward + backward; per candidate
tile (BLOCK_K:num_warps) the fused kernel's autotuner is given that one config. Results: $OUT/NAME.json.
``--only MODE``: two forward + backward calls under MAMBA3_GEN_BWD=MODE and nothing else (for a profiler wrapped
around it, e.g. ``ncu --kernel-name regex:mamba3_bwd_fused --launch-count 1 ... python benchmarks/fused_bwd.py
--specs siso_trap_complex --sizes 8:4096:32 --only fused``; MAMBA3_GEN_AUTOTUNE=off keeps tuning launches out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mamba3_gen  # noqa: E402
from benchmarks.gpu_backward import _leaves, _spec  # noqa: E402
from mamba3_gen.reference import make_inputs, rel_err  # noqa: E402


def _run(fn, dout, grads):
    for x in grads:
        x.grad = None
    fn().backward(dout)
    torch.cuda.synchronize()
    return {id(x): x.grad.detach().clone() for x in grads}


def main() -> int:
    import triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", default="siso_trap_complex,mimo_r4")
    ap.add_argument("--sizes", default="8:4096:32,1:16384:32")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--configs", default="16:8,16:4,32:8,32:4", help="BLOCK_K:num_warps of the fused kernel")
    ap.add_argument("--deterministic", action="store_true",
                    help="torch.use_deterministic_algorithms(True): dq̃/dk̃ per head, no atomics (HEAD_SUMS off)")
    ap.add_argument("--name", default="fused_bwd")
    ap.add_argument("--only", choices=("chunked", "fused"), help="two fwd+bwd calls in this mode, no checks or times")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT") or "gpu_results")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    rows = []
    for name in args.specs.split(","):
        spec = _spec(ROOT / "specs" / f"{name}.yaml", None, tuple(args.sets))
        mod = mamba3_gen.load(spec)
        bwd = mod.mamba3_forward.backward
        tuner = bwd.fused_kernel
        shipped = list(tuner.configs)
        for size in args.sizes.split(","):
            B, L, H = (int(x) for x in size.split(":"))
            kw = make_inputs(spec, B, L, H, dtype=torch.float32, device="cuda", seed=0)
            leaves = _leaves(kw)
            grads = [v for v in leaves.values() if isinstance(v, torch.Tensor) and v.requires_grad]
            names = {id(v): k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad}
            dout = torch.randn(B, L, H, spec.dims.headdim, device="cuda", dtype=torch.bfloat16)

            def fn():
                return mod.mamba3_forward(**leaves)

            if args.only:
                os.environ["MAMBA3_GEN_BWD"] = args.only
                for _ in range(2):
                    _run(fn, dout, grads)
                continue

            row = {"spec": spec.name, "sets": args.sets, "B": B, "L": L, "H": H, "deterministic": args.deterministic,
                   "device": torch.cuda.get_device_name()}
            os.environ["MAMBA3_GEN_BWD"] = "chunked"
            t0 = time.time()
            ref = _run(fn, dout, grads)
            row["chunked_first_s"] = round(time.time() - t0, 1)
            os.environ["MAMBA3_GEN_BWD"] = "fused"
            t0 = time.time()
            got = _run(fn, dout, grads)
            row["fused_first_s"] = round(time.time() - t0, 1)
            row["fused_vs_chunked"] = {names[i]: float(rel_err(got[i].float(), ref[i].float())) for i in ref}
            for mode in ("chunked", "fused"):
                os.environ["MAMBA3_GEN_BWD"] = mode
                row[f"{mode}_ms"] = triton.testing.do_bench(lambda: fn().backward(dout), grad_to_none=grads,
                                                            warmup=10, rep=100, return_mode="median")
            tiles = {}
            for c in args.configs.split(","):
                bk, nw = (int(x) for x in c.split(":"))
                if bk > spec.dims.d_state // 2:
                    continue
                tuner.configs = [triton.Config({"BLOCK_K": bk}, num_warps=nw, num_stages=1)]
                tuner.cache.clear()
                try:
                    _run(fn, dout, grads)
                    tiles[c] = triton.testing.do_bench(lambda: fn().backward(dout), grad_to_none=grads,
                                                       warmup=10, rep=100, return_mode="median")
                except Exception as e:  # a tile that does not fit is reported, not fatal
                    tiles[c] = f"{type(e).__name__}: {str(e)[:120]}"
            tuner.configs = shipped
            tuner.cache.clear()
            row["fused_tiles_ms"] = tiles
            rows.append(row)
            print(json.dumps(row), flush=True)
    if rows:
        (out_dir / f"{args.name}.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
