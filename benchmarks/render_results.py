"""Regenerate the README's `## Results on H200` section from benchmarks/results/h200.json (benchmarks/run_matrix.py's
output): the text between `<!-- bench:begin -->` and `<!-- bench:end -->` is replaced, nothing else.

    python benchmarks/render_results.py [--json benchmarks/results/h200.json] [--readme README.md] [--check]

`--check` writes nothing and exits 1 when the README's section differs from what the JSON gives (the tests run the
same comparison). Without the JSON the section says that no committed H200 run exists yet, and how to make one.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "h200.json"
README = ROOT / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
COMMAND = ("python benchmarks/run_matrix.py --out benchmarks/results --name h200  # on an H200, with .official/ "
           "(the official kernels) in the checkout")
PAIRS = (("generated", "official"), ("generated-cute", "official-cute"))  # ours -> the official counterpart


def _cell(row: dict | None) -> str:
    if row is None:
        return "—"
    if row.get("ms") is not None:
        return f"{row['ms']:.4g}"  # four digits: decode steps are microseconds
    return row.get("check") or "—"  # mismatch, error, skipped


def render(doc: dict | None) -> str:
    """The Markdown between the markers (without them) for a results document (``{"runs", "rows"}``), or the
    no-run-yet text for None."""
    if doc is None:
        return ("No committed H200 run exists yet. Make one on an H200 with the official kernels in `.official/` "
                "(see `benchmarks/official.py`):\n\n```\n" + COMMAND + "\n```\n\nthen "
                "`python benchmarks/render_results.py` rewrites this section from `benchmarks/results/h200.json`.")
    lines = ["From `benchmarks/results/h200.json` (`python benchmarks/run_matrix.py`, one device call per part of the "
             "matrix joined with its `--merge`; regenerate this section with `python benchmarks/render_results.py`; "
             "plot: `benchmarks/results/h200.png`). bf16 Q/K/V/Z, H32 P64, N = 128 unless the workload names "
             "another d_state; each provider's outputs are checked against ours on the same inputs before it is "
             "timed. Median ms (do_bench, L2 flushed; decode: CUDA-graph replay of one in-place step). The last "
             "columns compare ours with the official kernel that computes the same layer (the Triton SISO kernel, "
             "Mamba-2's SSD for exp-Euler real specs, TileLang for MIMO, the Triton step; a (CuTe) row: our CuTe "
             "step with the official CuTe step): official/ours above 1 means ours is faster. % of copy ceiling: "
             "each input read once and each output written once, over the run's measured copy bandwidth.", ""]
    runs = sorted(doc["runs"].items(), key=lambda kv: kv[1].get("started") or kv[0])
    number = {run_id: i + 1 for i, (run_id, _) in enumerate(runs)}
    for run_id, info in runs:
        c = info.get("ceilings") or {}
        ceil = (f": copy {c['copy_GBps']:.0f} GB/s, bf16 GEMM {c['bf16_TFLOPs']:.0f} TFLOP/s (measured in the run)"
                if c else "")
        lines.append(f"{number[run_id]}. run `{run_id}` on {info.get('device', '?')}{ceil}")
    lines += ["", "| workload | run | ours ms | official ms | official/ours | % of copy ceiling (ours) |",
              "|---|---|---|---|---|---|"]
    by_key = {(r["run"], r["workload"], r["provider"]): r for r in doc["rows"]}
    seen = set()
    for r in doc["rows"]:
        for ours, theirs in PAIRS:
            if r["provider"] != ours or (r["run"], r["workload"], ours) in seen:
                continue
            seen.add((r["run"], r["workload"], ours))
            other = by_key.get((r["run"], r["workload"], theirs))
            ratio = (f"{other['ms'] / r['ms']:.2f}" if other and other.get("ms") and r.get("ms") else "—")
            pct = f"{r['pct_copy']:.1f}" if r.get("pct_copy") is not None else "—"
            label = r["workload"] + (" (CuTe)" if ours.endswith("cute") else "")
            lines.append(f"| {label} | {number.get(r['run'], '?')} | {_cell(r)} | {_cell(other)} | {ratio} | {pct} |")
    return "\n".join(lines)


def load(path: Path = RESULTS) -> dict | None:
    """The results document, or None when the file does not exist."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def current_section(readme_text: str) -> str:
    """The README's text between the markers, stripped.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    start, end = readme_text.find(BEGIN), readme_text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README: the markers {BEGIN} ... {END} are missing; add them under '## Results on H200'")
    return readme_text[start + len(BEGIN):end].strip()


def replace_section(readme_text: str, body: str) -> str:
    """``readme_text`` with the text between the markers replaced by ``body``."""
    current_section(readme_text)  # the markers are there
    start, end = readme_text.find(BEGIN) + len(BEGIN), readme_text.find(END)
    return readme_text[:start] + "\n" + body + "\n" + readme_text[end:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--check", action="store_true", help="exit 1 if the section is stale; write nothing")
    args = ap.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    body = render(load(args.json))
    if args.check:
        stale = current_section(text) != body.strip()
        print(f"{args.readme}: results section {'is stale' if stale else 'is up to date'}")
        return 1 if stale else 0
    args.readme.write_text(replace_section(text, body), encoding="utf-8")
    print(f"rewrote the results section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
