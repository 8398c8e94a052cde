"""Per-kernel GPU time of one generated forward (torch.profiler), for each MAMBA3_GEN_FORWARD x MAMBA3_GEN_ROTATE
setting given, on the bench's inputs.

    python benchmarks/profile_forward.py SPEC [--set SECTION.FIELD=VALUE ...] [--size B:L:H] [--modes fused/prepass,...]

Prints, per setting, each CUDA kernel's mean time over the profiled calls (after a warm-up that compiles and
autotunes) and their sum.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--size", default="8:4096:32", help="B:L:H (default 8:4096:32)")
    ap.add_argument("--modes", default="fused/inline,fused/prepass,chunked/inline,chunked/prepass",
                    help="FORWARD/ROTATION pairs, comma separated")
    ap.add_argument("--calls", type=int, default=10, help="profiled calls per setting")
    args = ap.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    import mamba3_gen
    from mamba3_gen import bench
    from mamba3_gen.spec.sources import spec_with_overrides

    spec = spec_with_overrides(args.spec, tuple(args.sets))
    B, L, H = (int(x) for x in args.size.split(":"))
    mod = mamba3_gen.load(spec)
    kw = bench.build_inputs(spec, B, L, H, "fwd", seed=0)
    for mode in args.modes.split(","):
        forward, rotation = mode.split("/")
        os.environ["MAMBA3_GEN_FORWARD"], os.environ["MAMBA3_GEN_ROTATE"] = forward, rotation
        for _ in range(3):
            mod.mamba3_forward(**kw)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                mod.mamba3_forward(**kw)
            torch.cuda.synchronize()
        times = defaultdict(float)
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                times[ev.name] += ev.device_time / 1e3 / args.calls
        total = sum(times.values())
        print(f"{spec.name} {' '.join(args.sets)} B{B} L{L} H{H} {mode}: {total:.3f} ms in kernels")
        for name, ms in sorted(times.items(), key=lambda kv: -kv[1]):
            print(f"    {ms:8.3f} ms  {name[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
