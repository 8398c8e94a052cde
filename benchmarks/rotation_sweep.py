"""Where the rotation happens, timed: the rotation pre-pass (MAMBA3_GEN_ROTATE=prepass) against the inline rotation,
under both forwards (MAMBA3_GEN_FORWARD=fused|chunked), beside the official kernel, on identical inputs, one GPU run.

    python benchmarks/rotation_sweep.py [--out DIR] [--quick]

For each workload (complex specs, H32 P64, bf16 Q/K/V/Z): every (forward, rotation) pair's output is compared with
the first pair's (relative error, bf16 output) before it is timed (do_bench median, L2 flushed), and with the
official kernel's when one loads. Accuracy: at B2 L2048 H8 every pair and the official kernel against the float64
chunked reference on the same (bf16-rounded) inputs. Writes DIR/rotation_sweep.json (default $OUT or
benchmarks/results) and prints one table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mamba3_gen import bench  # noqa: E402
from mamba3_gen.spec.sources import spec_with_overrides  # noqa: E402

SPECS = ROOT / "specs"
BIG, LONG = (8, 4096, 32), (1, 16384, 32)
N64, BF16 = ("dims.d_state=64",), ("dtypes.compute=bf16",)
WORKLOADS = [  # (spec file, overrides, sizes); bf16 operands first (where `auto` picks the pre-pass)
    ("siso_trap_complex", BF16, (BIG, LONG)),
    ("mimo_r4", BF16, (BIG,)),
    ("siso_trap_complex", (), (BIG, LONG)),
    ("siso_trap_complex", N64, (BIG,)),
    ("two_lag_complex", (), (BIG,)),
    ("mimo_r4", (), (BIG,)),
    ("mimo_r4", N64, (BIG,)),
]
PAIRS = [(f, r) for f in ("fused", "chunked") for r in ("inline", "prepass")]


def _with_env(forward: str, rotation: str, fn):
    def run():
        os.environ["MAMBA3_GEN_FORWARD"], os.environ["MAMBA3_GEN_ROTATE"] = forward, rotation
        return fn()
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    ap.add_argument("--quick", action="store_true", help="the first workload only")
    ap.add_argument("--specs", type=lambda t: t.split(","), metavar="NAME,...", help="only these spec files")
    ap.add_argument("--name", default="rotation_sweep", help="base name of the JSON file")
    args = ap.parse_args(argv)
    import torch
    import triton

    import mamba3_gen
    from mamba3_gen.reference import chunked_reference, rel_err, to_float64

    if not torch.cuda.is_available():
        print("rotation_sweep.py needs a CUDA GPU", file=sys.stderr)
        return 1
    ceilings = bench.measure_ceilings()
    print(f"ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 GEMM {ceilings['bf16_TFLOPs']:.0f} TFLOP/s", flush=True)
    rows = []
    doc = {"device": torch.cuda.get_device_name(), "ceilings": ceilings, "run": bench.new_run(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    chosen = [w for w in WORKLOADS if not args.specs or w[0] in args.specs]
    for name, sets, sizes in (chosen[:1] if args.quick else chosen):
        spec = spec_with_overrides(SPECS / f"{name}.yaml", sets)
        mod = mamba3_gen.load(spec)
        official, why = bench.resolve_providers(spec, "fwd", ["official"])
        label = name + ("" if not sets else " " + " ".join(sets))
        # accuracy against float64 on a smaller shape (bf16-rounded inputs, the same for every provider)
        kw = bench.build_inputs(spec, 2, 2048, 8, "fwd", seed=3)
        ref = chunked_reference(spec, **to_float64(kw))[0]
        acc = {}
        for f, r in PAIRS:
            acc[f"{f}/{r}"] = rel_err(_with_env(f, r, lambda: mod.mamba3_forward(**kw))(), ref)
        for p in official:
            acc["official"] = rel_err(p.make(kw)(), ref)
        print(f"{label}: error vs float64 (B2 L2048 H8): "
              + ", ".join(f"{k} {v:.2e}" for k, v in acc.items()), flush=True)
        for B, L, H in sizes:
            kw = bench.build_inputs(spec, B, L, H, "fwd", seed=0)
            first = None
            for f, r in PAIRS:
                run = _with_env(f, r, lambda: mod.mamba3_forward(**kw))
                t0 = time.perf_counter()
                out = run()
                torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                diff = 0.0 if first is None else rel_err(out, first)
                first = out if first is None else first
                ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
                rows.append(dict(spec=label, B=B, L=L, H=H, provider=f"generated {f}/{r}", ms=ms,
                                 first_call_s=first_s, rel_vs_first=diff, err_vs_f64_small=acc[f"{f}/{r}"]))
                print(f"  {label} B{B} L{L}: {f}/{r} {ms:.3f} ms (first call {first_s:.1f} s, vs first pair {diff:.1e})",
                      flush=True)
            for p in official:
                run = p.make(kw)
                out = run()
                diff = rel_err(out, first)
                ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
                rows.append(dict(spec=label, B=B, L=L, H=H, provider="official", ms=ms, rel_vs_first=diff,
                                 err_vs_f64_small=acc.get("official")))
                print(f"  {label} B{B} L{L}: official {ms:.3f} ms (vs ours {diff:.1e})", flush=True)
            if not official:
                print(f"  official skipped: {why}", flush=True)
            path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
