"""The backward kernels' tiles on a GPU: each kernel's candidate configs checked and timed inside the whole
forward + backward of one spec, so the generated defaults (templates/triton/bwd.py.jinja) come from a measurement.

    python benchmarks/bwd_sweep.py SPEC [--size B:L:H] [--kernels chunk_qk,chunk_coef,chunk_v,chunk_vc,dstate]
                                        [--set SECTION.FIELD=VALUE] [--calls N] [--jobs J] [--timeout S]
                                        [--device cuda|cpu] [--out DIR] [--checked JSON] [--no-reg-cap]

Phase 1 checks every candidate in its own process, `--jobs` at a time (they share Triton's on-disk cache, so phase 2
compiles nothing): one forward + backward with that kernel's config forced and the others as shipped, every
gradient against the shipped configs' (RMS ratio ≤ 1e-4: a tile changes only the order of fp32 sums). A candidate
that does not compile, does not fit, faults or disagrees is reported and never timed (a fault poisons only its own
process). Phase 2, in one process: per kernel and per passing candidate, ``--calls`` forward + backward calls under
torch.profiler, and that kernel's mean time; then the best config of every kernel together against the shipped
ones, forward + backward by `triton.testing.do_bench` (median), with chunk_vc (MAMBA3_GEN_BWD_CHUNKS=merged) in
place of chunk_v + chunk_coef when its best time is below their two best times' sum. Candidates: BLOCK_K (pairs per
block) 16 / 32 / 64, BLOCK_P 16 / 32 / 64 where the kernel has one, 4 / 8 warps, 1 / 2 stages, a cap of 128 registers or none (kernels
without BLOCK_P), within the spec's N/2
and P. Inputs: q, k, v, z in bf16 (as benchmarks/gpu_backward.py), the rest fp32. Writes
DIR/bwd_sweep_<spec>[_<sets>].json (default DIR: $OUT or ./bwd_sweep_results) and prints a table and the best
config lines.
`--device cpu` runs phase 1 only, in the Triton interpreter (TRITON_INTERPRET=1 is set for its workers), at
--size 1:16:2 unless given: it checks the plumbing, times nothing. Cost on an H200: ~100 candidates for a SISO
spec; at --jobs 12 phase 1 should take ~5 minutes (an estimate: check it on the first run).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# index into BackwardOp.kernels (runtime/backward.py): dstate, chunk_v, chunk_coef, chunk_qk, steps; chunk_vc is
# BackwardOp.chunk_vc_kernel, run with MAMBA3_GEN_BWD_CHUNKS=merged in place of chunk_v and chunk_coef
KERNELS = {"dstate": 0, "chunk_v": 1, "chunk_coef": 2, "chunk_qk": 3, "chunk_vc": None}
HAS_BLOCK_P = {"dstate", "chunk_v"}  # chunk_vc and chunk_coef take all of P
LOW = ("q", "k", "v", "z")
REL = 1e-4


def candidates(kernel: str, n2: int, p: int, reg_cap: bool = True) -> list[dict]:
    """The configs tried for one kernel: tiles within N/2 pairs and P columns (powers of two, ≥ 16)."""
    cap = lambda limit: [b for b in (16, 32, 64) if b <= max(16, limit)]  # noqa: E731
    ks, ps = cap(n2), (cap(p) if kernel in HAS_BLOCK_P else [None])
    # a register cap trades spills for occupancy: tried on the one-tile-per-program kernels (at 255 registers they
    # run 8 warps per SM)
    regs = (None,) if kernel in HAS_BLOCK_P or not reg_cap else (None, 128)
    out = []
    for k, bp, w, s, r in itertools.product(ks, ps, (4, 8), (1, 2), regs):
        cfg = {"BLOCK_K": k, "num_warps": w, "num_stages": s}
        if bp is not None:
            cfg["BLOCK_P"] = bp
        if r is not None:
            cfg["maxnreg"] = r
        out.append(cfg)
    return out


def _module(spec_arg: str, sets: tuple):
    import mamba3_gen
    from mamba3_gen.spec.sources import spec_with_overrides

    path = Path(spec_arg) if spec_arg.endswith((".yaml", ".yml")) else ROOT / "specs" / f"{spec_arg}.yaml"
    spec = spec_with_overrides(path, sets)
    return spec, mamba3_gen.load(spec)


def tuner_of(module, kernel: str):
    bwd = module.mamba3_forward.backward
    return bwd.chunk_vc_kernel if kernel == "chunk_vc" else bwd.kernels[KERNELS[kernel]]


def layout(kernel: str):
    """MAMBA3_GEN_BWD_CHUNKS for a run that times `kernel`."""
    os.environ["MAMBA3_GEN_BWD_CHUNKS"] = "merged" if kernel == "chunk_vc" else "split"


def force(module, kernel: str, cfg: dict | None):
    """Replace one backward kernel's autotune list by `cfg` (None: leave the shipped list)."""
    import triton

    if cfg is None:
        return
    tuner = tuner_of(module, kernel)
    kwargs = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
    tuner.configs = [triton.Config(kwargs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                                   maxnreg=cfg.get("maxnreg"))]


def make_case(spec, size: tuple, device: str):
    import torch

    from mamba3_gen.reference import make_inputs

    B, L, H = size
    kw = make_inputs(spec, B, L, H, dtype=torch.float32, device=device, seed=0)
    leaves = {}
    for key, val in kw.items():
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            x = val.detach().to(torch.bfloat16) if key in LOW and device == "cuda" else val.detach().clone()
            leaves[key] = x.requires_grad_()
        else:
            leaves[key] = val
    gen = torch.Generator(device).manual_seed(1)
    dout = torch.randn((B, L, H, spec.dims.headdim), device=device, generator=gen).to(leaves["v"].dtype)
    return leaves, dout


def fwd_bwd(module, leaves: dict, dout):
    import torch

    for x in leaves.values():
        if isinstance(x, torch.Tensor):
            x.grad = None
    module.mamba3_forward(**leaves).backward(dout)
    return {k: x.grad.detach().double().cpu() for k, x in leaves.items()
            if isinstance(x, torch.Tensor) and x.grad is not None}


def check_one(spec_arg: str, sets: tuple, size: tuple, device: str, kernel: str, cfg: dict) -> dict:
    """Phase 1 (one process): run the shipped configs, then `cfg` on `kernel`; the gradients' largest RMS ratio."""
    import torch

    from mamba3_gen.reference import rel_err

    spec, module = _module(spec_arg, sets)
    leaves, dout = make_case(spec, size, device)
    layout("chunk_v")
    ref = fwd_bwd(module, leaves, dout)
    layout(kernel)
    force(module, kernel, cfg)
    got = fwd_bwd(module, leaves, dout)
    if device == "cuda":
        torch.cuda.synchronize()
    errs = {k: rel_err(got[k], ref[k]) for k in ref}
    grad = max(errs, key=lambda k: errs[k] if math.isfinite(errs[k]) else math.inf)
    return {"ok": all(math.isfinite(e) and e <= REL for e in errs.values()), "worst": errs[grad], "grad": grad}


def _verdict(res: dict) -> str:
    if "error" in res:
        return f"REJECTED: {res['error']}"
    return f"{'ok' if res['ok'] else 'REJECTED'} (worst RMS ratio {res['worst']:.1e}, on {res['grad']})"


def phase1(args, jobs: list[tuple[str, dict]]) -> list[dict]:
    base = [sys.executable, __file__, args.spec, "--size", args.size, "--device", args.device,
            *sum((["--set", s] for s in args.sets), [])]

    env = {**os.environ, **({"TRITON_INTERPRET": "1"} if args.device == "cpu" else {})}

    def run(job):
        kernel, cfg = job
        t0 = time.time()
        try:
            proc = subprocess.run(base + ["--_check", json.dumps({"kernel": kernel, "cfg": cfg})],
                                  capture_output=True, text=True, timeout=args.timeout, env=env)
        except subprocess.TimeoutExpired:
            res = {"ok": False, "error": f"no answer in {args.timeout} s (--timeout)"}
        else:
            last = (proc.stdout.strip().splitlines() or [""])[-1]
            try:
                res = json.loads(last)
            except json.JSONDecodeError:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                res = {"ok": False, "error": tail[:200]}
        res.update(kernel=kernel, cfg=cfg, check_s=round(time.time() - t0, 1))
        print(f"  {kernel:10s} {json.dumps(cfg):62s} {_verdict(res)}", flush=True)
        return res

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return list(pool.map(run, jobs))


def phase2(args, checked: list[dict], kernels: list[str], partial=None) -> dict:
    import torch
    import triton

    from benchmarks.gpu_backward import kernel_profile

    spec, module = _module(args.spec, tuple(args.sets))
    leaves, dout = make_case(spec, tuple(int(x) for x in args.size.split(":")), "cuda")
    shipped = {k: tuner_of(module, k).configs for k in kernels}
    grads = [v for v in leaves.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    times, best = {}, {}
    for kernel in kernels:
        name = f"mamba3_bwd_{kernel}_kernel"
        rows = []
        layout(kernel)
        for res in (r for r in checked if r["kernel"] == kernel and r.get("ok")):
            force(module, kernel, res["cfg"])
            ms = kernel_profile(lambda: module.mamba3_forward(**leaves), dout, grads, args.calls).get(name)
            if ms is None:  # the profiler saw no launch of it (a layout that does not run this kernel)
                print(f"  {kernel:10s} {json.dumps(res['cfg']):62s} not launched", flush=True)
                continue
            rows.append({"cfg": res["cfg"], "ms": ms})
            print(f"  {kernel:10s} {json.dumps(res['cfg']):62s} {ms:.3f} ms", flush=True)
        tuner_of(module, kernel).configs = shipped[kernel]
        times[kernel] = rows
        if rows:
            best[kernel] = min(rows, key=lambda r: r["ms"])
        if partial is not None:
            partial({"kernels": times, "best": best})

    def total():
        return triton.testing.do_bench(lambda: module.mamba3_forward(**leaves).backward(dout), grad_to_none=grads,
                                       warmup=10, rep=100, return_mode="median")

    layout("chunk_v")
    before = total()
    for kernel, row in best.items():
        force(module, kernel, row["cfg"])
    split_ms = sum(best[k]["ms"] for k in ("chunk_v", "chunk_coef") if k in best)
    merged = "chunk_vc" in best and {"chunk_v", "chunk_coef"} <= set(best) and best["chunk_vc"]["ms"] < split_ms
    layout("chunk_vc" if merged else "chunk_v")
    after = total()
    return {"kernels": times, "best": best, "best_layout": "merged" if merged else "split",
            "fwd_bwd_ms_shipped": before, "fwd_bwd_ms_best": after}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="a spec name under specs/ or a YAML path")
    ap.add_argument("--size", default=None, help="B:L:H (default 8:4096:32; with --device cpu 1:16:2)")
    ap.add_argument("--kernels", default="chunk_qk,chunk_coef,chunk_v,chunk_vc,dstate",
                    help=f"comma-separated, of {', '.join(KERNELS)}")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--calls", type=int, default=5, help="profiled forward + backward calls per candidate")
    ap.add_argument("--jobs", type=int, default=8, help="phase-1 processes at a time")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per phase-1 process")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bwd_sweep_results"),
                    help="folder of the JSON (default: $OUT or ./bwd_sweep_results)")
    ap.add_argument("--no-reg-cap", action="store_true",
                    help="skip the 128-register candidates (they never won on the H200: benchmarks/NOTES.md 2026-12-03)")
    ap.add_argument("--checked", type=Path, default=None,
                    help="skip phase 1: take its results from this JSON of an earlier run")
    ap.add_argument("--_check", help=argparse.SUPPRESS)  # phase-1 worker: {"kernel": ..., "cfg": ...}
    args = ap.parse_args(argv)
    args.size = args.size or ("1:16:2" if args.device == "cpu" else "8:4096:32")
    size = tuple(int(x) for x in args.size.split(":"))
    if args._check:
        job = json.loads(args._check)
        print(json.dumps(check_one(args.spec, tuple(args.sets), size, args.device, job["kernel"], job["cfg"])))
        return 0
    kernels = args.kernels.split(",")
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        ap.error(f"--kernels: unknown {sorted(unknown)}; choose from {', '.join(KERNELS)}")
    spec, module = _module(args.spec, tuple(args.sets))
    meta = module.META
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "".join("_" + "".join(c if c.isalnum() else "-" for c in s) for s in args.sets)
    path = args.out / f"bwd_sweep_{spec.name}{tag}.json"
    if args.checked:  # phase 1 of an earlier run (a device call that ran out of time after it)
        checked = [r for r in json.loads(args.checked.read_text(encoding="utf-8"))["checked"]
                   if r["kernel"] in kernels]
        print(f"phase 1: {len(checked)} candidates from {args.checked}", flush=True)
    else:
        jobs = [(k, cfg) for k in kernels for cfg in candidates(k, meta["N2"], meta["P"], not args.no_reg_cap)]
        print(f"phase 1: {len(jobs)} candidates, {args.jobs} at a time", flush=True)
        t0 = time.time()
        checked = phase1(args, jobs)
        print(f"phase 1 took {time.time() - t0:.0f} s", flush=True)
    result = {"spec": spec.name, "sets": args.sets, "size": size, "checked": checked}
    path.write_text(json.dumps(result, indent=1), encoding="utf-8")  # kept if phase 2 runs out of time
    if args.device == "cuda":
        import torch

        result["device"] = torch.cuda.get_device_name()
        def partial(part):
            path.write_text(json.dumps({**result, **part}, indent=1), encoding="utf-8")

        result.update(phase2(args, checked, kernels, partial))
        print(f"fwd+bwd: shipped {result['fwd_bwd_ms_shipped']:.3f} ms, best per kernel "
              f"{result['fwd_bwd_ms_best']:.3f} ms ({result['best_layout']} value/coefficient kernels)")
        for kernel, row in result["best"].items():
            print(f"  best {kernel}: {json.dumps(row['cfg'])} {row['ms']:.3f} ms")
    path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
