"""Host side of the generated backward (issue 12): the autograd formula of a spec's forward op.

The forward's op (runtime/forward.py, one per spec) gets ``register_autograd`` here; its backward calls a second
custom op (``mamba3_gen::bwd_...``, with a fake implementation) so that ``torch.compile(fullgraph=True)`` traces
forward and backward as two opaque nodes. The forward's inputs are saved, and with MAMBA3_GEN_SAVE_STATES (SISO by
default: runtime/forward.py ``keeps_chunk_states``) the per-chunk states the forward stored; ``ctx.saved_tensors``
is read once, so ``torch.utils.checkpoint(..., use_reentrant=False)`` works.

The math (``../shared/docs/mamba3-math.md`` §2 recurrence, §4 MIMO, §5 chunked form). Per (sequence, head), with
u_s = Σ_r v_{s,r} k̂_{s,r}ᵀ (v_{s,r} = v_s ⊙ mimo_v_r), H_t = exp(a_t) H_{t−1} + Σ_j c_j(t) u_{t−j}, y_{t,r} = H_t q̂_{t,r}
and G_t = ∂L/∂H_t (dY_t q̂_tᵀ summed over ranks, plus exp(a_{t+1}) G_{t+1}, plus ∂L/∂H_final at the end):

    dq̂_{t,r} = H_tᵀ dY_{t,r}     d u_s = Σ_j c_j(s+j) G_{s+j}     ∂L/∂c_j(t) = ⟨G_t, u_{t−j}⟩     ∂L/∂a_t = exp(a_t)·⟨G_t, H_{t−1}⟩

each in the chunked form of the forward (E_c, the state entering chunk c after its first step; dX_c = ∂L/∂E_{c+1}):
∂L/∂a_t is computed per chunk as that inner product expanded over the chunk's tokens (stage bwd_stages/dda), not as
a reverse cumsum of ⟨q̂, dq̂⟩ − Σ_j c_j·dc_j over the sequence: that identity is exact but subtracts long sums, so a
step with a strong decay (small true gradient) got an error of fp32 roundoff times those sums, which the chain rule
through A·Δ (inputs.decay = a) then multiplies by |A| (measured: 1e-3 relative on dt).

Kernels (templates/triton/bwd.py.jinja), mirroring the chunk-parallel forward:
  1. E_c, the state entering chunk c (after its first step), its Θ and the carried tokens, in fp32: kept by the
     forward, or the forward's states kernel run again;
  2. dstate: sequential over chunks backwards, grid (sequence, head, P block x pair block): dX_c = ∂L/∂E_{c+1};
  3. three chunk kernels, all chunks at once, each recomputing what it needs of the chunk's forward (the sums
     over N in a loop over blocks of rotation pairs, so no program holds a chunk x N tile of P columns; with
     MAMBA3_GEN_BWD_CHUNKS=merged, chunk_vc does chunk_v's and chunk_coef's work in one program, ``selected_chunks``):
     chunk_v, one program per (chunk slot, head, P block): y, then dv, dz and the partials of the MIMO projections;
     chunk_coef, one program per (chunk slot, head): the coefficient gradients dc_j, da and the partial of D;
     chunk_qk, one program per (chunk slot, head, block of rotation pairs), all of P: dq̂, dk̂ and the rotation's
     backward (dq̃, dk̃, dΘ_t). dY comes from dout and the gate alone, so only chunk_v recomputes y. chunk_qk adds
     dq̃, dk̃ into their group's fp32 row (atomics, ``sums_heads_in_chunk_qk``: the heads' order varies from run to
     run) and stores the chunk's token sums for the biases; with torch.use_deterministic_algorithms(True), or for
     J ≥ 2 (the carried tokens add into dk̃ per head afterwards), it stores dq̃, dk̃ per head instead and no program
     adds into another's output;
  4. steps: per (sequence, head) backwards: da at the first step, the rule's prologue derivatives (sympy, printed by
     the backend printer, so a rule written as YAML formulas needs no template edit), the inputs' encodings, the
     reverse angle cumsum, the initial states' gradients.
  5. (per-head dq̃, dk̃ only) qk_sums: one pass over them (each element read once): the sum over the heads of a
     group (GQA), stored in q's / k's dtype, and per-block token sums for the biases.
With MAMBA3_GEN_BWD=fused (``selected_backward``), 2 and 3 are one kernel: one program per (sequence, head) walks
the chunks in reverse and does the three chunk kernels' work for each, dX_c kept in a row per program.
Then small torch sums: the biases' blocks, the per-chunk partials of D and the MIMO projections.

MIMO with mimo_o None (the per-rank output, signature.per_rank): dout is (B, L, R, H, P), dY_{t,r} is its row (no
reduction over ranks, no gate: such a spec has no z gate), and there is no mimo_o gradient.

Supported: every spec feature. Rules with two or more lags (J ≥ 2): the tokens t−1 … t−(J−1) carried into each chunk
(the states kernel's chunk_k/chunk_v) add their terms to y and E_{c+1}; the chunk kernels add their share of dq̂, dc_j
and da and store the carried tokens' dk̂ and dv per chunk slot (bwd_stages/dcarry_*), which the host adds to their
tokens (or the initial ones) through each token's rotation (``_carried_tokens``), with the final states' tokens 1 … J−1.
"""
from __future__ import annotations

import contextlib

import torch
import triton
from triton.runtime.errors import OutOfResources

from mamba3_gen.errors import DeviceError, InputError
from mamba3_gen.runtime.forward import build_key, chunk_slots, env_choice, size_class
from mamba3_gen.runtime.state import Mamba3State, state_layout
from mamba3_gen.signature import GRAD_NAMES, STATE_FIELDS, backward_schema, features, out_shape, per_rank

QK_SUMS_BLOCK_T = 32  # tokens per program of the qk sums kernel: 32 × N fp32 a head, 4 warps (a bandwidth pass)

__all__ = ["attach_backward", "BackwardOp", "selected_backward", "selected_chunks", "unsupported_reason"]

# The gradients' names (the forward's tensor inputs but cu_seqlens) and the op's schema, from the signature table
# (mamba3_gen/signature.py); the op's Python parameters below are checked against it by tests/test_signature.py.
_GRAD_NAMES = GRAD_NAMES
_BWD_SCHEMA = backward_schema()
_ATTACHED: dict = {}  # forward op name -> BackwardOp (a build shared by several loaded modules attaches once)


CHUNK_LAYOUTS = ("split", "merged")
BACKWARDS = ("auto", "chunked", "fused")


def selected_backward(has_fused: bool = True) -> str:
    """The backward's structure, read from MAMBA3_GEN_BWD at each call: ``chunked`` (the dstate kernel stores dX_c
    per chunk slot, then the chunk kernels run over every chunk at once; module docstring) or ``fused`` (one program
    per sequence and head walks the chunks in reverse and does the chunk kernels' work for each chunk: dX_c stays in
    a row per program, the loads, decay weights and dY once per chunk; B·H programs). ``auto`` (the default) is
    ``chunked``: the fused kernel measured slower at every shape so far (H100, shipped tiles, forward + backward:
    B8 L4096 H32 SISO 15.2 ms against 10.7, MIMO R4 56.3 against 42.1; B1 L16384 SISO 23.0 against 7.0;
    benchmarks/NOTES.md 2026-12-05: its program holds every chunk kernel's live tiles at once and spills 4.5-6.4 KB
    a thread on sm_90a). MAMBA3_GEN_BWD_CHUNKS is checked under both but only the chunked backward reads it. A module
    without the fused kernel (``has_fused=False``: an older generator) is always ``chunked``.

    Raises:
        InputError: MAMBA3_GEN_BWD names none of ``auto``, ``chunked``, ``fused``."""
    name = env_choice("MAMBA3_GEN_BWD", BACKWARDS)
    return "fused" if name == "fused" and has_fused else "chunked"


def selected_chunks(has_merged: bool = True) -> str:
    """How the backward's value and coefficient sides run, read from MAMBA3_GEN_BWD_CHUNKS at each call: ``split``
    (the default: chunk_v per block of P columns, then chunk_coef per chunk, each recomputing the chunk's loads, sums
    over N and decay weights) or ``merged`` (chunk_vc: both in one program per chunk and head, all of P, so those are
    computed once). ``merged`` is slower on the H200 (B8 L4096 H32, 2026-12-03 sweep: SISO 5.74 ms against 2.93 +
    2.72, MIMO R4 20.2 against 7.67 + 9.46): its one program spills 0.5-0.7 KiB for the SISO specs and 1.1-1.4 KiB
    for MIMO on sm_90a. A module built without the merged kernel is always ``split``.

    Raises:
        InputError: MAMBA3_GEN_BWD_CHUNKS names neither ``split`` nor ``merged``."""
    name = env_choice("MAMBA3_GEN_BWD_CHUNKS", CHUNK_LAYOUTS)
    return name if has_merged else "split"


def unsupported_reason(meta: dict) -> str | None:
    """Why a spec has no backward yet (None when it has one): the message names the spec field."""
    if meta.get("backward_refusal"):
        return f"spec {meta['name']!r}: {meta['backward_refusal']}"
    return None


def attach_backward(forward, dstate_kernel, chunk_v_kernel, chunk_coef_kernel, chunk_qk_kernel,
                    steps_kernel, chunk_vc_kernel=None, qk_sums_kernel=None, fused_kernel=None) -> "BackwardOp":
    """Register the generated backward (its five kernels, module docstring, ``chunk_vc_kernel``: chunk_v and
    chunk_coef in one, see ``selected_chunks``, ``qk_sums_kernel``: on the per-head path
    (``sums_heads_in_chunk_qk`` false) the GQA and bias sums of dq̃ / dk̃ in one pass, torch reductions without it,
    and ``fused_kernel``: dstate and the three chunk kernels in one, see ``selected_backward``) as the autograd
    formula of ``forward``'s ops (fused and chunked)."""
    bwd = BackwardOp(forward, dstate_kernel, chunk_v_kernel, chunk_coef_kernel, chunk_qk_kernel, steps_kernel,
                     chunk_vc_kernel, qk_sums_kernel, fused_kernel)
    for op in (forward.op, forward.chunked_op, *getattr(forward, "prepass_ops", {}).values()):
        if op is None:
            continue
        name = op._name if hasattr(op, "_name") else str(op)
        if name in _ATTACHED:
            continue
        op.register_autograd(bwd.backward, setup_context=bwd.setup_context)
        _ATTACHED[name] = bwd
    forward.backward = bwd
    return bwd


@contextlib.contextmanager
def _fits(meta: dict, kind: str):
    """Turn Triton's OutOfResources at a chunk kernel's launch into a DeviceError naming the spec fields that shrink
    its tile (the kernels are split over P and over rotation pairs, but a chunk's C·R rows stay in one program)."""
    try:
        yield
    except OutOfResources as e:
        raise DeviceError(
            f"spec {meta['name']!r}: the backward's chunk kernel ({kind}) does not fit this GPU ({e}); its tile is "
            f"dims.chunk_size·mimo_rank = {meta['C'] * meta['R']} rows x d_state = {meta['N']} x headdim = "
            f"{meta['P']} (in blocks): a smaller dims.chunk_size, d_state or headdim fits"
            + ("; or unset MAMBA3_GEN_BWD (the default chunked backward splits what this kernel holds at once)"
               if kind == "fused" else "") + "; the forward and the decode step are not affected") from e


def sums_heads_in_chunk_qk(J: int) -> bool:
    """Whether chunk_qk adds each head's dq̃, dk̃ into its group's fp32 row (atomics; no (B, L, R, H, N) per-head
    tensors: 1.07 GB fewer bytes written and read, and no qk_sums pass, at B8 L4096 H32 N128) rather than storing
    them per head for the qk_sums kernel. fp32 atomics add a group's heads in an order that varies from run to run
    (differences at fp32's rounding, ~1e-7 relative), so the per-head path runs when
    ``torch.are_deterministic_algorithms_enabled()`` (read when the backward runs; a backward captured in a CUDA
    graph keeps the path of its capture) and for rules with J ≥ 2, whose carried
    tokens add into dk̃ per head after chunk_qk (``_carried_tokens``)."""
    return J <= 1 and not torch.are_deterministic_algorithms_enabled()


def _carried_tokens(m, k, k_bias, dt, angles, init_angle, cu_seqlens, dchunk_k, dchunk_v, d_k, d_v, dk_h, dv,
                    dtheta):
    """J >= 2: add the gradients of the carried tokens t−i entering each chunk slot (dchunk_k: k̂, rotated frame;
    dchunk_v: raw v) and of the final states' tokens 1 .. J−1 (index 0 is the kernels') to their tokens: the carried
    token i of the chunk at c0 is token c0 − i, or, before the sequence, the initial token of index bos − (c0 − i) − 1.
    k̂_s = Rot(Θ_s)(k_s + k_bias), so dk̃_s = Rot(−Θ_s) dk̂_s and ∂L/∂Θ_s = dk̂_b·k̂_a − dk̂_a·k̂_b per pair (math doc
    §2, §5), with Θ_s = Θ_init + Σ_{bos≤r≤s} Δ_r·π·tanh(angle_r) as the forward computes it (float64 here).
    Adds into dk_h (B, L, R, H, N), dv (B, L, H, P), dtheta (B, L, H, S) in place; returns the initial tokens'
    extra gradients (NS, J, R, H, N), (NS, J, H, P)."""
    B, L, R, H, N = dk_h.shape
    P, J, C, S, G = dv.shape[-1], m["J"], m["C"], m["S"], m["G"]
    dev = dv.device
    # sequences (batch row, first token, end, first chunk slot) as device tensors: no host sync
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        NS = cu.shape[0] - 1
        seq_b = torch.zeros(NS, device=dev, dtype=torch.long)
        bos, eos = cu[:-1], cu[1:]
        slot0 = bos // C + torch.arange(NS, device=dev)
    else:
        NS, nc = B, triton.cdiv(L, C)
        seq_b = torch.arange(B, device=dev)
        bos, eos = torch.zeros(B, device=dev, dtype=torch.long), torch.full((B,), L, device=dev, dtype=torch.long)
        slot0 = seq_b * nc
    dk_hat = torch.zeros_like(dk_h).reshape(B * L, R, H, N)  # rotated frame, per token
    dv_flat = dv.view(B * L, H, P)
    init_k = torch.zeros(NS * J, R, H, N, device=dev, dtype=torch.float32)
    init_v = torch.zeros(NS * J, H, P, device=dev, dtype=torch.float32)

    def add(s, tok, gk, gv):  # gradients of token `tok` of sequence s (an input token, or before bos an initial one)
        inside = tok >= bos[s]
        if B * L:  # (an empty batch has initial tokens only)
            row = torch.where(inside, seq_b[s] * L + tok, 0).clamp(0, B * L - 1)
            dk_hat.index_put_((row,), torch.where(inside[:, None, None, None], gk, 0.0), accumulate=True)
            dv_flat.index_put_((row,), torch.where(inside[:, None, None], gv, 0.0), accumulate=True)
        init_row = torch.where(inside, 0, s * J + (bos[s] - tok - 1).clamp(min=0))
        init_k.index_put_((init_row,), torch.where(inside[:, None, None, None], 0.0, gk), accumulate=True)
        init_v.index_put_((init_row,), torch.where(inside[:, None, None], 0.0, gv), accumulate=True)

    slots = dchunk_k.shape[0]
    if slots:
        slot = torch.arange(slots, device=dev)
        s_of = (torch.searchsorted(slot0, slot, right=True) - 1).clamp(min=0)  # the sequence of each slot
        c0 = bos[s_of] + (slot - slot0[s_of]) * C
        live = (slot >= slot0[s_of]) & (c0 < eos[s_of])  # slots past a sequence's last chunk carry nothing
        for i in range(1, J):
            gk = torch.where(live[:, None, None, None], dchunk_k[:, i - 1], 0.0)
            gv = torch.where(live[:, None, None], dchunk_v[:, i - 1], 0.0)
            add(s_of, torch.where(live, c0 - i, bos[s_of]), gk, gv)
    if d_k is not None:
        fk, fv = d_k.float().reshape(NS, J, R, H, N), d_v.float().reshape(NS, J, H, P)
        seqs = torch.arange(NS, device=dev)
        for i in range(1, J):
            add(seqs, eos - 1 - i, fk[:, i], fv[:, i])
    dk_hat = dk_hat.view(B, L, R, H, N)
    init_k, init_v = init_k.view(NS, J, R, H, N), init_v.view(NS, J, H, P)
    if S:
        idx = torch.arange(N // 2, device=dv.device)
        a, bb = (2 * idx, 2 * idx + 1) if m["rotation"] == "pairwise" else (idx, idx + N // 2)
        kt = k.float().reshape(B, L, R, G, 1, N).expand(B, L, R, G, H // G, N).reshape(B, L, R, H, N)
        kt = kt + k_bias.float().reshape(H, R, N).permute(1, 0, 2)[None, None]
        step = dt.double().permute(0, 2, 1)[..., None] * (torch.pi * torch.tanh(angles.double()[..., :S]))
        # Θ_s per token: a cumsum over each sequence (varlen: the packed row's cumsum less its value before bos)
        theta = torch.cumsum(step, dim=1)  # (B, L, H, S)
        if cu_seqlens is not None:
            tok_seq = torch.searchsorted(cu[1:], torch.arange(L, device=dev), right=True).clamp(max=NS - 1)
            # (1, NS, H, S); the zero row first, so a pack of empty sequences (L = 0) indexes row 0
            before = torch.cat([theta.new_zeros(B, 1, H, S), theta], dim=1)[:, bos]
            theta = theta - before[:, tok_seq]
            if init_angle is not None:
                theta = theta + init_angle.double()[tok_seq][None]
        elif init_angle is not None:
            theta = theta + init_angle.double()[:, None]
        full = torch.zeros(B, L, H, N // 2, device=dv.device, dtype=torch.float64)
        full[..., :S] = theta
        cos, sin = torch.cos(full).float()[:, :, None], torch.sin(full).float()[:, :, None]  # (B, L, 1, H, N/2)
        ka, kb = kt[..., a], kt[..., bb]
        ka, kb = ka * cos - kb * sin, ka * sin + kb * cos  # k̂
        ga, gb = dk_hat[..., a], dk_hat[..., bb]
        dtheta += (gb * ka - ga * kb).sum(2)[..., :S]
        dk_h[..., a] += ga * cos + gb * sin
        dk_h[..., bb] += gb * cos - ga * sin
    else:
        dk_h += dk_hat
    return init_k, init_v


class BackwardOp:
    """The backward of one spec's forward op: ``setup_context``/``backward`` for ``register_autograd`` and the
    registered ``bwd_...`` op that launches the kernels (module docstring)."""

    def __init__(self, forward, dstate_kernel, chunk_v_kernel, chunk_coef_kernel, chunk_qk_kernel, steps_kernel,
                 chunk_vc_kernel=None, qk_sums_kernel=None, fused_kernel=None):
        self.forward = forward
        self.meta = forward.meta
        self.kernels = (dstate_kernel, chunk_v_kernel, chunk_coef_kernel, chunk_qk_kernel, steps_kernel)
        self.chunk_vc_kernel = chunk_vc_kernel
        self.qk_sums_kernel = qk_sums_kernel
        self.fused_kernel = fused_kernel
        self.op = self._register()

    # -- autograd ------------------------------------------------------------------------------------------------
    def setup_context(self, ctx, inputs, output):
        reason = unsupported_reason(self.meta)
        if reason is not None:
            raise InputError(reason)
        # layer/state inputs and cu_seqlens, and the per-chunk tensors the forward kept (empty when it kept none:
        # runtime/forward.py keeps_chunk_states); nothing else
        chunks = output[1 + len(STATE_FIELDS):]
        ctx.mark_non_differentiable(*chunks)
        ctx.set_materialize_grads(False)  # else autograd hands backward a zero tensor per chunk output (537 MB)
        ctx.save_for_backward(*inputs[:len(_GRAD_NAMES) + 1], *chunks)

    def backward(self, ctx, dout, d_angle, d_ssm, d_k, d_v, *d_chunks):
        saved = ctx.saved_tensors  # read once (activation checkpointing recomputes the forward on this access)

        def grad(x):  # an unused output's gradient is None; an absent final state or chunk tensor is an empty tensor
            return None if x is None or x.numel() == 0 else x

        n = len(_GRAD_NAMES) + 1
        grads = self.op(*saved[:n], *[grad(t) for t in saved[n:]], grad(dout), grad(d_angle), grad(d_ssm),
                        grad(d_k), grad(d_v))
        return (*[None if g.numel() == 0 else g for g in grads], None, None, None)

    # -- the registered backward op ------------------------------------------------------------------------------
    def _register(self):
        m = self.meta
        name = f"mamba3_gen::bwd_{build_key(m)}"
        if name in _ATTACHED:
            return _ATTACHED[name].op

        @torch.library.custom_op(name, mutates_args=(), schema=_BWD_SCHEMA)
        def op(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o, init_angle, init_ssm,
               init_k, init_v, cu_seqlens, chunk_ssm, chunk_angle, chunk_k, chunk_v, dout, d_angle, d_ssm, d_k, d_v):
            return self._launch(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o,
                                init_angle, init_ssm, init_k, init_v, cu_seqlens, chunk_ssm, chunk_angle, chunk_k,
                                chunk_v, dout, d_angle, d_ssm, d_k, d_v)

        @op.register_fake
        def _(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o, init_angle, init_ssm,
              init_k, init_v, cu_seqlens, chunk_ssm, chunk_angle, chunk_k, chunk_v, dout, d_angle, d_ssm, d_k, d_v):
            inputs = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o, init_angle,
                      init_ssm, init_k, init_v)
            return tuple(torch.empty((0,), device=v.device) if x is None else torch.empty_like(x) for x in inputs)

        _ATTACHED[name] = self
        return op

    def _launch(self, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o,
                init_angle, init_ssm, init_k, init_v, cu_seqlens, chunk_ssm, chunk_angle, chunk_k, chunk_v,
                dout, d_angle, d_ssm, d_k, d_v):
        """Gradients of every input (module docstring), each in its input's shape and dtype; an empty tensor for an
        input that was None. Shapes: as the forward op takes them (ForwardOp's docstring). ``chunk_*``: the
        per-chunk tensors the forward kept (fp32, ``ForwardOp._chunk_outputs``), or None: the states kernel then
        computes them again."""
        m = self.meta
        B, L, H, P = v.shape
        C, N, S, J, R, G = m["C"], m["N"], m["S"], m["J"], m["R"], m["G"]
        dev, f32 = v.device, torch.float32
        is_varlen = cu_seqlens is not None
        NS = cu_seqlens.shape[0] - 1 if is_varlen else B
        NC, slots = chunk_slots(B, L, C, NS, is_varlen)
        has_init = init_ssm is not None
        layout = state_layout(m, NS, H)
        has_dfinal = any(x is not None for x in (d_angle, d_ssm, d_k, d_v)) and m["final_states"]
        if has_dfinal:  # the ones not used are zero
            d_angle, d_ssm, d_k, d_v = [
                (x.contiguous() if x is not None else torch.zeros(layout[f][0], device=dev, dtype=f32))
                if layout[f] is not None else None
                for f, x in zip(Mamba3State._fields, (d_angle, d_ssm, d_k, d_v))]
        # mimo_o None (R > 1): the per-rank output, dout (B, L, R, H, P), no mimo_o gradient
        per = per_rank(features(m), mimo_o)
        dout = (torch.zeros(out_shape(features(m), (B, L), H, P, mimo_o), device=dev, dtype=v.dtype)
                if dout is None else dout.contiguous())
        angle_strides = angles.stride()[:3] if angles is not None else (0, 0, 0)
        search = max(0, NS - 1).bit_length()

        def zeros(*shape):
            return torch.zeros(shape, device=dev, dtype=f32)

        def empty(*shape):
            return torch.empty(shape, device=dev, dtype=f32)

        # 1. E_c and Θ before each chunk (fp32): kept by the forward, or its states kernel again
        if chunk_ssm is None:
            # J >= 2: also the carried tokens t−1 … t−(J−1) entering each chunk (the chunk kernels' prev_tokens)
            chunk_ssm, chunk_angle, chunk_k, chunk_v = [
                None if sh is None else empty(*sh) for sh in self.forward.chunk_shapes(v.shape, NS, is_varlen)]
            fin = [None] * 4
            states_kernel = self.forward.chunked_kernels[0]
            states_kernel[lambda cfg: (NS, H, triton.cdiv(P, cfg["BLOCK_P"]) * triton.cdiv(m["N2"], cfg["BLOCK_K"]))](
                q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o, dout,
                init_angle, init_ssm, init_k, init_v, *fin, chunk_ssm, chunk_angle, chunk_k, chunk_v, cu_seqlens,
                L, H, G, size_class(NS, H, dev), NC, NS, search, *angle_strides, HAS_INIT=has_init, STORE_FINAL=False,
                IS_VARLEN=is_varlen,
                PER_RANK=per)

        dstate_kernel, chunk_v_kernel, chunk_coef_kernel, chunk_qk_kernel, steps_kernel = self.kernels
        fused = selected_backward(self.fused_kernel is not None) == "fused"
        chunks = selected_chunks(self.chunk_vc_kernel is not None)  # checked on either path
        dinit_ssm = empty(NS, H, P, N) if has_init else None
        if fused:  # dX_c lives in the fused kernel's row per (sequence, head), which ends as ∂L/∂E_0
            dchunk, de0 = None, empty(NS, H, P, N)
        else:  # 2. dX_c backwards over the chunks
            dchunk = empty(slots, H, P, N)
            de0 = empty(NS, H, P, N) if has_init else None
            dstate_kernel[lambda cfg: (NS, H, triton.cdiv(P, cfg["BLOCK_P"]) * triton.cdiv(m["N2"], cfg["BLOCK_K"]))](
                q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o, dout, d_ssm,
                chunk_angle, dchunk, dinit_ssm, de0, cu_seqlens, L, H, G, size_class(NS, H, dev), NC, *angle_strides,
                HAS_INIT=has_init, HAS_DFINAL=has_dfinal, IS_VARLEN=is_varlen, PER_RANK=per)

        # 3. every chunk at once: the value side per P block, the coefficient gradients, the key/query side per block
        # of rotation pairs (independent of each other)
        head_sums = sums_heads_in_chunk_qk(J)
        if head_sums:  # the group sums (zeroed: chunk_qk adds into them) and the biases' per-chunk token sums
            dq_h, dk_h = zeros(B, L, R, G, N), zeros(B, L, R, G, N)
            dqb_part, dkb_part = zeros(slots, R, H, N), zeros(slots, R, H, N)
        else:
            dq_h, dk_h = empty(B, L, R, H, N), empty(B, L, R, H, N)
            dqb_part = dkb_part = None
        # dv and dz in the inputs' dtypes where nothing adds into them later (the store rounds as .to() would); the
        # carried tokens of J >= 2 add into dv (_carried_tokens), so it stays fp32 there
        dv = torch.empty(B, L, H, P, device=dev, dtype=v.dtype if J <= 1 else f32)
        dz = torch.empty(B, L, H, P, device=dev, dtype=z.dtype) if z is not None else None
        dtheta = empty(B, L, H, S) if S else None
        da = empty(B, H, L)
        dc = zeros(B, H, J + 1, L)
        dD_part = zeros(slots, H) if D is not None else None
        dmv_part = zeros(slots, H, R, P) if R > 1 else None
        dmz_part = zeros(slots, H, R, P) if R > 1 and z is not None else None
        dmo_part = zeros(slots, H, R, P) if R > 1 and not per else None
        # J >= 2: the gradients of the carried tokens entering each chunk (the host adds them to their tokens)
        dchunk_k = zeros(slots, J - 1, R, H, N) if J > 1 else None
        dchunk_v = zeros(slots, J - 1, H, P) if J > 1 else None
        extra_v = (dchunk_v,) if J > 1 else ()
        extra_k = (dchunk_k,) if J > 1 else ()
        if fused:  # 2 and 3 in one kernel (it also runs with no chunk slots: dX of an empty sequence)
            with _fits(m, "fused"):
                self.fused_kernel[(NS, H)](
                    q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o, dout, d_ssm,
                    chunk_ssm, chunk_angle, chunk_k, chunk_v, de0, dinit_ssm, d_v, d_k, dv, dz, dmv_part,
                    dmz_part, dmo_part, da, dc, dD_part, dq_h, dk_h, dqb_part, dkb_part, dtheta, *extra_v,
                    *extra_k, cu_seqlens, L, H, G, NC, *angle_strides, HAS_INIT=has_init, HAS_DFINAL=has_dfinal,
                    IS_VARLEN=is_varlen, PER_RANK=per, HEAD_SUMS=head_sums)
        elif slots:
            common = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o, dout,
                      chunk_ssm, chunk_angle, chunk_k, chunk_v, dchunk)
            sizes = (L, H, G, NC, NS, search, *angle_strides)
            flags = dict(HAS_DFINAL=has_dfinal, IS_VARLEN=is_varlen, PER_RANK=per)
            if chunks == "merged":
                with _fits(m, "chunk_vc"):
                    self.chunk_vc_kernel[(slots, H)](*common, d_v, dv, dz, dmv_part, dmz_part, dmo_part, *extra_v,
                                                     da, dc, dD_part, cu_seqlens, *sizes, **flags)
            else:
                with _fits(m, "chunk_v"):
                    chunk_v_kernel[lambda cfg: (slots, H, triton.cdiv(P, cfg["BLOCK_P"]))](
                        *common, d_v, dv, dz, dmv_part, dmz_part, dmo_part, *extra_v, cu_seqlens, *sizes, **flags)
                with _fits(m, "chunk_coef"):
                    chunk_coef_kernel[(slots, H)](*common, da, dc, dD_part, cu_seqlens, *sizes, **flags)
            with _fits(m, "chunk_qk"):
                chunk_qk_kernel[lambda cfg: (slots, H, triton.cdiv(m["N2"], cfg["BLOCK_K"]))](
                    *common, d_k, dq_h, dk_h, dqb_part, dkb_part, dtheta, *extra_k, cu_seqlens, *sizes,
                    HEAD_SUMS=head_sums, **flags)

        init_extra = None
        if J > 1:
            init_extra = _carried_tokens(m, k, k_bias, dt, angles, init_angle, cu_seqlens, dchunk_k, dchunk_v,
                                         d_k if has_dfinal else None, d_v if has_dfinal else None, dk_h, dv, dtheta)
        # 4. per-token step gradients, angles, initial states
        dadt, ddt = empty(B, H, L), empty(B, H, L)
        dtrap = empty(B, H, L) if trap is not None else None
        dangles = empty(B, L, H, S) if S else None
        has_init_tokens = has_init and J >= 1
        dinit_angle = empty(NS, H, S) if has_init and S else None
        dinit_k = empty(*layout["k"][0]) if has_init_tokens else None
        dinit_v = empty(*layout["v"][0]) if has_init_tokens else None
        dinit_mv = zeros(NS, H, R, P) if has_init_tokens and R > 1 else None
        steps_kernel[(NS, H)](
            adt, dt, trap, angles, mimo_v, init_ssm, init_k, init_v, d_angle, d_ssm, d_k, d_v, de0,
            da, dc, dtheta, dadt, ddt, dtrap, dangles, dinit_angle, dinit_k, dinit_v, dinit_mv, cu_seqlens,
            L, H, G, *angle_strides, HAS_INIT=has_init, HAS_DFINAL=has_dfinal, IS_VARLEN=is_varlen)

        if init_extra is not None and has_init_tokens:
            dinit_k += init_extra[0].reshape(dinit_k.shape)
            dinit_v += init_extra[1].reshape(dinit_v.shape)
        # 5. reductions over heads of a group (GQA), tokens (biases) and chunks (D, MIMO projections)
        def qk_grads(d_h, x, bias_part):
            if head_sums:  # chunk_qk summed the heads (fp32) and the chunks' tokens
                d_in = d_h.to(x.dtype)
                d_bias = bias_part.sum(0)  # (R, H, N); zeros when there are no chunk slots
            elif self.qk_sums_kernel is None:
                d_in = d_h.view(B, L, R, G, H // G, N).sum(4)  # the heads of a group read one q/k row
                d_bias = d_h.sum((0, 1))  # (R, H, N): the bias is added per head before the rotation
            else:  # both in one pass over d_h (templates/triton/bwd.py.jinja, mamba3_bwd_qk_sums_kernel)
                nt = triton.cdiv(B * L, QK_SUMS_BLOCK_T)
                d_in = torch.empty(B, L, R, G, N, device=dev, dtype=x.dtype)
                part = torch.empty(nt, R, H, N, device=dev, dtype=f32)
                self.qk_sums_kernel[(nt, R * G)](d_h, d_in, part, B * L, H, G, BLOCK_T=QK_SUMS_BLOCK_T,
                                                 num_warps=4)
                d_bias = part.sum(0)
            d_bias = d_bias.permute(1, 0, 2)  # (H, R, N)
            return (d_in[:, :, 0], d_bias[:, 0]) if R == 1 else (d_in, d_bias)

        dq, dq_bias = qk_grads(dq_h, q, dqb_part)
        dk, dk_bias = qk_grads(dk_h, k, dkb_part)
        dmv = None
        if R > 1:
            dmv = dmv_part.sum(0) + (dinit_mv.sum(0) if dinit_mv is not None else 0)
        grads = {
            "q": dq, "k": dk, "v": dv, "adt": dadt, "dt": ddt, "trap": dtrap, "q_bias": dq_bias, "k_bias": dk_bias,
            "angles": dangles, "D": dD_part.sum(0) if dD_part is not None else None, "z": dz, "mimo_v": dmv,
            "mimo_z": dmz_part.sum(0) if dmz_part is not None else None,
            "mimo_o": dmo_part.sum(0) if dmo_part is not None else None,
            "init_angle": dinit_angle, "init_ssm": dinit_ssm, "init_k": dinit_k, "init_v": dinit_v,
        }
        inputs = dict(zip(_GRAD_NAMES, (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z,
                                        mimo_o, init_angle, init_ssm, init_k, init_v)))
        out = []
        for name in _GRAD_NAMES:
            x, g = inputs[name], grads[name]
            if x is None:
                out.append(torch.empty((0,), device=dev))
            elif g is None:  # an input whose value cannot change the outputs (e.g. a state this spec never reads)
                out.append(torch.zeros_like(x))
            else:
                out.append(g.reshape(x.shape).to(x.dtype))
        return tuple(out)
