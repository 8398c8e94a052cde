"""Side-by-side benchmarks of generated and official kernels: the library behind ``mamba3-gen bench`` and
``benchmarks/run_matrix.py``.

One *workload* is a spec (with optional ``SECTION.FIELD=VALUE`` overrides) at one size B, L, H in one mode:
``fwd`` (prefill forward), ``bwd`` (forward + backward) or ``decode`` (one in-place step). For each workload the
inputs are drawn once (bf16 Q/K/V/Z, fp32 everything else), every *provider* runs on those same inputs, and its
outputs are checked against the ``generated`` provider's before it is timed: a provider that disagrees is reported
as ``mismatch`` and never timed. Times are medians of ``triton.testing.do_bench`` (L2 flushed before each call) for
``fwd``/``bwd`` and of a CUDA-graph replay for ``decode`` (launch cost matters there). Each row also carries the
workload's byte and FLOP floors (:func:`workload_bytes`, :func:`workload_flops`) against the copy and bf16-GEMM
ceilings measured in the same run.

Everything that touches a GPU is injected (``timer``, the providers, the device), so the table, JSON and plot code
runs on the CPU in the tests.
"""
from __future__ import annotations

import datetime
import os
import json
import math
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = [
    "PROVIDERS", "MODES", "OUTPUT_RTOL", "GRAD_RTOL", "BenchArgError", "Workload", "Provider", "parse_sizes",
    "parse_providers", "input_shapes", "workload_bytes", "workload_flops", "build_inputs", "measure_ceilings",
    "gpu_timer", "time_graph", "resolve_providers", "run_workload", "run", "render_table", "write_json", "plot",
    "new_run",
]

PROVIDERS = ("generated", "official", "generated-cute", "official-cute")
MODES = ("fwd", "bwd", "decode")
# bf16 outputs: two kernels that each round to bf16 (unit roundoff 2^-8 = 3.9e-3) and sum in different orders agree
# to a few e-3 (measured 1.8-6.2e-3 against float64 on H100/H200); 2e-2 leaves room without passing a wrong kernel
# (a wrong rule, rotation or decay is off by O(1)).
OUTPUT_RTOL = 2e-2
# gradients go through one more bf16 product chain (dout · bf16 operands) and sum over L: twice the output error and
# more; 5e-2 still fails any real disagreement
GRAD_RTOL = 5e-2
GRAD_KEYS = ("q", "k", "v", "z")  # the gradients checked with --backward
LOW_PRECISION = ("q", "k", "v", "z")  # bf16 in the timed inputs; the rest fp32, as the official wrappers take them
DEFAULT_SIZES = {"fwd": "8:4096:32", "bwd": "8:4096:32", "decode": "1:1:32,16:1:32,256:1:32"}


class BenchArgError(ValueError):
    """A malformed command-line value (``--sizes``, ``--providers``); the message names the bad item and the fix."""


# ------------------------------------------------------------------------------------------------- arguments


def parse_sizes(text: str, mode: str = "fwd") -> list[tuple[int, int, int]]:
    """``"8:4096:32,1:16384:32"`` -> ``[(8, 4096, 32), (1, 16384, 32)]`` (B, L, H; each a whole number >= 1).

    Raises:
        BenchArgError: an empty item or one that is not three positive whole numbers joined by ``:``, naming it
        (the example given is of ``mode``'s sizes: decode sizes have L = 1).
    """
    example = "1:1:32,256:1:32" if mode == "decode" else "8:4096:32,1:16384:32"
    sizes = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if not item.strip():
            raise BenchArgError(f"--sizes: an empty item in {text!r}; try --sizes {example}")
        if len(parts) != 3 or not all(re.fullmatch(r"[0-9]+", p.strip()) for p in parts) \
                or any(int(p) < 1 for p in parts):
            raise BenchArgError(f"--sizes: {item.strip()!r} is not B:L:H (three whole numbers >= 1); "
                                f"try --sizes {example}")
        sizes.append(tuple(int(p) for p in parts))
    return sizes


def parse_providers(text: str) -> list[str]:
    """``"generated,official"`` -> ``["generated", "official"]`` (order kept, duplicates dropped).

    Raises:
        BenchArgError: an unknown name, listing the valid ones.
    """
    if any(not p.strip() for p in text.split(",")):
        raise BenchArgError(f"--providers: an empty item in {text!r}; try one or more of: {', '.join(PROVIDERS)}")
    names = [p.strip() for p in text.split(",")]
    for name in names:
        if name not in PROVIDERS:
            raise BenchArgError(f"--providers: unknown provider {name!r}; try one or more of: {', '.join(PROVIDERS)}")
    if not names:
        raise BenchArgError(f"--providers: empty; try one or more of: {', '.join(PROVIDERS)}")
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class Workload:
    """One spec at one size in one mode. ``sets`` are the ``SECTION.FIELD=VALUE`` overrides already applied to
    ``spec``; they name the workload (``label``) so that, e.g., d_state=64 is told apart from the shipped spec."""

    spec: Any  # mamba3_gen.spec.model.Spec
    B: int
    L: int
    H: int
    mode: str = "fwd"
    sets: tuple = ()

    @property
    def family(self) -> str:
        """The spec and its overrides, without the size: one plot panel."""
        extra = " ".join(s.split(".", 1)[-1] for s in self.sets)
        return f"{self.spec.name}{' ' + extra if extra else ''} {self.mode}"

    @property
    def label(self) -> str:
        size = f"B{self.B} H{self.H}" if self.mode == "decode" else f"B{self.B} L{self.L} H{self.H}"
        return f"{self.family} {size}"


# ------------------------------------------------------------------------------------------------- floors


def input_shapes(spec, B: int, L: int, H: int) -> dict[str, tuple[tuple, torch.dtype]]:
    """Shape and dtype of every tensor ``build_inputs`` gives the forward (the calling convention's keywords that
    ``spec`` uses): Q, K, V, Z in the spec's ``dtypes.input``, the rest fp32, as
    :func:`mamba3_gen.reference.make_inputs` lays them out. For ``decode`` use L = 1 (a token's inputs are the
    forward's at L = 1 without the L axis: the same bytes)."""
    d = spec.dims
    N, P, R, G = d.d_state, d.headdim, d.mimo_rank, d.ngroups
    low = torch.bfloat16 if spec.dtypes.input == "bf16" else torch.float32
    f32 = torch.float32
    qk = (B, L, G, N) if R == 1 else (B, L, R, G, N)
    bias = (H, N) if R == 1 else (H, R, N)
    shapes = {"q": (qk, low), "k": (qk, low), "v": ((B, L, H, P), low), "adt": ((B, H, L), f32),
              "dt": ((B, H, L), f32)}
    if spec.has_trap_input:
        shapes["trap"] = ((B, H, L), f32)
    shapes["q_bias"] = (bias, f32)
    shapes["k_bias"] = (bias, f32)
    if spec.is_complex:
        shapes["angles"] = ((B, L, H, spec.num_angles), f32)
    if spec.options.d_skip:
        shapes["D"] = ((H,), f32)
    if spec.options.z_gate:
        shapes["z"] = ((B, L, H, P), low)
    if R > 1:
        shapes["mimo_v"] = ((H, R, P), f32)
        if spec.options.z_gate:
            shapes["mimo_z"] = ((H, R, P), f32)
        shapes["mimo_o"] = ((H, R, P), f32)
    return shapes


def _nbytes(shape: tuple, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _state_bytes(spec, B: int, H: int) -> int:
    """Bytes of the carried state (Θ fp32; H, k̂, v in ``dtypes.state``) of B sequences, once."""
    from mamba3_gen.reference.inputs import state_shapes

    sdt = torch.bfloat16 if spec.dtypes.state == "bf16" else torch.float32
    total = 0
    for name, shape in state_shapes(spec, B, H).items():
        if shape is not None:
            total += _nbytes(shape, torch.float32 if name == "angle" else sdt)
    return total


def workload_bytes(spec, B: int, L: int, H: int, mode: str = "fwd") -> int:
    """The bytes a workload must move at least: each input read once, each output written once.

    - ``fwd``: every input of :func:`input_shapes` + the output (B, L, H, P) in the input dtype.
    - ``bwd`` (forward + backward): the forward's bytes, then the inputs read again and ``dout`` read, and one
      gradient written per floating input (the same bytes as the inputs).
    - ``decode``: one token's inputs and output, and the carried state read once and written once (in place).
    At B8 L4096 H32 P64 N128 bf16 this gives benchmarks/NOTES.md's figures (siso_euler_real 428 MB,
    siso_trap_complex 566 MB, mimo_r4 617 MB)."""
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r}; expected one of {MODES}")
    length = 1 if mode == "decode" else L
    shapes = input_shapes(spec, B, length, H)
    inputs = sum(_nbytes(s, dt) for s, dt in shapes.values())
    out = _nbytes((B, length, H, spec.dims.headdim), shapes["v"][1])
    if mode == "fwd":
        return inputs + out
    if mode == "bwd":
        return (inputs + out) + (inputs + out) + inputs  # forward; backward reads inputs + dout, writes the grads
    return inputs + out + 2 * _state_bytes(spec, B, H)


def workload_flops(spec, B: int, L: int, H: int, mode: str = "fwd") -> int:
    """The tensor-core FLOPs of the chunked algorithm (a multiply-add is 2 FLOPs).

    Per chunk of C tokens, with rows = C·R (MIMO ranks stacked as rows), per head:
    Q̂K̂ᵀ scores (rows × rows × N), the masked scores times V (rows × rows × P), the carried state's contribution
    Q̂·Hᵀ (rows × N × P) and the state update K̂ᵀV (N × rows × P): 2·rows²·N + 2·rows²·P + 4·rows·N·P, times
    B·H·⌈L/C⌉ chunks. At B8 L4096 H32 P64 N128 that is 60 GFLOP for SISO C64, 120 for R2 C32 and 241 for R4 C16
    (benchmarks/NOTES.md's first table).

    ``bwd`` counts forward + backward as 3× the forward (the backward's products are the forward's, transposed, for
    two operands each). ``decode`` (not tensor-core work: the FMA count of one step) is per head and state element
    of the B·H·P·N state: 1 decay multiply, one multiply-add per rank and lag term of the update, and one
    multiply-add per rank of the readout."""
    d = spec.dims
    N, P, R, C = d.d_state, d.headdim, d.mimo_rank, d.chunk_size
    if mode == "decode":
        return B * H * P * N * (1 + 2 * R * (spec.lags + 1) + 2 * R)
    rows = C * R
    chunks = B * H * -(-L // C)
    fwd = chunks * (2 * rows * rows * N + 2 * rows * rows * P + 4 * rows * N * P)
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return 3 * fwd
    raise ValueError(f"mode: {mode!r}; expected one of {MODES}")


# ------------------------------------------------------------------------------------------------- inputs


def mamba2_compatible(spec) -> bool:
    """Whether Mamba-2's ``mamba_chunk_scan_combined`` computes this spec: exp-Euler, real state, SISO, A·Δ given.
    Its A is one number per head, so ``build_inputs`` then draws A per head (and zero Q/K biases, which it lacks)."""
    return (spec.discretization.rule == "exp_euler" and not spec.is_complex and spec.dims.mimo_rank == 1
            and spec.inputs.decay == "a_dt")


def build_inputs(spec, B: int, L: int, H: int, mode: str = "fwd", device="cuda", seed: int = 0) -> dict:
    """The inputs every provider of a workload runs on (seeded, on ``device``).

    ``fwd``/``bwd``: the forward's keyword arguments (:func:`mamba3_gen.reference.make_inputs`): Q, K, V, Z in
    the spec's input dtype (bf16 for the shipped specs), A·Δ, Δ, trap, angles, biases, D and the MIMO projections
    in fp32, as the official wrappers and the layer hold them. For a Mamba-2-compatible spec
    (:func:`mamba2_compatible`) A is one value per head and the Q/K biases are zero, so Mamba-2 computes the same
    recurrence. ``bwd`` adds ``dout`` (B, L, H, P), the output's gradient. ``decode``: one token's inputs
    (no L axis) and ``state``, a random Mamba3State in the spec's layout and dtypes (the same start for every
    provider: each clones it)."""
    from mamba3_gen.reference import make_inputs
    from mamba3_gen.reference.inputs import token_inputs

    low = torch.bfloat16 if spec.dtypes.input == "bf16" else torch.float32
    length = 1 if mode == "decode" else L
    kw = make_inputs(spec, B, length, H, dtype=torch.float32, device=device, seed=seed,
                     with_initial_states=(mode == "decode"))
    if mamba2_compatible(spec):
        gen = torch.Generator().manual_seed(seed + 1)
        a = -(1.0 + 15.0 * torch.rand(H, generator=gen)).to(device)  # A in [-16, -1], as make_inputs draws it
        kw["adt"] = a[None, :, None] * kw["dt"]
        kw["q_bias"] = torch.zeros_like(kw["q_bias"])
        kw["k_bias"] = torch.zeros_like(kw["k_bias"])
    for key in LOW_PRECISION:
        if key in kw:
            kw[key] = kw[key].to(low)
    if mode == "decode":
        init = kw.pop("initial_states")
        kw = {k: v.contiguous() for k, v in token_inputs(kw, 0).items()}
        sdt = torch.bfloat16 if spec.dtypes.state == "bf16" else torch.float32
        from mamba3_gen.runtime.state import Mamba3State

        kw["state"] = Mamba3State(*[None if t is None else t.to(torch.float32 if i == 0 else sdt).contiguous()
                                    for i, t in enumerate(init)])
    elif mode == "bwd":
        gen = torch.Generator().manual_seed(seed + 2)
        kw["dout"] = torch.randn(B, L, H, spec.dims.headdim, generator=gen).to(device=device, dtype=low)
    return kw


# ------------------------------------------------------------------------------------------------- timing


def measure_ceilings() -> dict:
    """This GPU's copy bandwidth (bytes read + written per second of a 1 GiB device copy) and bf16 dense matmul
    rate (8192³), medians of ``triton.testing.do_bench``: ``{"copy_GBps": ..., "bf16_TFLOPs": ...}``. Needs CUDA."""
    import triton

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    del x, y, a, b
    return {"copy_GBps": 2 * (1 << 30) / ms / 1e6, "bf16_TFLOPs": 2 * 8192**3 / mm / 1e9}


def time_graph(fn: Callable[[], Any]) -> dict:
    """Cold and warm times of ``fn`` (one decode step), in ms: ``ms`` is the median replay of a CUDA graph of one
    call with the L2 flushed before each (the state comes from HBM), ``loop_ms`` the median per call of a graph of
    back-to-back calls (``do_bench_cudagraph``: launch cost amortised, a small state stays in L2)."""
    import triton

    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as graph capture wants
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    cold = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
    warm = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    return {"ms": cold, "loop_ms": warm}


def gpu_timer(fn: Callable[[], Any], mode: str) -> dict:
    """The default timer: ``{"ms": median}`` of ``triton.testing.do_bench`` (L2 flushed before each call) for
    ``fwd``/``bwd``; :func:`time_graph` for ``decode``."""
    import triton

    if mode == "decode":
        return time_graph(fn)
    return {"ms": triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")}


# ------------------------------------------------------------------------------------------------- providers


@dataclass
class Provider:
    """A kernel under test. ``make(inputs)`` does the untimed preparation (layout conversions, leaves with
    ``requires_grad``, a private copy of the decode state) and returns a no-argument callable that runs it once and
    returns its outputs: the output tensor (``fwd``, ``decode``), or for ``bwd`` a dict with ``out`` and the
    gradients of q, k, v, z."""

    name: str
    make: Callable[[dict], Callable[[], Any]]


def _generated(spec, mode: str) -> Provider:
    import mamba3_gen

    mod = mamba3_gen.load(spec)
    if mode == "fwd":
        def make(kw):
            args = {k: v for k, v in kw.items() if k != "dout"}
            return lambda: mod.mamba3_forward(**args)
        return Provider("generated", make)
    if mode == "bwd":
        return Provider("generated", lambda kw: _fwd_bwd(lambda a: mod.mamba3_forward(**a), kw))
    return Provider("generated", lambda kw: _step(mod.mamba3_step, kw, "triton"))


def _generated_cute(spec) -> Provider:
    import mamba3_gen

    mod = mamba3_gen.load(spec)
    return Provider("generated-cute", lambda kw: _step(mod.mamba3_step, kw, "cute"))


def _step(step, kw: dict, backend: str):
    from mamba3_gen.runtime.state import Mamba3State

    state = Mamba3State(*[None if t is None else t.clone() for t in kw["state"]])
    args = {k: v for k, v in kw.items() if k != "state"}
    return lambda: step(**args, state=state, inplace=True, backend=backend)[0]


def _fwd_bwd(forward: Callable[[dict], torch.Tensor], kw: dict):
    """forward + backward(dout) on leaves that require grad (made here, untimed); returns out and q/k/v/z grads."""
    dout = kw["dout"]
    leaves = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point()
                  else v) for k, v in kw.items() if k != "dout"}
    grads = [v for v in leaves.values() if isinstance(v, torch.Tensor) and v.requires_grad]

    def run():
        for t in grads:
            t.grad = None
        out = forward(leaves)
        out.backward(dout)
        return {"out": out.detach(), **{k: leaves[k].grad for k in GRAD_KEYS if k in leaves}}
    return run


def _official_module():
    """benchmarks/official.py of the checkout (the official kernels live in its git-ignored .official/), or None."""
    from mamba3_gen.paths import REPO_ROOT

    if not (REPO_ROOT / "benchmarks" / "official.py").is_file():
        return None
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import importlib

    return importlib.import_module("benchmarks.official")


def resolve_providers(spec, mode: str, names: Sequence[str]) -> tuple[list[Provider], dict[str, str]]:
    """The providers of ``names`` that apply to ``spec`` in ``mode`` and load here, and for each other one the
    reason it is skipped (``{name: reason}``). ``generated`` is loaded first when asked for (it is the reference
    of the output check)."""
    providers, skipped = [], {}
    official = None
    for name in sorted(names, key=lambda n: n != "generated"):
        try:
            if name == "generated":
                providers.append(_generated(spec, mode))
            elif name == "generated-cute":
                if mode != "decode":
                    skipped[name] = "decode only (the CuTe DSL backend generates the decode step)"
                    continue
                providers.append(_generated_cute(spec))
            else:
                official = official or _official_module()
                if official is None:
                    skipped[name] = "the official providers need the repository checkout (benchmarks/official.py)"
                    continue
                found = official.provider(spec, mode, cute=(name == "official-cute"))
                if isinstance(found, str):
                    skipped[name] = found
                else:
                    providers.append(Provider(name, found))
        except Exception as e:  # noqa: BLE001 - a provider that cannot load is reported, the others still run
            skipped[name] = f"cannot load: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return providers, skipped


# ------------------------------------------------------------------------------------------------- running


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    if a.shape != ref.shape:
        return math.inf
    den = ref.norm().item()
    num = (a - ref).norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def compare(got: Any, ref: Any) -> tuple[bool, float, str]:
    """(agrees, worst relative error, what it was measured on) of a provider's outputs against the reference's:
    ‖got − ref‖ / ‖ref‖ of the output (tolerance :data:`OUTPUT_RTOL`) and, for ``bwd``, of each gradient of q, k,
    v, z (:data:`GRAD_RTOL`). A NaN, a shape mismatch or a missing gradient disagrees."""
    if isinstance(ref, dict):
        worst, where, ok = 0.0, "out", True
        for key, r in ref.items():
            g = got.get(key) if isinstance(got, dict) else None
            if r is None:
                continue
            err = math.inf if g is None else _rel_err(g, r)
            tol = OUTPUT_RTOL if key == "out" else GRAD_RTOL
            if not err <= tol:
                ok = False
            if not err <= worst:
                worst, where = err, ("out" if key == "out" else f"d{key}")
        return ok, worst, where
    err = _rel_err(got, ref)
    return err <= OUTPUT_RTOL, err, "out"


# the run-time choices of the generated forward (README, environment variables): a run records those that are set
RUN_ENV = ("MAMBA3_GEN_FORWARD", "MAMBA3_GEN_ROTATE", "MAMBA3_GEN_CHUNK_STATES", "MAMBA3_GEN_AUTOTUNE",
           "MAMBA3_GEN_BWD", "MAMBA3_GEN_BWD_CHUNKS", "MAMBA3_GEN_SAVE_STATES", "MAMBA3_GEN_PREP_SEGMENTS")


def new_run() -> dict:
    """A run id shared by every row of one run: a uuid and the UTC start time, and the environment variables of
    ``RUN_ENV`` that are set (what the generated kernels' ``auto`` choices were overridden with)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    env = {k: os.environ[k] for k in RUN_ENV if os.environ.get(k)}
    return {"id": f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}", "started": now.isoformat(), "env": env}


def run_workload(work: Workload, providers: Sequence[Provider], inputs: dict, *, timer: Callable = gpu_timer,
                 ceilings: Optional[dict] = None, run_id: str = "", device: str = "",
                 skipped: Optional[dict] = None, log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """One row per provider (and per skipped provider) of one workload.

    Each provider's callable is made from ``inputs`` and run once (under ``torch.no_grad()`` except in ``bwd``:
    an inference forward saves nothing for a backward); its outputs are compared (:func:`compare`) with
    those of the first provider (``generated``). A provider that fails there gets ``check: "error"``, one that
    disagrees ``check: "mismatch"``; neither is timed (``ms`` None). The others are timed with ``timer(fn, mode)``
    (a dict with ``ms``, optionally ``loop_ms``). With no reference (the first provider failed) the rest are timed
    and marked ``"unchecked"``. Row keys: workload, provider, ms, gbps, tflops, pct_copy, pct_gemm, check, rel_err,
    error, device, run, and spec, sets, mode, B, L, H, bytes, flops, first_s (seconds of the first call, compile
    and autotune included)."""
    nbytes = workload_bytes(work.spec, work.B, work.L, work.H, work.mode)
    flops = workload_flops(work.spec, work.B, work.L, work.H, work.mode)
    base = {"workload": work.label, "family": work.family, "spec": work.spec.name, "sets": list(work.sets),
            "mode": work.mode, "B": work.B, "L": work.L, "H": work.H, "bytes": nbytes, "flops": flops,
            "device": device, "run": run_id}
    rows = []
    reference = None
    for index, prov in enumerate(providers):
        row = {**base, "provider": prov.name, "ms": None, "gbps": None, "tflops": None, "pct_copy": None,
               "pct_gemm": None, "check": None, "rel_err": None, "error": None}
        rows.append(row)
        grad = torch.enable_grad() if work.mode == "bwd" else torch.no_grad()  # inference runs save nothing
        try:
            start = time.perf_counter()
            with grad:
                fn = prov.make(inputs)
                got = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            row["first_s"] = time.perf_counter() - start  # compile + autotune on a fresh process (issue 11: <= 30 s)
        except Exception as e:  # noqa: BLE001 - reported in the row, the other providers go on
            row["check"], row["error"] = "error", f"{type(e).__name__}: {e}"[:300]
            log(f"{work.label} {prov.name}: error {row['error']}")
            continue
        if index == 0:
            reference, row["check"] = got, "reference"
        elif reference is None:
            row["check"] = "unchecked"
        else:
            ok, err, where = compare(got, reference)
            row["rel_err"] = err
            if not ok:
                row["check"] = "mismatch"
                row["error"] = f"{where} differs from {providers[0].name}'s by {err:.3g} (relative)"
                log(f"{work.label} {prov.name}: mismatch, {row['error']}; not timed")
                continue
            row["check"] = "ok"
        del got
        try:
            with (torch.enable_grad() if work.mode == "bwd" else torch.no_grad()):
                row.update(timer(fn, work.mode))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"timing: {type(e).__name__}: {e}"[:300]
            continue
        ms = row["ms"]
        row["gbps"] = nbytes / ms / 1e6
        row["tflops"] = flops / ms / 1e9
        if ceilings:
            row["pct_copy"] = 100 * row["gbps"] / ceilings["copy_GBps"]
            row["pct_gemm"] = 100 * row["tflops"] / ceilings["bf16_TFLOPs"]
        log(f"{work.label} {prov.name}: {ms:.4f} ms ({row['check']})")
    for name, reason in (skipped or {}).items():
        rows.append({**base, "provider": name, "ms": None, "gbps": None, "tflops": None, "pct_copy": None,
                     "pct_gemm": None, "check": "skipped", "rel_err": None, "error": reason})
    return rows


@dataclass
class Result:
    """What :func:`run` measured: the rows, the run's id and start, the device and its ceilings."""

    rows: list
    run: dict
    device: str
    ceilings: Optional[dict]
    files: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"runs": {self.run["id"]: {"device": self.device, "started": self.run["started"],
                                          "ceilings": self.ceilings, "env": self.run.get("env", {})}},
                "rows": self.rows}


def run(workloads: Sequence[Workload], provider_names: Sequence[str], *, timer: Callable = gpu_timer,
        ceilings: Optional[dict] = None, device: Optional[str] = None, inputs_device="cuda",
        provider_factory: Callable = resolve_providers, log: Callable[[str], None] = print,
        run_info: Optional[dict] = None) -> Result:
    """Run every workload with every applicable provider (:func:`run_workload`), skipped ones listed with their
    reason. ``ceilings`` defaults to :func:`measure_ceilings` when ``timer`` is the GPU timer; ``device`` to the GPU's
    name. ``provider_factory(spec, mode, names)`` returns (providers, {skipped name: reason}) and is injectable, as
    is ``timer``, so that the whole path runs on the CPU in tests. ``run_info`` (:func:`new_run`) continues an
    earlier run: its id goes on these rows too."""
    if ceilings is None and timer is gpu_timer:
        ceilings = measure_ceilings()
        log(f"ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 GEMM {ceilings['bf16_TFLOPs']:.0f} TFLOP/s")
    if device is None:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    info = run_info or new_run()
    rows: list[dict] = []
    for work in workloads:
        providers, skipped = provider_factory(work.spec, work.mode, provider_names)
        for name, reason in skipped.items():
            log(f"{work.label}: {name} skipped: {reason}")
        inputs = build_inputs(work.spec, work.B, work.L, work.H, work.mode, device=inputs_device)
        rows += run_workload(work, providers, inputs, timer=timer, ceilings=ceilings, run_id=info["id"],
                             device=device, skipped=skipped, log=log)
        del inputs
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return Result(rows, info, device, ceilings)


# ------------------------------------------------------------------------------------------------- reporting


def _ratios(rows: list[dict]) -> dict[tuple, str]:
    """'official 0.25×' per row: the other provider's ms over this one's, for each timed other provider of the same
    workload (above 1: this one is faster)."""
    out = {}
    for r in rows:
        if r["ms"] is None:
            continue
        parts = [f"{o['provider']} {o['ms'] / r['ms']:.2f}×" for o in rows
                 if o is not r and o["workload"] == r["workload"] and o["ms"] is not None and o["run"] == r["run"]]
        out[id(r)] = ", ".join(parts)
    return out


def render_table(result_rows: list[dict], ceilings: Optional[dict], device: str = ""):
    """One rich Table of the rows: workload, provider, ms, GB/s, TFLOP/s, % of the copy and GEMM ceilings, the
    check, and the time ratio to every other provider of the workload."""
    from rich.table import Table

    title = device
    if ceilings:
        title += f" — copy {ceilings['copy_GBps']:.0f} GB/s, bf16 GEMM {ceilings['bf16_TFLOPs']:.0f} TFLOP/s"
    table = Table(title=title or None)
    for col in ("workload", "provider", "ms", "GB/s", "TFLOP/s", "% copy", "% GEMM", "check", "others' ms / this"):
        table.add_column(col, justify="right" if col not in ("workload", "provider", "check",
                                                             "others' ms / this") else "left")
    ratios = _ratios(result_rows)

    def num(x, fmt):
        return "" if x is None else format(x, fmt)
    for r in result_rows:
        check = r["check"] or ""
        if r["check"] in ("mismatch", "error", "skipped") and r.get("error"):
            check = f"{r['check']}: {r['error']}"
        elif r.get("rel_err") is not None:
            check = f"{check} ({r['rel_err']:.1e})"
        table.add_row(r["workload"], r["provider"], num(r["ms"], ".4f"), num(r["gbps"], ".0f"),
                      num(r["tflops"], ".1f"), num(r["pct_copy"], ".1f"), num(r["pct_gemm"], ".1f"), check,
                      ratios.get(id(r), ""))
    return table


def write_json(path: Path, result: Result) -> Path:
    """Write ``result`` as ``{"runs": {id: {device, started, ceilings}}, "rows": [...]}`` (indent 1)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=1) + "\n", encoding="utf-8")
    return path


def plot(rows: list[dict], path: Path) -> Optional[Path]:
    """A PNG of time against L (against B for decode), one line per provider, one panel per spec family
    (spec, overrides, mode). Returns the path, or None with a one-line message when matplotlib is missing
    (``pip install -e ".[bench]"``) or nothing was timed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install -e \".[bench]\")", file=sys.stderr)
        return None
    timed = [r for r in rows if r.get("ms") is not None]
    if not timed:
        print("plot skipped: no provider was timed", file=sys.stderr)
        return None
    families = list(dict.fromkeys(r["family"] for r in timed))
    cols = min(3, len(families))
    nrows = -(-len(families) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, fam in zip(axes.flat, families):
        part = [r for r in timed if r["family"] == fam]
        decode = part[0]["mode"] == "decode"
        xkey = "B" if decode else "L"
        several_b = not decode and len({r["B"] for r in part}) > 1
        lines: dict[str, list] = {}
        for r in part:
            key = r["provider"] + (f" B{r['B']}" if several_b else "")
            lines.setdefault(key, []).append((r[xkey], r["ms"]))
        for key, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xkey)
        ax.set_ylabel("ms (median)")
        ax.set_title(fam, fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(families):]:
        ax.set_visible(False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
