"""Issue 11's benchmark matrix in one go, on one GPU: generated kernels beside the official ones, identical inputs,
outputs checked before timing (mamba3_gen/bench.py does the work; this file only lists the workloads).

    python benchmarks/run_matrix.py [--out DIR] [--only fwd|bwd|decode] [--specs NAME,...] [--match REGEX] [--name NAME]
    python benchmarks/run_matrix.py --merge A.json B.json ... [--latest] [--out DIR] [--name NAME]   # no GPU: join runs

Heads H = 32 and P = 64 everywhere. Writes DIR/NAME.json (default: $OUT when set, else benchmarks/results; NAME
h200) and DIR/NAME.png (needs matplotlib), and prints the table. `--merge` joins the rows of earlier runs (say one
per --only, each within a device call's time limit) into one file, each row keeping its run id; then
`python benchmarks/render_results.py` regenerates the README's results section from benchmarks/results/h200.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mamba3_gen import bench  # noqa: E402
from mamba3_gen.spec.sources import spec_with_overrides  # noqa: E402

SPECS = ROOT / "specs"
H = 32
BIG, LONG = (8, 4096, H), (1, 16384, H)
N64 = ("dims.d_state=64",)
BF16 = ("dtypes.compute=bf16",)  # bf16 tensor-core operands (the shipped specs say tf32): a user's speed option
PREFILL = ("generated", "official")
DECODE = ("generated", "generated-cute", "official", "official-cute")

# (mode, spec file, overrides, sizes, providers), in the order of the tables
MATRIX = [
    ("fwd", "siso_trap_complex", (), (BIG, LONG), PREFILL),       # vs Triton mamba3_siso_combined
    ("fwd", "siso_trap_complex", N64, (BIG,), PREFILL),
    ("fwd", "siso_euler_real", (), (BIG, LONG), PREFILL),         # vs Mamba-2 mamba_chunk_scan_combined
    ("fwd", "siso_euler_real", N64, (BIG,), PREFILL),
    ("fwd", "mimo_r4", (), (BIG,), PREFILL),                      # vs TileLang mamba3_mimo
    ("fwd", "mimo_r4", N64, (BIG,), PREFILL),
    ("fwd", "two_lag_complex", (), (BIG,), PREFILL),              # a formula rule: within 1.15x of the trapezoid
    ("fwd", "siso_trap_complex", BF16, (BIG, LONG), PREFILL),
    ("fwd", "siso_trap_complex", N64 + BF16, (BIG,), PREFILL),
    ("fwd", "two_lag_complex", BF16, (BIG,), PREFILL),
    ("fwd", "siso_euler_real", BF16, (BIG,), PREFILL),
    ("fwd", "mimo_r4", BF16, (BIG,), PREFILL),
    ("fwd", "mimo_r4", N64 + BF16, (BIG,), PREFILL),
    ("decode", "siso_trap_complex", (), ((1, 1, H), (256, 1, H)), DECODE),   # R = 1
    ("decode", "mimo_r4", (), ((1, 1, H), (256, 1, H)), DECODE),             # R = 4
    # issue 12: fwd+bwd vs the official SISO (its autotune keys leave out B and L: LONG re-uses BIG's tuning, N64
    # tunes again for minutes, so it runs last) and TileLang MIMO
    ("bwd", "siso_trap_complex", (), (BIG, LONG), PREFILL),
    ("bwd", "mimo_r4", (), (BIG,), PREFILL),
    ("bwd", "siso_trap_complex", BF16, (BIG, LONG), PREFILL),
    ("bwd", "siso_trap_complex", N64, (BIG,), PREFILL),
]


def workloads(only: str | None = None, specs: list[str] | None = None,
              match: str | None = None) -> list[tuple[bench.Workload, tuple]]:
    """(workload, provider names) of the matrix, or of one mode of it, or of some of its spec files, or those whose
    label (e.g. ``siso_trap_complex compute=bf16 bwd B8 L4096 H32``) the regular expression ``match`` finds."""
    out = []
    for mode, name, sets, sizes, providers in MATRIX:
        if (only and mode != only) or (specs and name not in specs):
            continue
        spec = spec_with_overrides(SPECS / f"{name}.yaml", sets)
        for B, L, h in sizes:
            work = bench.Workload(spec, B, L, h, mode, sets)
            if match is None or re.search(match, work.label):
                out.append((work, providers))
    return out


def merge(paths: list[Path], latest: bool = False) -> dict:
    """The rows and runs of several result files in one document (rows in file order). With ``latest``, a
    (workload, provider) row of a later file replaces the earlier ones (re-measuring part of the matrix), and runs
    left without rows are dropped."""
    doc = {"runs": {}, "rows": []}
    for path in paths:
        part = json.loads(Path(path).read_text(encoding="utf-8"))
        if latest:
            fresh = {(r["workload"], r["provider"]) for r in part["rows"]}
            doc["rows"] = [r for r in doc["rows"] if (r["workload"], r["provider"]) not in fresh]
        doc["runs"].update(part["runs"])
        doc["rows"] += part["rows"]
    if latest:
        used = {r["run"] for r in doc["rows"]}
        doc["runs"] = {k: v for k, v in doc["runs"].items() if k in used}
    return doc


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression ({e}): {text!r}") from None
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    ap.add_argument("--only", choices=bench.MODES, help="run one mode of the matrix")
    ap.add_argument("--name", default="h200", help="base name of the JSON and PNG files")
    ap.add_argument("--specs", type=lambda t: t.split(","), metavar="NAME,...",
                    help="only these spec files of the matrix (e.g. siso_trap_complex,mimo_r4), to split a run")
    ap.add_argument("--match", metavar="REGEX", type=_regex, help="only the workloads whose label this regular "
                    "expression finds, e.g. 'compute=bf16 bwd|d_state=64 bwd' (labels as in the printed table)")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON", help="join these result files instead of "
                    "running anything")
    ap.add_argument("--latest", action="store_true", help="with --merge: a later file's (workload, provider) row "
                    "replaces the earlier ones (a re-measured part of the matrix); runs left without rows are dropped")
    args = ap.parse_args(argv)
    from rich.console import Console

    console = Console(width=200)
    if args.merge:
        doc = merge(args.merge, latest=args.latest)
        path = args.out / f"{args.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path} ({len(doc['rows'])} rows from {len(doc['runs'])} runs)")
        bench.plot(doc["rows"], args.out / f"{args.name}.png")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("run_matrix.py needs a CUDA GPU (none is visible); --merge works without one", file=sys.stderr)
        return 1
    ceilings = bench.measure_ceilings()
    info = bench.new_run()  # one run id for the whole matrix
    rows = []
    chosen = workloads(args.only, args.specs, args.match)
    if not chosen:
        print(f"no workload of the matrix matches --only {args.only} --specs {args.specs} --match {args.match}",
              file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    for work, providers in chosen:
        rows += bench.run([work], providers, ceilings=ceilings, run_info=info,
                          log=lambda s: print(s, flush=True)).rows
        # written after every workload: a run cut off by a time limit keeps what it measured
        path = bench.write_json(args.out / f"{args.name}.json", bench.Result(rows, info, device, ceilings))
    result = bench.Result(rows, info, device, ceilings)
    console.print(bench.render_table(rows, ceilings, result.device))
    print(f"wrote {path}")
    png = bench.plot(rows, args.out / f"{args.name}.png")
    if png:
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
