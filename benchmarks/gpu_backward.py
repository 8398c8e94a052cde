"""Issue 12 on a GPU: the generated backward's bf16 gradients at real sizes against float64 autograd (and the
official SISO backward on the same inputs), and forward + backward times side by side with the official kernel.

    python benchmarks/gpu_backward.py [--specs siso_trap_complex,mimo_r4] [--B 8 --L 4096 --H 32] [--skip-grads]
                                      [--set dtypes.compute=bf16] [--no-official] [--profile]
                                      [--sizes B:L:H[:N],...] [--name NAME]

Gradients: inputs drawn once in fp32 (make_inputs, seed 0); q, k, v, z rounded to bf16 values, so one float64
reference serves every provider. The loss is Σ out·W with a fixed random W (float64), the same for all providers.
The reference is autograd through `chunked_reference` in float64, computed for a few sequences at a time
(gradients are per sequence; the parameter-like inputs q_bias, k_bias, D sum over the slices). Reported per
gradient: ‖g − g_ref‖ / ‖g_ref‖. Times: `triton.testing.do_bench` (median, L2 flushed) of forward + backward
(`out.backward(dout)`), bf16 q/k/v/z, no states, the official SISO on its spec (trapezoidal, complex, pairwise).
``--set`` builds every spec with those overrides (the official rows are unchanged); ``--profile`` adds each
generated kernel's mean time over 5 forward + backward calls (torch.profiler) to the time rows; ``--sizes`` times
those sizes (H heads, N the state size when given) instead of the issue's.
Results: $OUT/NAME.json (default name gpu_backward; $OUT unset or empty: ./gpu_results), one JSON row a line printed.
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
from benchmarks import official  # noqa: E402
from mamba3_gen.reference import make_inputs, rel_err  # noqa: E402
from mamba3_gen.reference.chunked import chunked_reference  # noqa: E402

LOW = ("q", "k", "v", "z")  # bf16 on the GPU providers
BATCHED = ("q", "k", "v", "z", "adt", "dt", "trap", "angles")  # leading dim is the batch


def _leaves(kw: dict, dtype_low=torch.bfloat16, dtype_rest=None) -> dict:
    out = {}
    for key, val in kw.items():
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            if key in LOW:
                x = val.detach().to(dtype_low)
            else:
                x = val.detach().to(dtype_rest) if dtype_rest is not None else val.detach().clone()
            out[key] = x.requires_grad_()
        else:
            out[key] = val
    return out


def _grads(leaves: dict) -> dict:
    return {k: v.grad.detach().double() for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad
            and v.grad is not None}


def reference_grads(spec, kw: dict, W: torch.Tensor, per: int) -> dict:
    """Float64 autograd through the chunked reference, `per` sequences at a time."""
    B = kw["q"].shape[0]
    acc: dict = {}
    for b0 in range(0, B, per):
        part = {k: (v[b0:b0 + per] if k in BATCHED and isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        leaves = _leaves(part, torch.float64, torch.float64)
        with torch.device(W.device):  # the reference's own tensors (masks, zero states) beside the inputs
            out, _ = chunked_reference(spec, **leaves)
        (out * W[b0:b0 + per]).sum().backward()
        for k, g in _grads(leaves).items():
            if k in BATCHED:
                acc.setdefault(k, []).append(g)
            else:
                acc[k] = acc.get(k, 0) + g
        del leaves, out
    return {k: (torch.cat(v) if isinstance(v, list) else v) for k, v in acc.items()}


def grad_errors(spec_path: Path, B: int, L: int, H: int, per: int, official_fn, sets: tuple = ()) -> list[dict]:
    spec = _spec(spec_path, None, sets)
    mod = mamba3_gen.load(spec)
    kw = make_inputs(spec, B, L, H, dtype=torch.float32, device="cuda", seed=0)
    for key in LOW:
        if key in kw:
            kw[key] = kw[key].to(torch.bfloat16).float()
    W = torch.randn(B, L, H, spec.dims.headdim, dtype=torch.float64, device="cuda",
                    generator=torch.Generator("cuda").manual_seed(1))
    t0 = time.time()
    ref = reference_grads(spec, kw, W, per)
    t_ref = time.time() - t0
    rows = []
    providers = [("generated", lambda lv: mod.mamba3_forward(**lv))]
    if official_fn is not None and spec.name == "siso_trap_complex":
        providers.append(("official", lambda lv: official.siso_forward(official_fn, lv)))
    for name, fn in providers:
        leaves = _leaves(kw)
        out = fn(leaves)
        (out.double() * W).sum().backward()
        torch.cuda.synchronize()
        row = {"spec": spec.name, "sets": list(sets), "provider": name, "B": B, "L": L, "H": H,
               "ref_seconds": round(t_ref, 1)}
        for k, g in _grads(leaves).items():
            if k in ref:
                row[k] = rel_err(g, ref[k])
        rows.append(row)
        print(json.dumps(row), flush=True)
        del leaves, out
    return rows


def _spec(spec_path: Path, d_state: int | None = None, sets: tuple = ()):
    """The spec at `spec_path` with the ``--set`` overrides, dims.d_state replaced (and the name suffixed) when
    given."""
    from mamba3_gen.spec.sources import spec_with_overrides

    spec = spec_with_overrides(spec_path, tuple(sets))
    if d_state is None or d_state == spec.dims.d_state:
        return spec
    doc = spec.model_dump(mode="json", by_alias=True)
    doc["name"] = f"{spec.name}_n{d_state}"
    doc["dims"] = {**doc["dims"], "d_state": d_state}
    return type(spec).model_validate(doc)


def kernel_profile(fn, dout, grads: list, calls: int = 5) -> dict:
    """{kernel name: mean ms per forward + backward} over `calls` calls (torch.profiler, after one warm call). The
    leaves' gradients are reset before each call, as do_bench's grad_to_none does (else the table holds autograd's
    accumulation adds, which the timed runs never do)."""
    from torch.profiler import ProfilerActivity, profile

    def once():
        for x in grads:
            x.grad = None
        fn().backward(dout)

    once()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            once()
        torch.cuda.synchronize()
    acc: dict = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            acc[ev.name] = acc.get(ev.name, 0.0) + ev.device_time / 1e3 / calls
    return {k: round(v, 4) for k, v in sorted(acc.items(), key=lambda kv: -kv[1])}


def time_fwd_bwd(spec_path: Path, B: int, L: int, H: int, official_fn, d_state: int | None = None,
                 sets: tuple = (), profile_it: bool = False) -> list[dict]:
    import triton

    spec = _spec(spec_path, d_state, sets)
    mod = mamba3_gen.load(spec)
    kw = make_inputs(spec, B, L, H, dtype=torch.float32, device="cuda", seed=0)
    leaves = _leaves(kw)
    dout = torch.randn(B, L, H, spec.dims.headdim, device="cuda", dtype=torch.bfloat16)
    providers = [("generated", lambda: mod.mamba3_forward(**leaves))]
    if official_fn is not None and spec.name.startswith("siso_trap_complex"):
        providers.append(("official", lambda: official.siso_forward(official_fn, leaves)))
    rows = []
    grads = [v for v in leaves.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    for name, fn in providers:
        t0 = time.time()
        fn().backward(dout)
        torch.cuda.synchronize()
        first = time.time() - t0
        ms = triton.testing.do_bench(lambda: fn().backward(dout), grad_to_none=grads, warmup=20, rep=200,
                                     return_mode="median")
        with torch.no_grad():
            ms_fwd = triton.testing.do_bench(fn, warmup=20, rep=200, return_mode="median")
        row = {"spec": spec.name, "sets": list(sets), "provider": name, "B": B, "L": L, "H": H, "fwd_bwd_ms": ms,
               "fwd_ms": ms_fwd, "first_call_s": round(first, 1)}
        if profile_it and name == "generated":
            row["kernels_ms"] = kernel_profile(fn, dout, grads)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) == 2:
        rows[0]["speedup_vs_official"] = rows[1]["fwd_bwd_ms"] / rows[0]["fwd_bwd_ms"]
    return rows


# the workloads: (B, L, d_state or None for the spec's own)
SIZES = {"siso_trap_complex": [(8, 4096, None), (8, 4096, 64), (1, 16384, None)],
         "mimo_r4": [(8, 4096, None), (8, 4096, 64)]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", default="siso_trap_complex,mimo_r4,siso_euler_real")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--H", type=int, default=32)
    ap.add_argument("--per", type=int, default=2, help="sequences per float64 reference slice")
    ap.add_argument("--skip-grads", action="store_true")
    ap.add_argument("--skip-times", action="store_true")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="build every spec with this override (repeatable)")
    ap.add_argument("--no-official", action="store_true", help="skip the official SISO backward (minutes of autotune)")
    ap.add_argument("--profile", action="store_true", help="per-kernel times of the generated fwd+bwd")
    ap.add_argument("--sizes", default=None, metavar="B:L:H[:N],...",
                    help="time these sizes (batch, length, heads, optional d_state) instead of the issue's")
    ap.add_argument("--name", default="gpu_backward", help="base name of the JSON file")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT") or ROOT / "gpu_results")
    out_dir.mkdir(parents=True, exist_ok=True)
    fn = None if args.no_official else official.load_siso()
    sets = tuple(args.sets)
    sizes = None
    if args.sizes:
        sizes = [tuple(int(x) for x in item.split(":")) for item in args.sizes.split(",")]
        if any(len(s) not in (3, 4) for s in sizes):
            ap.error(f"--sizes {args.sizes!r}: each item is B:L:H or B:L:H:N")
        sizes = [(s[0], s[1], s[2], s[3] if len(s) > 3 else None) for s in sizes]
    res = {"device": torch.cuda.get_device_name(), "grads": [], "times": []}
    for name in args.specs.split(","):
        path = ROOT / "specs" / f"{name}.yaml"
        if not args.skip_times:
            for b, l, h, n in sizes or [(b, l, args.H, n) for b, l, n in SIZES.get(name, [(args.B, args.L, None)])]:
                res["times"] += time_fwd_bwd(path, b, l, h, fn, d_state=n, sets=sets, profile_it=args.profile)
                torch.cuda.empty_cache()
        if not args.skip_grads:
            res["grads"] += grad_errors(path, args.B, args.L, args.H, args.per, fn, sets)
        torch.cuda.empty_cache()
        (out_dir / f"{args.name}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
