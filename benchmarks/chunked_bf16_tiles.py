"""Which tile of the chunked forward fails with bf16 dot operands: each (states tile, out tile) in its own process.

    python benchmarks/chunked_bf16_tiles.py [--spec specs/siso_trap_complex.yaml] [--json OUT]

The chunked forward's autotune hit an illegal memory access on the H200 with bf16 operands (NOTES.md, issue 11),
which kills the CUDA context, so resources.choose_chunked_configs keeps only the default tiles for bf16. Here every
states tile is run with the default out tile and every out tile with the default states tile, one child process
each (a crash cannot take the others down), then the autotuner over all of them in one process (as when it
failed), under both rotations (pre-pass and inline), at B2 L1024 H8 and B8 L4096 H32; each output is compared with
the fused forward's on the same inputs (bf16 operands round differently per tile, so the bound is the bf16-operand
error: 3e-2 relative to max |out|), and each run is timed at B1 L16384 H32 (do_bench median, one child at a time).
Prints one JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]

# the GPU tiles of resources.choose_chunked_configs (N = 128, P = 64): (BLOCK_P, BLOCK_K, warps) / (BLOCK_P, warps)
STATES = [(64, 32, 8), (32, 32, 8), (32, 16, 2), (16, 16, 2)]
OUTS = [(64, 8), (32, 8)]
SIZES = [(2, 1024, 8), (8, 4096, 32)]
TIMED = (1, 16384, 32)
TOL = 3e-2


def child(spec_path: str, states: tuple, out: tuple, rotate: str) -> dict:
    os.environ["MAMBA3_GEN_ROTATE"] = rotate
    os.environ["MAMBA3_GEN_AUTOTUNE"] = "off"  # the fused reference at its default tile; the chunked tiles set below
    import torch
    import triton

    import mamba3_gen
    from mamba3_gen.reference import make_inputs
    from mamba3_gen.spec.sources import spec_with_overrides

    spec = spec_with_overrides(spec_path, ["dtypes.compute=bf16"])
    mod = mamba3_gen.load(spec)
    fwd = mod.mamba3_forward
    sk, ok = fwd.chunked_kernels  # the states and out kernels' autotuners
    pick_s = STATES if states is None else [states]  # None: autotune over every tile in this process, as the
    pick_o = OUTS if out is None else [out]            # failing run did
    sk.configs = [triton.Config({"BLOCK_P": p, "BLOCK_K": k}, num_warps=w, num_stages=1) for p, k, w in pick_s]
    ok.configs = [triton.Config({"BLOCK_P": p}, num_warps=w, num_stages=1) for p, w in pick_o]
    row = {"states": states, "out": out, "rotate": rotate, "sizes": []}
    for B, L, H in SIZES:
        kw = make_inputs(spec, B, L, H, dtype=torch.bfloat16, device="cuda", seed=1)
        os.environ["MAMBA3_GEN_FORWARD"] = "fused"
        want = fwd(**kw).float()
        os.environ["MAMBA3_GEN_FORWARD"] = "chunked"
        got = fwd(**kw).float()
        torch.cuda.synchronize()
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        row["sizes"].append({"B": B, "L": L, "H": H, "rel_err": err, "ok": err <= TOL})
    # the chunked forward's time where `auto` runs it at small batch (B1 L16384), with this tile or the tuned one
    kw = make_inputs(spec, *TIMED, dtype=torch.bfloat16, device="cuda", seed=2)
    fwd(**kw)  # compile (and tune) outside the lock
    with FileLock(Path(tempfile.gettempdir()) / "chunked_bf16_tiles.lock"):  # one child times at a time
        row["ms_B1_L16384"] = triton.testing.do_bench(lambda: fwd(**kw), warmup=25, rep=100)
    row["tuned"] = [str(getattr(k, "best_config", None)) for k in (sk, ok)]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(ROOT / "specs" / "siso_trap_complex.yaml"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        states, out, rotate = json.loads(args.child)
        tup = (lambda x: None if x is None else tuple(x))
        print(json.dumps(child(args.spec, tup(states), tup(out), rotate)), flush=True)
        return 0
    runs = [(s, OUTS[0], r) for r in ("prepass", "inline") for s in STATES]
    runs += [(STATES[0], o, r) for r in ("prepass", "inline") for o in OUTS[1:]]
    runs += [(None, None, r) for r in ("prepass", "inline")]  # the autotuner over every tile, one process

    def one(run):
        proc = subprocess.run([sys.executable, __file__, "--spec", args.spec, "--child", json.dumps(run)],
                              capture_output=True, text=True, timeout=900)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            return json.loads(lines[-1])
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"states": run[0], "out": run[1], "rotate": run[2], "error": " | ".join(tail)[-400:],
                "returncode": proc.returncode}

    with ThreadPoolExecutor(max_workers=5) as pool:  # compiles in parallel; each child's GPU work is small
        rows = list(pool.map(one, runs))
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
