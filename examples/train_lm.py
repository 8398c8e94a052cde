"""Train a small language model of Mamba3 layers built from any spec, on synthetic data (issue 12).

The model: token embedding, ``--layers`` blocks of [RMSNorm → Mamba3 → residual, RMSNorm → MLP → residual], a final
RMSNorm and a linear head. The data: seeded random sequences of one of two tasks whose loss can only fall if the
layer carries information along the sequence (each position sees its own token otherwise):

- ``prev``: predict the previous token (the loss starts at ln(vocab) and falls towards 0);
- ``repeat``: a random pattern of 2..``--max-period`` tokens repeated; predict the next token (predictable after
  the first period).

Usage (GPU; bf16 autocast by default)::

    python examples/train_lm.py --spec specs/mimo_r4.yaml --steps 200
    torchrun --nproc_per_node 2 examples/train_lm.py --spec specs/mimo_r4.yaml --steps 200 --ddp --check-grads

CPU smoke run (Triton interpreter, fp32, tiny shapes; the spec's dtypes are set to fp32)::

    TRITON_INTERPRET=1 python examples/train_lm.py --spec specs/siso_euler_real.yaml --device cpu --tiny --steps 5
    TRITON_INTERPRET=1 torchrun --nproc_per_node 2 examples/train_lm.py --spec specs/siso_euler_real.yaml \\
        --device cpu --tiny --steps 2 --ddp --check-grads

Output: one line per ``--log-every`` steps (step, loss averaged over ranks, tokens/s), then one summary line
``summary: spec=... first_loss=... last_loss=... tokens_per_s=...`` (tokens/s over the steps after the first,
which compiles the kernels). With ``--ddp`` the model is wrapped in ``DistributedDataParallel`` (NCCL on GPUs, gloo
on the CPU); each rank trains on its slice of one seeded global batch. ``--check-grads`` first compares, before any
optimizer step, the gradients of one step through DDP (averaged over ranks) with those of the unwrapped model on the
whole global batch, computed by rank 0 alone, in fp32 and (with ``--amp bf16``) under bf16 autocast, and prints the
largest relative difference ‖g_ddp − g_ref‖ / ‖g_ref‖ over the parameters; the script exits with status 1 if it
exceeds ``--grad-tol`` (defaults: fp32 1e-3, since the kernels' tf32 dots round inputs that differ in the last bits
differently; bf16 5e-2, since bf16 GEMMs of a different batch shape round differently). Without ``--ddp`` the same
check compares the whole batch with the mean of its two halves' gradients (what two ranks compute).

Exit status: 0 on success, 1 when a gradient check fails, 2 for a usage problem (no CUDA, no torchrun environment,
an invalid spec or one that cannot be built for this GPU).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

if __name__ == "__main__":  # run from a checkout: import its mamba3_gen, not another installed copy
    sys.path.insert(0, str(Path(os.path.abspath(__file__)).parents[1]))

IGNORE = -100  # cross_entropy's ignore_index: positions without a target
# --tiny: sizes the Triton interpreter runs in seconds per step (its time goes with batch · seqlen · heads)
TINY = {"d_model": 8, "vocab": 8, "batch": 2, "seqlen": 8, "spec_dims": {"d_state": 16, "headdim": 8, "chunk_size": 8}}


# ----------------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """x (..., d) → Linear(d, mult·d) → GELU → Linear(mult·d, d)."""

    def __init__(self, d: int, mult: int = 2):
        super().__init__()
        self.up = nn.Linear(d, mult * d, bias=False)
        self.down = nn.Linear(mult * d, d, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """x + Mamba3(RMSNorm(x)), then + MLP(RMSNorm(·)): pre-norm residual block (d_model → d_model)."""

    def __init__(self, spec, d_model: int, expand, mlp_mult: int, layer_idx: int, **layer_kwargs):
        super().__init__()
        from mamba3_gen.layer import Mamba3, RMSNorm

        self.norm1 = RMSNorm(d_model)
        self.mixer = Mamba3(spec, d_model, expand=expand, layer_idx=layer_idx, **layer_kwargs)
        self.norm2 = RMSNorm(d_model)
        self.mlp = MLP(d_model, mlp_mult)

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """tokens (B, L) int64 → logits (B, L, vocab) fp32: embedding, ``layers`` Blocks, RMSNorm, linear head.

    ``spec`` is anything ``mamba3_gen.Mamba3`` takes (path, YAML text, dict, Spec); every block builds its layer
    from it (the kernels are built once and shared); ``layer_kwargs`` go to ``Mamba3`` (dt_min, is_outproj_norm,
    ...)."""

    def __init__(self, spec, vocab: int, d_model: int, layers: int = 2, expand=2, mlp_mult: int = 2,
                 **layer_kwargs):
        super().__init__()
        from mamba3_gen.layer import RMSNorm

        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(spec, d_model, expand, mlp_mult, i, **layer_kwargs)
                                    for i in range(layers))
        self.norm_f = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_f(x)).float()


def lm_loss(model, tokens, targets):
    """Mean cross-entropy over the positions that have a target (fp32)."""
    logits = model(tokens)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
def synthetic_batch(task: str, batch: int, seqlen: int, vocab: int, generator: torch.Generator,
                    max_period: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets), both (batch, seqlen) int64 on the CPU, drawn from ``generator``.

    ``prev``: uniform tokens; targets[t] = tokens[t − 1], no target at t = 0. ``repeat``: each row a random pattern
    of length 2..max_period (at most seqlen) tiled; targets[t] = tokens[t + 1], no target at the last position.
    Every row has the same number of targets (seqlen − 1), so the mean over a batch is the mean of its slices'
    means (what DDP's gradient averaging assumes).
    """
    if task == "prev":
        tokens = torch.randint(0, vocab, (batch, seqlen), generator=generator)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, 1:] = tokens[:, :-1]
        return tokens, targets
    if task == "repeat":
        hi = max(2, min(max_period, seqlen))
        periods = torch.randint(2, hi + 1, (batch,), generator=generator)
        patterns = torch.randint(0, vocab, (batch, hi), generator=generator)
        pos = torch.arange(seqlen)
        tokens = torch.gather(patterns, 1, pos[None, :] % periods[:, None])
        targets = torch.full_like(tokens, IGNORE)
        targets[:, :-1] = tokens[:, 1:]
        return tokens, targets
    raise ValueError(f"unknown task {task!r}; expected 'prev' or 'repeat'")


def global_batch(args, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's whole batch (every rank draws the same one: seeded by (seed, step)); a rank trains on its slice.
    step −1 is the gradient check's batch."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step + 1)
    return synthetic_batch(args.task, args.batch * args.world, args.seqlen, args.vocab, g, args.max_period)


def rank_slice(t: torch.Tensor, args) -> torch.Tensor:
    return t[args.rank * args.batch:(args.rank + 1) * args.batch]


# ----------------------------------------------------------------------------------------------------------------
# spec
# ----------------------------------------------------------------------------------------------------------------
def spec_doc(args) -> dict:
    """The spec as a dict, with ``--set`` overrides (values parsed as YAML), ``--tiny``'s dims, and on the CPU fp32
    dtypes (the Triton interpreter computes bf16 dots wrongly)."""
    from mamba3_gen.errors import SpecError
    from mamba3_gen.spec.sources import apply_overrides, resolve_spec

    spec, _ = resolve_spec(args.spec)
    doc = spec.model_dump(mode="json", by_alias=True)
    sets = [f"dims.{k}={v}" for k, v in TINY["spec_dims"].items()] if args.tiny else []
    if args.device.type == "cpu":
        sets += ["dtypes.input=fp32", "dtypes.compute=fp32"]
    try:
        doc = apply_overrides(doc, sets + list(args.set))
    except SpecError as e:
        die(str(e))
    return doc


# ----------------------------------------------------------------------------------------------------------------
# gradient check
# ----------------------------------------------------------------------------------------------------------------
def _autocast(args, enabled: bool):
    return torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=enabled)


def unwrap(model) -> nn.Module:
    """The TinyLM inside torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def grads_of(model) -> dict:
    module = unwrap(model)
    return {n: p.grad.detach().float().clone() for n, p in module.named_parameters() if p.grad is not None}


def max_rel_diff(got: dict, ref: dict) -> tuple[float, str]:
    """max over parameters of ‖got − ref‖ / ‖ref‖ (a parameter missing on one side counts as inf)."""
    worst, name = 0.0, ""
    for key in ref.keys() | got.keys():
        if key not in got or key not in ref:
            return math.inf, key
        scale = torch.linalg.vector_norm(ref[key]).item()
        diff = torch.linalg.vector_norm(got[key] - ref[key]).item()
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
        if rel > worst:
            worst, name = rel, key
    return worst, name


def check_grads(model, reference, args, amp: bool) -> bool:
    """One step's gradients through ``model`` (DDP: this rank's slice, averaged over ranks; else the mean of the two
    halves of the batch) against ``reference`` (the unwrapped model, same parameters) on the whole batch, on rank 0.
    No optimizer step. Prints one line on rank 0; returns whether it passed (on every rank)."""
    import torch.distributed as dist

    tokens, targets = (t.to(args.device) for t in global_batch(args, step=-1))
    model.zero_grad(set_to_none=True)
    if args.ddp:
        with _autocast(args, amp):
            loss = lm_loss(model, rank_slice(tokens, args), rank_slice(targets, args))
        loss.backward()
    else:  # two "ranks" in one process: the mean of the halves' gradients
        for tok, tgt in zip(tokens.chunk(2), targets.chunk(2)):
            with _autocast(args, amp):
                loss = lm_loss(model, tok, tgt) / 2
            loss.backward()
    got = grads_of(model)
    model.zero_grad(set_to_none=True)
    ok = True
    if args.rank == 0:
        reference.zero_grad(set_to_none=True)
        with _autocast(args, amp):
            loss = lm_loss(reference, tokens, targets)
        loss.backward()
        rel, worst = max_rel_diff(got, grads_of(reference))
        reference.zero_grad(set_to_none=True)
        tol = args.grad_tol if args.grad_tol is not None else (5e-2 if amp else 1e-3)
        ok = rel <= tol
        how = f"DDP over {args.world} ranks" if args.ddp else "two half batches"
        print(f"grad check ({'bf16 autocast' if amp else 'fp32'}, {how} vs one process on the whole batch of "
              f"{tokens.shape[0]}): max relative difference {rel:.3e} ({worst}), tolerance {tol:g}: "
              f"{'PASS' if ok else 'FAIL'}", flush=True)
    if args.ddp:
        flag = torch.tensor([1.0 if ok else 0.0], device=args.device)
        dist.broadcast(flag, 0)
        ok = bool(flag.item())
    return ok


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", required=True, help="a mamba3-gen spec (YAML file)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a spec field (repeatable), e.g. --set dims.chunk_size=32")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=None, help="sequences per rank (default 8; --tiny 2)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per sequence (default 512; --tiny 8)")
    p.add_argument("--d-model", type=int, default=None, help="model width (default 256; --tiny 8)")
    p.add_argument("--expand", type=float, default=2, help="Mamba3 d_inner / d_model")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--outproj-norm", action="store_true", help="Mamba3(is_outproj_norm=True)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 64; --tiny 8)")
    p.add_argument("--task", choices=["prev", "repeat"], default="prev")
    p.add_argument("--max-period", type=int, default=8, help="longest pattern of --task repeat")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (needs TRITON_INTERPRET=1)")
    p.add_argument("--amp", choices=["bf16", "none"], default=None,
                   help="autocast dtype (default bf16 on cuda, none on cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    p.add_argument("--ddp", action="store_true", help="DistributedDataParallel; launch with torchrun")
    p.add_argument("--check-grads", action="store_true", help="compare DDP gradients with one process (see above)")
    p.add_argument("--grad-tol", type=float, default=None, help="max relative gradient difference allowed")
    p.add_argument("--tiny", action="store_true", help="tiny model and spec dims for the interpreter (d_model 8, "
                   "batch 2, seqlen 8, vocab 8; d_state 16, headdim 8, chunk 8)")
    args = p.parse_args(argv)
    for name, default in (("batch", 8), ("seqlen", 512), ("d_model", 256), ("vocab", 64)):
        if getattr(args, name) is None:
            setattr(args, name, TINY[name] if args.tiny else default)
    if args.steps < 1 or args.batch < 1 or args.seqlen < 2 or args.layers < 1 or args.vocab < 2:
        p.error("--steps, --batch, --layers must be >= 1, --seqlen and --vocab >= 2")
    return args


def setup(args) -> None:
    """Device, ranks and the process group; exits with a message (status 2) when the machine cannot run this."""
    kind = args.device
    if kind not in ("cuda", "cpu"):
        die(f"--device must be cuda or cpu; got {kind!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        die("CUDA is not available (torch.cuda.is_available() is False): this script "
                         "trains on NVIDIA GPUs. For a CPU smoke run in the Triton interpreter use "
                         "TRITON_INTERPRET=1 python examples/train_lm.py --spec ... --device cpu --tiny --steps 5")
    if kind == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        die("--device cpu runs the kernels in the Triton interpreter: set "
                         "TRITON_INTERPRET=1 in the environment (before Python starts)")
    args.amp = args.amp or ("bf16" if kind == "cuda" else "none")
    if kind == "cpu" and args.amp == "bf16":
        die("--amp bf16 on the CPU: the Triton interpreter computes bf16 dots wrongly; "
                         "use --amp none (the default there)")
    args.rank, args.world, local = 0, 1, 0
    if args.ddp:
        import torch.distributed as dist

        missing = [v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
                   if v not in os.environ]
        if missing:
            die(f"--ddp needs torchrun's environment ({', '.join(missing)} not set); "
                             "launch with: torchrun --nproc_per_node 2 examples/train_lm.py --ddp ...")
        local = int(os.environ["LOCAL_RANK"])
        if kind == "cuda":
            if local >= torch.cuda.device_count():
                die(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s)")
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo")
        args.rank, args.world = dist.get_rank(), dist.get_world_size()
    elif args.check_grads and args.batch % 2:
        die("--check-grads without --ddp splits the batch in two halves: use an even "
                         "--batch")
    args.device = torch.device(kind, local) if kind == "cuda" else torch.device("cpu")


def die(message: str):
    """A usage problem: the message on stderr, exit status 2."""
    print(f"train_lm.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def log(args, *parts) -> None:
    if args.rank == 0:
        print(*parts, flush=True)


def mean_over_ranks(x: torch.Tensor, args) -> float:
    if args.ddp:
        import torch.distributed as dist

        x = x.detach().clone()
        dist.all_reduce(x)
        x /= args.world
    return x.item()


def train(args) -> int:
    torch.manual_seed(args.seed)  # every rank builds the same initial model (DDP also broadcasts rank 0's)
    doc = spec_doc(args)
    model = TinyLM(doc, args.vocab, args.d_model, args.layers, args.expand,
                   is_outproj_norm=args.outproj_norm).to(args.device)
    nparams = sum(p.numel() for p in model.parameters())
    norm = ", outproj norm" if args.outproj_norm else ""
    log(args, f"spec {doc['name']} ({Path(args.spec).name}; rule {doc['discretization']['rule']}, "
              f"N={doc['dims']['d_state']} P={doc['dims']['headdim']} R={doc['dims']['mimo_rank']} "
              f"C={doc['dims']['chunk_size']}{norm}), {args.layers} layers, d_model {args.d_model}, {nparams} "
              f"parameters, task {args.task}, {args.world} rank(s) x batch {args.batch} x seqlen {args.seqlen}, "
              f"amp {args.amp}, device {args.device.type}")
    reference = copy.deepcopy(model) if args.check_grads and args.rank == 0 else None
    if args.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[args.device.index] if args.device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)

    status = 0
    if args.check_grads:
        for amp in ([False, True] if args.amp == "bf16" else [False]):
            if not check_grads(model, reference, args, amp):
                status = 1
        if status:
            return status

    amp = args.amp == "bf16"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sync = torch.cuda.synchronize if args.device.type == "cuda" else (lambda: None)
    tokens_per_step = args.batch * args.world * args.seqlen
    losses, t_start, t_log = [], None, time.perf_counter()
    for step in range(args.steps):
        tokens, targets = (rank_slice(t, args).to(args.device, non_blocking=True) for t in global_batch(args, step))
        with _autocast(args, amp):
            loss = lm_loss(model, tokens, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        if step == 0 or step == args.steps - 1 or (step + 1) % args.log_every == 0:
            value = mean_over_ranks(loss.detach(), args)  # synchronises (an all-reduce and .item())
            if not math.isfinite(value):
                log(args, f"step {step + 1}: loss is {value}; stopping")
                return 1
            losses.append((step + 1, value))
            now = time.perf_counter()
            if step == 0:
                t_start = now  # the first step compiles the kernels: not timed
                log(args, f"step {step + 1:5d}  loss {value:.4f}  (first step, with kernel compilation: "
                          f"{now - t_log:.1f} s)")
            else:
                done = step + 1 - (losses[-2][0] if len(losses) > 1 else 1)
                log(args, f"step {step + 1:5d}  loss {value:.4f}  {done * tokens_per_step / (now - t_log):,.0f} "
                          "tokens/s")
            t_log = now
    sync()
    elapsed = time.perf_counter() - t_start
    timed = args.steps - 1
    rate = f"{timed * tokens_per_step / elapsed:.0f}" if timed and elapsed > 0 else "n/a"
    first, last = losses[0][1], losses[-1][1]
    log(args, f"summary: spec={doc['name']} steps={args.steps} world={args.world} amp={args.amp} "
              f"first_loss={first:.4f} last_loss={last:.4f} ratio={last / first:.3f} tokens_per_s={rate} "
              f"(chance ln(vocab)={math.log(args.vocab):.4f})")
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    setup(args)
    from mamba3_gen.errors import Mamba3GenError

    try:
        return train(args)
    except Mamba3GenError as e:
        print(f"train_lm.py: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        if args.ddp:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
