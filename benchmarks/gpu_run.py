"""One GPU session: accuracy of every shipped spec (and benchmarks/specs/*.yaml, formula rules) at real sizes (bf16
and fp32) against the float64 recurrence, and the bf16 forward timings, with this device's measured ceilings.
Results go to $OUT (or ./gpu_results) as JSON and a Markdown table.

    python benchmarks/gpu_run.py [--quick] [--before DIR]

``--before DIR``: DIR is another checkout of this repository (e.g. ``git worktree add DIR <commit>``); its own
``benchmarks/gpu_run.py --skip-accuracy`` runs in a subprocess in the same session, so the forward times before and
after a change are measured side by side, and the table gives their ratio.

Accuracy inputs are drawn once in fp32 and rounded to bf16 values, so one float64 reference (computed on the GPU in
float64) serves both the bf16 and the fp32 runs of the kernel.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mamba3_gen  # noqa: E402
from benchmarks import official  # noqa: E402
from benchmarks.bench_forward import bench, bench_inputs, measure_ceilings  # noqa: E402
from mamba3_gen.reference import make_inputs, naive_recurrence, rel_err  # noqa: E402
from mamba3_gen.runtime.state import Mamba3State  # noqa: E402
from mamba3_gen.spec.loader import load_spec  # noqa: E402

SPEC_PATHS = sorted((ROOT / "specs").glob("*.yaml")) + sorted((ROOT / "benchmarks" / "specs").glob("*.yaml"))
_LOW_PRECISION = ("q", "k", "v", "z")  # what the official wrappers take in bf16


def _cast(inputs: dict, dtype) -> dict:
    out = {}
    for key, val in inputs.items():
        if key in _LOW_PRECISION:
            out[key] = val.to(dtype)
        else:
            out[key] = val
    return out


def circ_err(a, b) -> float:
    d = torch.remainder(a.double() - b.double() + math.pi, 2 * math.pi) - math.pi
    return d.abs().max().item()


def _state_errors(row: dict, state: Mamba3State, ref_state: Mamba3State) -> dict:
    for f in Mamba3State._fields:
        a, b = getattr(state, f), getattr(ref_state, f)
        if a is None or b is None:
            continue
        row[f"{f}_rel"] = rel_err(a, b)
        if f == "angle":
            row["angle_max_rad"] = circ_err(a, b)
    return row


def accuracy(spec_path, B, L, H, seed=0, with_init=False, official_fn=None) -> list[dict]:
    spec = load_spec(str(spec_path))
    mod = mamba3_gen.load(spec_path)
    inputs = make_inputs(spec, B, L, H, dtype=torch.float32, device="cuda", seed=seed, with_initial_states=with_init)
    for key in _LOW_PRECISION:  # bf16-representable values: one reference for both dtypes
        if key in inputs:
            inputs[key] = inputs[key].to(torch.bfloat16).float()
    t0 = time.time()
    with torch.device("cuda"):
        ref, ref_state = naive_recurrence(spec, **inputs)
    t_ref = time.time() - t0
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        out, state = mod.mamba3_forward(**_cast(inputs, dtype), return_final_states=True)
        torch.cuda.synchronize()
        row = {"spec": spec.name, "B": B, "L": L, "H": H, "dtype": str(dtype).replace("torch.", ""),
               "init_states": with_init, "out_rel": rel_err(out, ref), "ref_seconds": round(t_ref, 1),
               "nan": bool(torch.isnan(out).any())}
        rows.append(_state_errors(row, state, ref_state))
        print(json.dumps(row), flush=True)
    if official_fn is not None:  # the official Triton SISO on the same (bf16) inputs
        with torch.no_grad():
            out, *state = official.siso_forward(official_fn, _cast(inputs, torch.bfloat16), return_final_states=True)
        torch.cuda.synchronize()
        row = {"spec": spec.name, "provider": "official", "B": B, "L": L, "H": H, "dtype": "bfloat16",
               "init_states": with_init, "out_rel": rel_err(out, ref), "nan": bool(torch.isnan(out).any())}
        rows.append(_state_errors(row, Mamba3State(*state), ref_state))
        print(json.dumps(row), flush=True)
    return rows


def bench_official(spec_path, B, L, H, official_fn) -> dict:
    """The official SISO forward timed on the inputs `bench` uses (same seed, bf16, no states)."""
    import triton

    inputs = bench_inputs(load_spec(str(spec_path)), B, L, H)
    with torch.no_grad():
        fn = lambda: official.siso_forward(official_fn, inputs)  # noqa: E731
        fn()
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    return {"spec": Path(spec_path).stem, "provider": "official", "B": B, "L": L, "H": H, "ms": ms, "config": None}


def run_before(before: Path, out_dir: Path, quick: bool) -> list[dict]:
    """The other checkout's forward timings (its own gpu_run.py, --skip-accuracy), measured now on this device."""
    import subprocess

    sub_out = out_dir / "before"
    sub_out.mkdir(exist_ok=True)
    env = dict(os.environ, OUT=str(sub_out), PYTHONPATH=os.pathsep.join(filter(None, [str(before), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "benchmarks/gpu_run.py", "--skip-accuracy", "--tag", "_before"] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, cwd=before, env=env, capture_output=True, text=True)
    print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
    found = sub_out / "gpu_results_before.json"
    if proc.returncode or not found.exists():
        return []
    rows = json.loads(found.read_text())["bench"]
    return [r for r in rows if r.get("provider", "ours") == "ours"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--before", default=None, help="another checkout: time its forward in the same session")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", ROOT / "gpu_results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    info["triton"] = triton.__version__
    print(json.dumps(info), flush=True)
    results = {"info": info, "accuracy": [], "bench": []}
    B, L, H = (2, 256, 4) if args.quick else (8, 4096, 32)
    official_siso = official.load_siso()
    if not args.skip_accuracy:
        for path in SPEC_PATHS:
            spec = load_spec(str(path))
            results["accuracy"] += accuracy(path, B, L, H, with_init=spec.options.initial_states)
        # the official kernels' figures were measured at B2 L2048 H8 (SISO) and with MIMO R4 C16
        for name in ("siso_trap_complex", "mimo_r4"):
            results["accuracy"] += accuracy(ROOT / "specs" / f"{name}.yaml", 2, 2048, 8, seed=1,
                                            official_fn=official_siso if name.startswith("siso") else None)
    if not args.skip_bench:
        ceil = measure_ceilings()
        results["ceilings"] = ceil
        print(json.dumps(ceil), flush=True)
        for path in SPEC_PATHS:
            name = path.stem
            r = bench(path, B, L, H, ceilings=ceil)
            results["bench"].append(r)
            print(json.dumps(r), flush=True)
            if name == "siso_trap_complex" and official_siso is not None:  # side by side, same process
                o = bench_official(ROOT / "specs" / f"{name}.yaml", B, L, H, official_siso)
                o["ours_over_official"] = r["ms"] / o["ms"]
                results["bench"].append(o)
                print(json.dumps(o), flush=True)
    if args.before:
        results["before"] = run_before(Path(args.before), out_dir, args.quick)
        after = {r["spec"]: r["ms"] for r in results["bench"] if r.get("provider", "ours") == "ours"}
        for r in results["before"]:
            if r["spec"] in after:
                r["after_ms"] = after[r["spec"]]
                r["before_over_after"] = r["ms"] / after[r["spec"]]
    (out_dir / f"gpu_results{args.tag}.json").write_text(json.dumps(results, indent=1))
    lines = ["| spec | provider | dtype | B L H | out rel | ssm rel | k rel | angle max rad |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["accuracy"]:
        lines.append(f"| {r['spec']} | {r.get('provider', 'ours')} | {r['dtype']} | {r['B']} {r['L']} {r['H']} | "
                     f"{r['out_rel']:.2e} | "
                     f"{r.get('ssm_rel', float('nan')):.2e} | {r.get('k_rel', float('nan')):.2e} | "
                     f"{r.get('angle_max_rad', float('nan')):.2e} |")
    lines += ["", "| spec | provider | ms (bf16) | floor bytes ms | floor flops ms | config |", "|---|---|---|---|---|---|"]
    for r in results["bench"]:
        lines.append(f"| {r['spec']} | {r.get('provider', 'ours')} | {r['ms']:.3f} | {r.get('floor_bytes_ms', 0):.3f} | "
                     f"{r.get('floor_flops_ms', 0):.3f} | {r['config']} |")
    if results.get("before"):
        lines += ["", "| spec | before ms | after ms | before/after |", "|---|---|---|---|"]
        for r in results["before"]:
            if "after_ms" in r:
                lines.append(f"| {r['spec']} | {r['ms']:.3f} | {r['after_ms']:.3f} | {r['before_over_after']:.3f} |")
    table = "\n".join(lines)
    (out_dir / f"gpu_results{args.tag}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
