"""Shared-memory sweep of the fused forward kernel (issue 10 item 11): what Triton's allocator gives each autotune
config, per GPU family, against `mamba3_gen.backends.triton.resources`' estimate. No GPU needed.

    python benchmarks/smem_sweep.py [--archs sm_80,sm_89,sm_90a,sm_120] [--out benchmarks/results/smem_sweep.csv]
    python benchmarks/smem_sweep.py --report [CSV]      # max |estimate - compiled| / compiled per arch x dtype

For every sweep point (the shipped specs with each compute dtype, and variants of N, P, chunk, R, real/complex and
the input dtype) and every target, it compiles each (BLOCK_P, num_warps) the build would try (`candidate_configs`;
configs that differ only in maxnreg share a shared-memory layout, the register cap acts in ptxas) and writes one CSV
row per compile: spec dims, dtypes, arch, config, the estimate, and `shared`, the bytes of shared memory.

The committed CSV (template b743be7, Triton 3.6) is every point on sm_89 and sm_90a plus, on sm_80 and sm_120, the
points `--only "siso_trap_complex/,mimo_r4/,siso_euler_real/,siso_trap_complex[chunk_size=32]/tf32,`
`siso_euler_real[chunk_size=128]/bf16"` selects (one argument; all 29 of those compiles allocate as on sm_89). `--fit` prints the greedy phase cover per table key, the
starting point of `resources._MODEL`.

`shared` is the `ttg.shared` attribute that Triton's shared-memory allocation pass (the one `make_llir` runs) writes
on the module, the value `triton.compile` stores as `metadata.shared`; the compile stops after that pass (TTIR ->
TTGIR -> allocation, ~2-3 s a config instead of ~5-10 s through LLVM, PTX and ptxas). `--full` runs the whole
`triton.compile` instead (the test suite checks that both agree). Never runs with TRITON_INTERPRET=1: the variable is
dropped before Triton is imported, and `measure` runs the compiles in a fresh subprocess.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARCHS = ("sm_80", "sm_89", "sm_90a", "sm_120")
DTYPES = ("tf32", "bf16", "fp32")
DEFAULT_CSV = REPO / "benchmarks" / "results" / "smem_sweep.csv"
FIELDS = ["point", "arch", "compute", "input", "kind", "rotation", "rope_fraction", "N", "P", "C", "R", "lags",
          "block_p", "num_warps", "estimate", "shared", "error"]


# ----------------------------------------------------------------------------------------------------------------
# sweep points: spec documents
# ----------------------------------------------------------------------------------------------------------------
def spec_doc(base: str, *, name: str | None = None, compute: str | None = None, input: str | None = None,
             kind: str | None = None, **dims) -> dict:
    """The document of specs/<base>.yaml with the given changes (dims by field name: d_state, headdim, chunk_size,
    mimo_rank)."""
    from mamba3_gen.spec.loader import load_spec

    doc = load_spec(REPO / "specs" / f"{base}.yaml").model_dump(mode="json", by_alias=True)
    doc = copy.deepcopy(doc)
    doc["name"] = name or base
    if compute:
        doc["dtypes"]["compute"] = compute
    if input:
        doc["dtypes"]["input"] = input
    if kind == "real":
        doc["state"] = {"kind": "real"}
    doc["dims"].update(dims)
    return doc


def sweep_points() -> list[tuple[str, dict]]:
    """(label, spec document) of every sweep point: 7 shipped specs x 3 compute dtypes, then dim variants."""
    points = []
    for path in sorted((REPO / "specs").glob("*.yaml")):
        for dt in DTYPES:
            points.append((f"{path.stem}/{dt}", spec_doc(path.stem, compute=dt)))
    variants = [
        ("siso_trap_complex", {"d_state": 64}), ("siso_trap_complex", {"d_state": 256}),
        ("siso_trap_complex", {"headdim": 32}), ("siso_trap_complex", {"headdim": 128}),
        ("siso_trap_complex", {"chunk_size": 32}), ("siso_trap_complex", {"chunk_size": 128}),
        ("siso_euler_real", {"d_state": 64}), ("siso_euler_real", {"d_state": 256}),
        ("siso_euler_real", {"headdim": 128}), ("siso_euler_real", {"chunk_size": 32}),
        ("siso_euler_real", {"chunk_size": 128}),
        ("mimo_r4", {"mimo_rank": 2, "chunk_size": 32}), ("mimo_r4", {"mimo_rank": 8, "chunk_size": 8}),
        ("mimo_r4", {"d_state": 64}), ("mimo_r4", {"headdim": 32}), ("mimo_r4", {"chunk_size": 32}),
        ("mimo_r4", {"kind": "real"}),
    ]
    for base, change in variants:
        change = dict(change)
        kind = change.pop("kind", None)
        tag = ",".join(f"{k}={v}" for k, v in change.items()) or f"kind={kind}"
        for dt in ("tf32", "bf16"):
            points.append((f"{base}[{tag}]/{dt}", spec_doc(base, compute=dt, kind=kind, **change)))
    for base in ("siso_trap_complex", "mimo_r4", "siso_euler_real"):  # fp32 inputs: other layout conversions
        for dt in DTYPES:
            points.append((f"{base}[input=fp32]/{dt}", spec_doc(base, compute=dt, input="fp32")))
        for change in ({"d_state": 64}, {"chunk_size": 32}, {"headdim": 128}):
            tag = ",".join(f"{k}={v}" for k, v in change.items())
            points.append((f"{base}[input=fp32,{tag}]/tf32", spec_doc(base, input="fp32", **change)))
    return points


# ----------------------------------------------------------------------------------------------------------------
# compiling (only in a process without the interpreter)
# ----------------------------------------------------------------------------------------------------------------
def _compile_shared(fn, spec, capability: int, block_p: int, num_warps: int, full: bool = False) -> int:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from mamba3_gen.backends.triton.aot import kernel_signature

    signature, constexprs, attrs = kernel_signature(spec, list(fn.arg_names), block_p)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", capability, 32)
    if full:
        import triton

        return int(triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": 1})
                   .metadata.shared)
    from triton._C.libtriton import ir, nvidia, passes
    from triton.backends.nvidia.compiler import get_ptx_version_from_options

    backend = make_backend(target)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": 1})
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    metadata: dict = {}
    mod = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), ctx)
    for ext in ("ttir", "ttgir"):
        mod = stages[ext](mod, metadata)
    # make_llir's passes up to and including the shared-memory allocation (Triton 3.6, nvidia backend)
    pm = ir.pass_manager(mod.context)
    passes.ttgpuir.add_combine_tensor_select_and_if(pm)
    passes.ttgpuir.add_allocate_warp_groups(pm)
    passes.convert.add_scf_to_cf(pm)
    passes.gluon.add_inliner(pm)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, capability, get_ptx_version_from_options(options,
                                                                                                     capability))
    pm.run(mod, "smem_sweep")
    return int(mod.get_int_attr("ttg.shared") or 0)


_MODULES: dict = {}


def _kernel(doc: dict):
    import importlib.util

    from mamba3_gen.backends.triton.build import KERNEL_NAME, lower, render
    from mamba3_gen.spec.model import Spec

    key = json.dumps(doc, sort_keys=True)
    if key not in _MODULES:
        # only fwd.py, rendered for the interpreter target: it never refuses a spec, and the fused kernel's source
        # does not depend on the target (only its autotune list does, which is not compiled here)
        spec = Spec.model_validate(doc)
        path = Path(tempfile.mkdtemp(prefix="smem_sweep_")) / "fwd.py"
        path.write_text(render(lower(spec, "interpreter"))["fwd.py"])
        mod_spec = importlib.util.spec_from_file_location(f"smem_sweep_fwd_{len(_MODULES)}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        _MODULES[key] = (getattr(module, KERNEL_NAME).fn, spec)
    return _MODULES[key]


def run_jobs(jobs: list[dict], full: bool = False) -> list[list[int]]:
    """In this process: for each job {"doc", "arch", "configs": [[block_p, num_warps], ...]}, the compiled `shared`
    bytes of each config."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: AOT compiles must not share a process with the interpreter")
    from mamba3_gen.backends.device import get_target

    out = []
    for job in jobs:
        fn, spec = _kernel(job["doc"])
        cap = get_target(job["arch"]).capability
        out.append([_compile_shared(fn, spec, cap, int(bp), int(nw), full) for bp, nw in job["configs"]])
    return out


def measure(jobs: list[dict], full: bool = False, timeout: float = 1800) -> list[list[int]]:
    """:func:`run_jobs` in a fresh subprocess (no TRITON_INTERPRET, a private Triton cache): safe to call from the
    test suite, whose process runs the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"] + (["--full"] if full else [])
    with tempfile.TemporaryDirectory(prefix="smem_sweep_cache_") as cache:
        env["TRITON_CACHE_DIR"] = cache
        proc = subprocess.run(cmd, input=json.dumps(jobs), capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"smem_sweep worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# rows, report
# ----------------------------------------------------------------------------------------------------------------
def candidates(doc: dict, arch: str):
    """(spec, [(KernelConfig, ...)]) the build would try on `arch` before dropping those over the limit, deduplicated
    on (block_p, num_warps)."""
    from mamba3_gen.backends.triton.resources import candidate_configs
    from mamba3_gen.spec.model import Spec

    spec = Spec.model_validate(doc)
    seen, out = set(), []
    for cfg in candidate_configs(spec, arch):
        if (cfg.block_p, cfg.num_warps) not in seen:
            seen.add((cfg.block_p, cfg.num_warps))
            out.append(cfg)
    return spec, out


def row_fields(label: str, spec, arch: str, cfg, shared: int) -> dict:
    d = spec.dims
    return {
        "point": label, "arch": arch, "compute": spec.dtypes.compute, "input": spec.dtypes.input,
        "kind": spec.state.kind, "rotation": getattr(spec.state, "rotation", "") if spec.is_complex else "",
        "rope_fraction": spec.state.rope_fraction if spec.is_complex else "", "N": d.d_state, "P": d.headdim,
        "C": d.chunk_size, "R": d.mimo_rank, "lags": spec.lags, "block_p": cfg.block_p, "num_warps": cfg.num_warps,
        "estimate": cfg.smem_estimate, "shared": shared,
        "error": round((cfg.smem_estimate - shared) / shared, 4) if shared else "",
    }


def report(rows: list[dict]) -> str:
    """Max |estimate - shared| / shared (and the signed extremes) per arch x compute dtype, as a Markdown table."""
    table: dict = {}
    for r in rows:
        e = float(r["error"])
        lo, hi, n = table.get((r["arch"], r["compute"]), (0.0, 0.0, 0))
        table[(r["arch"], r["compute"])] = (min(lo, e), max(hi, e), n + 1)
    archs = [a for a in ARCHS if any(k[0] == a for k in table)]
    lines = ["| arch | " + " | ".join(DTYPES) + " |", "|---" * (len(DTYPES) + 1) + "|"]
    for a in archs:
        cells = []
        for dt in DTYPES:
            if (a, dt) in table:
                lo, hi, n = table[(a, dt)]
                cells.append(f"{max(-lo, hi):.0%} ({lo:+.0%}..{hi:+.0%}, n={n})")
            else:
                cells.append("-")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reestimate(rows: list[dict]) -> list[dict]:
    """The rows with `estimate` and `error` recomputed by the current model (the compiled `shared` kept)."""
    cache: dict = {}
    points = dict(sweep_points())
    out = []
    for r in rows:
        key = (r["point"], r["arch"])
        if key not in cache:
            cache[key] = {(c.block_p, c.num_warps): c for c in candidates(points[r["point"]], r["arch"])[1]}
        cfg = cache[key][(int(r["block_p"]), int(r["num_warps"]))]
        shared = int(r["shared"])
        out.append({**r, "estimate": cfg.smem_estimate, "error": round((cfg.smem_estimate - shared) / shared, 4)})
    return out


def fit(rows: list[dict], tol: float = 0.15, max_phases: int = 3) -> dict:
    """Per table key of `resources._MODEL` (engine, compute, siso/mimo, real/complex, input): a small set of phases
    (bytes per element of QK, V, CC, H; see resources) whose max is within `tol` of the compiled bytes of every row
    of the group, by greedy set cover over phases of up to three tiles (each phase must not exceed any row by more
    than `tol`; a row no such phase covers gets the phase that minimises the group's max error). The starting point
    of the table in resources.py, which adds what the cover cannot express (phases that hold only below 64 chunk rows,
    the bf16 score tile at 128 rows)."""
    import itertools

    import numpy as np

    from mamba3_gen.backends.device import get_target
    from mamba3_gen.backends.triton.resources import engine

    def pow2(n):
        return 1 << max(0, (n - 1).bit_length())

    groups: dict = {}
    for r in rows:
        rr = int(r["C"]) * int(r["R"])
        key = (engine(get_target(r["arch"]).capability, rr, r["compute"]), r["compute"],
               "siso" if int(r["R"]) == 1 else "mimo", r["kind"], r["input"])
        groups.setdefault(key, []).append(r)
    coefs = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)
    phases = []
    for n in (1, 2, 3):
        for idx in itertools.combinations(range(4), n):
            for cs in itertools.product(coefs, repeat=n):
                v = [0, 0, 0, 0]
                for i, c in zip(idx, cs):
                    v[i] = c
                phases.append(v)
    phases = np.array(phases, float)
    out = {}
    for key, rs in sorted(groups.items()):
        bn2 = [max(16, pow2(int(r["N"]) // 2)) for r in rs]
        rws = [int(r["C"]) * int(r["R"]) for r in rs]
        bp = [int(r["block_p"]) for r in rs]
        T = np.array([[m * b, m * p, m * m, p * b] for m, b, p in zip(rws, bn2, bp)], float)
        y = np.array([int(r["shared"]) for r in rs], float)
        ph = phases @ T.T
        cover = (ph >= (1 - tol) * y) & (ph <= (1 + tol) * y).all(1)[:, None]
        chosen, left = [], np.ones(len(y), bool)
        while left.any() and len(chosen) < max_phases:
            gain = (cover & left).sum(1)
            if gain.max() > 0:
                i = int((gain * 1000 - (phases != 0).sum(1) * 10 - np.abs(ph / y - 1).mean(1)).argmax())
            else:
                base = ph[chosen].max(0) if chosen else np.zeros_like(y)
                i = int(((np.abs(np.maximum(ph, base) - y) / y).max(1)).argmin())
            chosen.append(i)
            est = ph[chosen].max(0)
            left = np.abs(est - y) / y > tol
        est = ph[chosen].max(0)
        err = (est - y) / y
        out[key] = ([tuple(int(c) for c in phases[i]) for i in chosen], float(err.min()), float(err.max()), len(rs))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--out", default=str(DEFAULT_CSV))
    ap.add_argument("--only", default=None, help="comma-separated substrings: sweep the points whose label has one")
    ap.add_argument("--report", nargs="?", const=str(DEFAULT_CSV), default=None,
                    help="recompute the estimates of a sweep CSV with the current model, rewrite it, print the table")
    ap.add_argument("--fit", nargs="?", const=str(DEFAULT_CSV), default=None,
                    help="print the greedy phase cover per table key of a sweep CSV (the table's starting point)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help="run the whole triton.compile (slower; same `shared`)")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(run_jobs(json.loads(sys.stdin.read()), full=args.full)))
        return 0
    if args.fit:
        with open(args.fit) as f:
            for key, (phases, lo, hi, n) in fit(list(csv.DictReader(f))).items():
                print(f"{key}: {tuple(phases)},  # {lo:+.0%}..{hi:+.0%} over {n}")
        return 0
    if args.report:
        with open(args.report) as f:
            rows = reestimate(list(csv.DictReader(f)))
        with open(args.report, "w", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            w.writeheader()
            w.writerows(rows)
        print(report(rows))
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    archs = args.archs.split(",")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        for label, doc in sweep_points():
            if args.only and not any(part in label for part in args.only.split(",")):
                continue
            for arch in archs:
                spec, cfgs = candidates(doc, arch)
                t0 = time.perf_counter()
                shared = run_jobs([{"doc": doc, "arch": arch, "configs": [[c.block_p, c.num_warps] for c in cfgs]}],
                                  full=args.full)[0]
                for cfg, s in zip(cfgs, shared):
                    row = row_fields(label, spec, arch, cfg, s)
                    rows.append(row)
                    w.writerow(row)
                f.flush()
                print(f"{label:50s} {arch:7s} " + " ".join(f"P{c.block_p}w{c.num_warps}:{s}/{c.smem_estimate}"
                                                           for c, s in zip(cfgs, shared))
                      + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
