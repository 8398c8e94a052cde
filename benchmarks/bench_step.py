"""Time a spec's generated decode step on a GPU: both backends, against the HBM copy ceiling measured in the same run.

    python -m benchmarks.bench_step specs/siso_trap_complex.yaml specs/mimo_r4.yaml --batch 1 16 256 --heads 32

The step is memory-bound: the figure that matters is the bytes of state it reads and writes (H, k̂, v, Θ, each once
in and once out) per second, against the device's copy bandwidth (bytes read + written per second of a 1 GiB
device-to-device copy). Each step is captured in a CUDA graph (one in-place step, inputs fixed) and its replay is
timed with triton.testing.do_bench (median; do_bench flushes the L2 cache before every replay, so the state comes
from HBM each time: the cold, conservative figure). `loop_us` is the warm figure: do_bench_cudagraph over a graph of
back-to-back steps (at B=1 the 2 MB state then stays in L2).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mamba3_gen  # noqa: E402
from mamba3_gen.bench import measure_ceilings, time_graph as _time_graph_ms  # noqa: E402
from mamba3_gen.reference import make_inputs  # noqa: E402
from mamba3_gen.reference.inputs import token_inputs  # noqa: E402
from mamba3_gen.runtime.state import state_layout  # noqa: E402
from mamba3_gen.spec.loader import load_spec  # noqa: E402

FP32_INPUTS = ("adt", "dt", "trap", "angles", "q_bias", "k_bias", "D", "mimo_v", "mimo_z", "mimo_o")


def step_inputs(spec, B: int, H: int, dtype=torch.bfloat16, seed: int = 0) -> dict:
    """One token's inputs on the GPU: Q, K, V, Z in `dtype`; A·Δ, Δ, trap, angles and the layer's parameters
    (biases, D, MIMO projections) in fp32, as the layer keeps them and the official kernels take them."""
    kw = token_inputs(make_inputs(spec, B, 1, H, dtype=dtype, device="cuda", seed=seed), 0)
    return {key: (val.float() if key in FP32_INPUTS else val).contiguous() for key, val in kw.items()}


def state_bytes(meta: dict, B: int, H: int) -> int:
    """Bytes of state one step reads and writes (every carried field once each way)."""
    total = 0
    for layout in state_layout(meta, B, H).values():
        if layout is not None:
            shape, dtype = layout
            n = 1
            for s in shape:
                n *= s
            total += 2 * n * torch.empty((), dtype=dtype).element_size()
    return total


def io_bytes(inputs: dict, out_elems: int, out_dtype) -> int:
    """Bytes of the token's inputs read once and its output written once (small next to the state)."""
    nbytes = sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))
    return nbytes + out_elems * torch.empty((), dtype=out_dtype).element_size()


def time_graph(fn) -> dict:
    """Cold (L2 flushed, one step per replay) and warm (back-to-back steps in one graph) times of `fn`, in µs
    (mamba3_gen.bench.time_graph, in ms there)."""
    t = _time_graph_ms(fn)
    return {"us": t["ms"] * 1e3, "loop_us": t["loop_ms"] * 1e3}


def bench_spec(spec_path, batches=(1, 16, 256), H=32, dtype=torch.bfloat16, backends=("triton", "cute"),
               ceilings=None, official_step=None, sweep=None) -> list[dict]:
    spec = load_spec(str(spec_path))
    mod = mamba3_gen.load(spec_path)
    step = mod.mamba3_step
    rows = []
    for B in batches:
        inputs = step_inputs(spec, B, H, dtype)
        sb = state_bytes(step.meta, B, H)
        ib = io_bytes(inputs, B * H * spec.dims.headdim, dtype)
        candidates = []
        for backend in backends:
            state = step.zero_state(B, H, "cuda")
            candidates.append((backend, lambda state=state, backend=backend: step(
                **inputs, state=state, inplace=True, backend=backend)))
        if official_step is not None and spec.dims.mimo_rank == 1:
            candidates.append(("official triton", official_step(inputs, step.zero_state(B, H, "cuda"))))
        for block_p, num_warps, maxnreg, flags, inplace in sweep or ():  # other Triton launch shapes and modes
            def shaped(block_p=block_p, num_warps=num_warps, maxnreg=maxnreg, flags=flags, inplace=inplace,
                       state=step.zero_state(B, H, "cuda")):
                knobs = ("block_p", "num_warps", "maxnreg", "head_major", "stream")
                saved = [getattr(step, k) for k in knobs]
                for k, val in zip(knobs, (block_p, num_warps, maxnreg, "h" in flags, "s" in flags)):
                    setattr(step, k, val)
                try:
                    step(**inputs, state=state, inplace=inplace)
                finally:
                    for k, val in zip(knobs, saved):
                        setattr(step, k, val)
            mode = (f" r{maxnreg}" if maxnreg else "") + (" head-major" if "h" in flags else "") \
                + (" streaming" if "s" in flags else "") + ("" if inplace else " out-of-place")
            candidates.append((f"triton bp{block_p} w{num_warps}{mode}", shaped))
        for name, fn in candidates:
            row = {"spec": spec.name, "R": spec.dims.mimo_rank, "B": B, "H": H, "backend": name,
                   "state_bytes": sb, "io_bytes": ib}
            try:
                row.update(time_graph(fn))
            except Exception as e:  # a backend that cannot run here is reported, not fatal
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            row["state_GBps"] = sb / row["us"] / 1e3
            row["total_GBps"] = (sb + ib) / row["us"] / 1e3
            if ceilings:
                row["pct_of_copy"] = 100 * row["state_GBps"] / ceilings["copy_GBps"]
                row["pct_of_copy_total"] = 100 * row["total_GBps"] / ceilings["copy_GBps"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], ceilings: dict) -> str:
    lines = [f"copy ceiling {ceilings['copy_GBps']:.0f} GB/s (1 GiB device copy, read + write, same run)", "",
             "| spec | R | B | backend | µs (cold, graph replay) | µs (warm loop) | state GB/s | % of copy | "
             "% incl. inputs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['spec']} | {r['R']} | {r['B']} | {r['backend']} | error: {r['error'][:80]} | | | | |")
            continue
        lines.append(f"| {r['spec']} | {r['R']} | {r['B']} | {r['backend']} | {r['us']:.2f} | {r['loop_us']:.2f} | "
                     f"{r['state_GBps']:.0f} | {r.get('pct_of_copy', 0):.1f} | {r.get('pct_of_copy_total', 0):.1f} |")
    return "\n".join(lines)


def _shape(text: str) -> tuple:
    """'64x8' (rows x warps), '64x8r80' (at most 80 registers a thread), '64x8o' (out of place); after the
    shape, 'h' launches the grid head-major and 's' streams H past the caches, e.g. '64x8hs'."""
    inplace = not text.endswith("o")
    text = text.rstrip("o")
    flags = ""
    while text[-1] in "hs":
        flags += text[-1]
        text = text[:-1]
    maxnreg = None
    if "r" in text:
        text, maxnreg = text.split("r")
        maxnreg = int(maxnreg)
    block_p, num_warps = map(int, text.split("x"))
    return block_p, num_warps, maxnreg, flags, inplace


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--backends", nargs="+", default=["triton", "cute"])
    ap.add_argument("--official", action="store_true", help="also time the official Triton SISO step "
                    "(from the ignored .official/ folder; see benchmarks/official.py)")
    ap.add_argument("--json", type=Path, help="write the rows and ceilings here")
    ap.add_argument("--sweep", nargs="*", default=[], metavar="BLOCK_PxWARPS[rN][h][s][o]",
                    help="also time the Triton step with these launch shapes, e.g. 32x4 64x16; 'rN' caps registers "
                    "at N a thread (e.g. 64x8r80); then 'h' (head-major grid), 's' (streaming H loads/stores); a "
                    "trailing 'o' times it out of place, e.g. 64x8o")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_step needs a CUDA GPU")
    ceilings = measure_ceilings()
    official_step = None
    if args.official:
        from benchmarks.official import load_siso_step, siso_step_fn

        fn = load_siso_step()
        official_step = (lambda inputs, state: siso_step_fn(fn, inputs, state)) if fn else None
    rows = []
    for path in args.specs:
        rows += bench_spec(path, args.batch, args.heads, backends=args.backends, ceilings=ceilings,
                           official_step=official_step, sweep=[_shape(s) for s in args.sweep])
    print(markdown(rows, ceilings))
    if args.json:
        args.json.write_text(json.dumps({"ceilings": ceilings, "rows": rows,
                                         "device": torch.cuda.get_device_name()}, indent=1))


if __name__ == "__main__":
    main()
