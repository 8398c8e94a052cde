"""The rotation pre-pass's segments per sequence (MAMBA3_GEN_PREP_SEGMENTS), swept on one GPU: for each spec and
size, the forward (``MAMBA3_GEN_ROTATE=prepass``) at each segment count, its output checked against the first
count's (1 unless --segments says otherwise)
(the segments' prefix sums Θ in another reduction layout: fp32 rounding of Θ, then bf16 rounding of Q̂, K̂), and the
mean time per CUDA kernel under torch.profiler (the prep kernel's and the whole forward's).

    python benchmarks/prep_segments.py [--specs siso_trap_complex,mimo_r4] [--sizes 1:16384:32,2:8192:32,8:4096:32]
                                       [--segments 1,2,4,8,16,auto] [--set dtypes.compute=bf16] [--calls 20] [--out DIR]

Writes DIR/prep_segments.json (default DIR: $OUT or ./bench_results) and prints one line per (spec, size, segments).
Each segment count is its own autotune key of the prep kernel (SEGS), so every row runs its own best tile.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PREP = "mamba3_rotate_prep_kernel"


def _sizes(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in item.split(":")) for item in text.split(",") if item]


def kernel_times(fn, calls: int) -> dict[str, float]:
    """{CUDA kernel name: mean ms per call of fn} under torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times[ev.name] += ev.device_time / 1e3 / calls
    return dict(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", default="siso_trap_complex,mimo_r4")
    ap.add_argument("--sizes", type=_sizes, default=_sizes("1:16384:32,2:8192:32,8:4096:32"))
    ap.add_argument("--segments", default="1,2,4,8,16,auto")
    ap.add_argument("--set", dest="sets", action="append", default=["dtypes.compute=bf16"],
                    help="spec overrides (default: bf16 dot operands, where auto takes the pre-pass)")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench_results"))
    args = ap.parse_args(argv)

    import torch

    import mamba3_gen
    from mamba3_gen import bench
    from mamba3_gen.reference import rel_err
    from mamba3_gen.spec.sources import spec_with_overrides

    os.environ["MAMBA3_GEN_ROTATE"] = "prepass"
    rows = []
    for name in args.specs.split(","):
        spec = spec_with_overrides(ROOT / "specs" / f"{name}.yaml", tuple(args.sets))
        mod = mamba3_gen.load(spec)
        for size in args.sizes:
            kw = bench.build_inputs(spec, *size, "fwd", seed=0)
            ref = None
            for segs in args.segments.split(","):
                os.environ["MAMBA3_GEN_PREP_SEGMENTS"] = segs
                out = mod.mamba3_forward(**kw)  # first call: autotunes this SEGS key
                mod.mamba3_forward(**kw)
                torch.cuda.synchronize()
                ref = out if ref is None else ref
                err = rel_err(out.float(), ref.float())
                times = kernel_times(lambda: mod.mamba3_forward(**kw), args.calls)
                row = {"spec": name, "size": list(size), "segments": segs, "rel_err_vs_first": err,
                       "prep_ms": times.get(PREP, 0.0), "total_ms": sum(times.values()),
                       "kernels": dict(sorted(times.items(), key=lambda kv: -kv[1]))}
                rows.append(row)
                print(f"{name:20s} {':'.join(map(str, size)):12s} segs={segs:5s} prep {row['prep_ms']:.3f} ms  "
                      f"total {row['total_ms']:.3f} ms  err vs first {err:.2e}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "prep_segments.json"
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "sets": args.sets, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
