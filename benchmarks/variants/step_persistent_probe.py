"""Probe of the decode step's launch shapes (benchmarks/NOTES.md "Session 2026-12-05 (decode)"): a stripped step
(H [P, N] fp32 scaled, a rank-R update, R readouts; no rotation, gate or MIMO projections) compiled for sm_90a
without a GPU, or timed on one:

    python benchmarks/variants/step_persistent_probe.py         # registers, spills, shared memory, async copies
    python benchmarks/variants/step_persistent_probe.py gpu OUT.json   # B256 H32 P64 N128, % of the copy ceiling

step_flat: one program per (batch row, head), as the generated step; step_persistent (rows step_tma / step_ptr):
persistent programs walking the tiles in a tl.range loop with num_stages tiles in flight (H through tensor
descriptors / pointers).
The same launch in the generated step (the patch beside this file) lost: see the notes.
"""
import json
import sys

import triton
import triton.language as tl

P_, N_ = 64, 128  # head dim, state dim


@triton.jit
def _tile_math(hs, q_ptr, k_ptr, v_ptr, mv_ptr, a_ptr, y_ptr, bh, i_p, i_n, R: tl.constexpr, N: tl.constexpr,
               P: tl.constexpr):
    v = tl.load(v_ptr + bh * P + i_p).to(tl.float32)
    a = tl.load(a_ptr + bh)
    hs = hs * tl.exp(a)
    for r in tl.static_range(R):
        k = tl.load(k_ptr + (bh * R + r) * N + i_n).to(tl.float32)
        mv = tl.load(mv_ptr + r * P + i_p)
        hs += (v * mv)[:, None] * k[None, :]
    out = tl.zeros([P], dtype=tl.float32)
    for r in tl.static_range(R):
        q = tl.load(q_ptr + (bh * R + r) * N + i_n).to(tl.float32)
        out += tl.sum(hs * q[None, :], axis=1)
    tl.store(y_ptr + bh * P + i_p, out)
    return hs


@triton.jit
def step_persistent(h_in, h_out, q_ptr, k_ptr, v_ptr, mv_ptr, a_ptr, y_ptr, num_tiles,
                    P: tl.constexpr, N: tl.constexpr, R: tl.constexpr, STAGES: tl.constexpr, TMA: tl.constexpr):
    # TMA: h_in / h_out are tensor descriptors of H as (B·H·P, N) ("step_tma"); else pointers ("step_ptr")
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    i_n = tl.arange(0, N)
    i_p = tl.arange(0, P)
    off = i_p[:, None] * N + i_n[None, :]
    for t in tl.range(pid, num_tiles, nprog, num_stages=STAGES):
        bh = t.to(tl.int64)
        if TMA:
            hs = h_in.load([t * P, 0])  # [P, N]
        else:
            hs = tl.load(h_in + bh * (P * N) + off)
        hs = _tile_math(hs, q_ptr, k_ptr, v_ptr, mv_ptr, a_ptr, y_ptr, bh, i_p, i_n, R, N, P)
        if TMA:
            h_out.store([t * P, 0], hs)
        else:
            tl.store(h_out + bh * (P * N) + off, hs)


@triton.jit
def step_flat(h_in, h_out, q_ptr, k_ptr, v_ptr, mv_ptr, a_ptr, y_ptr, num_tiles,
              P: tl.constexpr, N: tl.constexpr, R: tl.constexpr, STAGES: tl.constexpr):
    # today's shape: one program per tile, no loop
    t = tl.program_id(0)
    i_n = tl.arange(0, N)
    i_p = tl.arange(0, P)
    off = i_p[:, None] * N + i_n[None, :]
    bh = t.to(tl.int64)
    hs = tl.load(h_in + bh * (P * N) + off)
    hs = _tile_math(hs, q_ptr, k_ptr, v_ptr, mv_ptr, a_ptr, y_ptr, bh, i_p, i_n, R, N, P)
    tl.store(h_out + bh * (P * N) + off, hs)


def _label(fn, desc) -> str:
    return ("step_tma" if desc else "step_ptr") if fn is step_persistent else fn.__name__


def build(fn, desc, R, stages, warps):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mamba3_gen.backends.triton.aot import ptxas_stats
    hty = f"tensordesc<fp32[{P_},{N_}]>" if desc else "*fp32"
    sig = {"h_in": hty, "h_out": hty, "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mv_ptr": "*fp32",
           "a_ptr": "*fp32", "y_ptr": "*fp32", "num_tiles": "i32", "P": "constexpr", "N": "constexpr",
           "R": "constexpr", "STAGES": "constexpr"}
    const = {"P": P_, "N": N_, "R": R, "STAGES": stages}
    if fn is step_persistent:
        sig["TMA"] = "constexpr"
        const["TMA"] = desc
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps})
    st = ptxas_stats(c.asm["ptx"], 90)
    ttgir = c.asm["ttgir"]
    print(_label(fn, desc), "R", R, "stages", stages, "warps", warps, "regs", st["registers"], "spills",
          st["spill_stores"], "smem", c.metadata.shared, "| cp.async", ttgir.count("async_copy_global_to_local"),
          "tma", ttgir.count("async_tma_copy_global_to_local"), flush=True)


def gpu(out_json):
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor
    from mamba3_gen.bench import measure_ceilings, time_graph
    ceil = measure_ceilings()
    print("ceilings", ceil, flush=True)
    B, H = 256, 32
    T = B * H
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for R in (1, 4):
        h = torch.randn(T * P_, N_, device="cuda")
        q = torch.randn(T * R, N_, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(T * R, N_, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(T, P_, device="cuda", dtype=torch.bfloat16)
        mv = torch.randn(R, P_, device="cuda")
        a = -torch.rand(T, device="cuda")
        y = torch.empty(T, P_, device="cuda")
        nbytes = 2 * h.numel() * 4
        desc = TensorDescriptor.from_tensor(h, [P_, N_])
        cands = [("flat", step_flat, False, 1, w, T) for w in (4, 8)]
        for stages in (1, 2, 3, 4):
            for w in (4, 8):
                for per_sm in (1, 2, 4):
                    cands.append(("step_tma", step_persistent, True, stages, w, min(T, per_sm * sms)))
        for stages in (2, 3):
            for per_sm in (1, 2):
                cands.append(("step_ptr", step_persistent, False, stages, 8, min(T, per_sm * sms)))
        for name, fn, d, stages, w, grid in cands:
            hin = desc if d else h
            extra = {"TMA": d} if fn is step_persistent else {}
            try:
                fn[(grid,)](hin, hin, q, k, v, mv, a, y, T, P=P_, N=N_, R=R, STAGES=stages, num_warps=w, **extra)
                torch.cuda.synchronize()
                t = time_graph(lambda: fn[(grid,)](hin, hin, q, k, v, mv, a, y, T, P=P_, N=N_, R=R, STAGES=stages,
                                                   num_warps=w, **extra))
                row = dict(R=R, kernel=name, stages=stages, warps=w, grid=grid, us=t["ms"] * 1e3,
                           loop_us=t["loop_ms"] * 1e3)
                row["pct_copy"] = 100 * nbytes / (t["ms"] * 1e-3) / 1e9 / ceil["copy_GBps"]
            except Exception as e:
                row = dict(R=R, kernel=name, stages=stages, warps=w, grid=grid, error=str(e)[:200])
            print(json.dumps(row), flush=True)
            rows.append(row)
    json.dump({"ceilings": ceil, "rows": rows, "device": torch.cuda.get_device_name()}, open(out_json, "w"), indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["gpu"]:
        gpu(sys.argv[2])
    else:
        for R in (1, 4):
            build(step_flat, False, R, 1, 8)
            for desc in (True, False):
                for st in (2, 3):
                    for w in (4, 8):
                        try:
                            build(step_persistent, desc, R, st, w)
                        except Exception as e:
                            print(_label(step_persistent, desc), st, w, "ERR", str(e).splitlines()[-1][:300])
