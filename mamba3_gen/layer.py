"""The Mamba-3 layer as an ``nn.Module`` around a generated op, and a float64 reference of the same layer.

``Mamba3(spec, d_model)`` does what the official ``mamba_ssm.modules.mamba3.Mamba3`` module does (math doc §1, §4,
§6): one ``in_proj`` whose output is split into z | x | B | C | dd_dt | dd_A | trap | angles, the heavy-tail
data-dependent A floored at ``-A_floor``, Δ = softplus(dd_dt + dt_bias), RMSNorms of B and C, per-head B/C biases,
D, the MIMO projections, an optional gated per-head RMSNorm before ``out_proj``. The recurrence itself runs in the
spec's generated kernels (``mamba3_gen.load``): the chunked forward for sequences, the decode step for one token.

For a spec that matches an official configuration (``specs/siso_trap_complex.yaml``, ``specs/mimo_r4.yaml``),
``state_dict()`` has the official keys, shapes and dtypes, so an official checkpoint loads with ``strict=True``.
Where a spec goes beyond the official layer, the layer follows the spec: a rule without a data λ has no trap slice,
a real state no angles slice, ``options.z_gate: false`` no z slice (nor ``mimo_z``), ``options.d_skip: false`` no D.

``layer_reference`` recomputes a layer's forward in float64 with plain torch and the float64 oracle of the
recurrence (``mamba3_gen.reference.naive_recurrence``); the tests compare the two.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba3_gen.errors import InputError
from mamba3_gen.runtime.checks import check_cu_seqlens
from mamba3_gen.runtime.state import Mamba3State

__all__ = ["Mamba3", "RMSNorm", "heavy_tail", "layer_reference"]

# Arguments of the official constructor that a spec owns here: the message says which spec field to set instead.
_SPEC_OWNED = {
    "d_state": "dims.d_state", "headdim": "dims.headdim", "ngroups": "dims.ngroups", "mimo_rank": "dims.mimo_rank",
    "is_mimo": "dims.mimo_rank (1 is SISO)", "chunk_size": "dims.chunk_size", "rope_fraction": "state.rope_fraction",
}
_OPS: dict = {}  # (canonical spec JSON, arch) -> generated module; kept off the nn.Module so the layer deep-copies


def heavy_tail(u: torch.Tensor) -> torch.Tensor:
    """f(u) = 1 + u for u >= 0, 1 / (1 − u) for u < 0 (math doc §1): positive, continuous, C¹ at 0 (f' = 1 there).

    The negative branch reads min(u, 0), so it is never evaluated at its pole (u = 1), and the gradient is finite and
    exact everywhere, also at 0 (two clamps added would give 2 there). Any shape and float dtype; returns the same.
    """
    return torch.where(u >= 0, 1 + u, torch.reciprocal(1 - u.clamp(max=0)))


class RMSNorm(nn.Module):
    """RMS normalisation over groups of the last dim, optionally gated: ``y = x / rms_g(x) · weight [· silu(z)]``.

    The official layer's ``RMSNormGated`` with the norm before the gate (math doc §1): ``weight`` (hidden,) starts at
    ones; ``group_size`` splits the last dim into groups normalised separately (None: one group); there is no bias
    (so the state_dict holds only ``weight``). Computed in fp32; returns x's dtype, or fp32 when z is given (as the
    official layer's output norm, which feeds fp32 into the mimo_o contraction or out_proj's cast).
    """

    def __init__(self, hidden: int, eps: float = 1e-5, group_size: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = hidden if group_size is None else group_size
        self.weight = nn.Parameter(torch.ones(hidden, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (..., hidden), any float dtype; z None or broadcastable to x. Returns x's shape: in x's dtype without z,
        fp32 with z."""
        x32 = x.float()
        groups = x32.unflatten(-1, (-1, self.group_size))
        y = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2) * self.weight.float()
        if z is None:
            return y.to(x.dtype)
        return y * F.silu(z.float())


def _check_inference_params(p) -> None:
    """What the layer reads of mamba_ssm's ``InferenceParams``: the cache dict and the offset."""
    if not hasattr(p, "key_value_memory_dict") or not hasattr(p, "seqlen_offset"):
        raise InputError("inference_params must have key_value_memory_dict (a dict) and seqlen_offset (an int), like "
                         f"mamba_ssm.utils.generation.InferenceParams; got {type(p).__name__}")


class Mamba3(nn.Module):
    """A Mamba-3 layer built from a spec: ``Mamba3(spec, d_model, expand=2, ...)``; u (B, L, d_model) → (B, L, d_model).

    Args:
        spec: a path to a YAML spec, YAML text, a dict or a ``Spec``. It gives d_state N, headdim P, mimo_rank R,
            ngroups G, chunk_size, the rope fraction (S = N·fraction/2 angles), the rotation and the rule.
        d_model: the model width. The layer has d_inner = expand·d_model channels in H = d_inner / P heads.
        expand: d_inner / d_model (official default 2); expand·d_model must be a whole multiple of P.
        dt_min, dt_max, dt_init_floor: Δ₀ ~ logUniform[dt_min, dt_max] per head, clamped ≥ dt_init_floor, and
            dt_bias = softplus⁻¹(Δ₀) (math doc §1; official defaults 1e-3, 1e-1, 1e-4).
        A_floor: A = min(−f(dd_A), −A_floor) with f the heavy-tail activation (math doc §1; default 1e-4).
        is_outproj_norm: a per-head RMSNorm (weight ``norm.weight`` (d_inner,)) between the SSM and out_proj, gated
            by silu(z) (silu(z ⊙ mimo_z_r) per rank for MIMO) instead of the kernel's gate (math doc §1, §4).
        layer_idx: the key of this layer's state in ``inference_params.key_value_memory_dict``.
        arch: the target the kernels are built for (``mamba3_gen.load``'s ``arch``; None: this machine's).
        device, dtype: of in_proj, the B/C norms, the output norm and out_proj; dt_bias, B_bias, C_bias, D and the
            MIMO projections are fp32, as in the official layer.

    Parameters (official names; present as the spec says): ``in_proj.weight`` (d_in_proj, d_model), ``dt_bias`` (H,),
    ``B_bias``, ``C_bias`` (H, R, N) init 1, ``B_norm.weight``, ``C_norm.weight`` (N,), ``mimo_x`` (H, R, P) init 1/R,
    ``mimo_z`` (H, R, P) init 1, ``mimo_o`` (H, R, P) init 1/R (R > 1), ``D`` (H,) init 1 (``options.d_skip``),
    ``norm.weight`` (d_inner,) (``is_outproj_norm``), ``out_proj.weight`` (d_model, d_inner). ``in_proj_split`` lists
    the (name, width) slices of in_proj's output in order. The spec's rotation must be the checkpoint's (official
    SISO: pairwise; official MIMO: halved) for official weights to give the official outputs.

    Training: ``forward`` is differentiable with respect to u and every parameter through the generated backward
    (``torch.compile(fullgraph=True)`` and ``torch.utils.checkpoint(..., use_reentrant=False)`` work; bf16 autocast
    too: in_proj/out_proj follow it, the rest computes in fp32 as above), for every rule, those with two or more lags
    included, except a formula rule whose derivative the lowering refuses (``check`` says why; a gradient request
    raises ``InputError`` naming the weight). With ``is_outproj_norm`` and R > 1 the op returns the per-rank outputs
    (``mimo_o=None``) in one call.
    ``step`` is an inference path and refuses grad mode.

    Raises:
        SpecError: the spec is invalid. BuildError: it cannot be built for ``arch``.
        InputError: d_model or expand do not give whole heads; H is not a multiple of G; dt_min/dt_max/A_floor out of
            range; an official argument that the spec owns (d_state, headdim, mimo_rank, ...) was passed.
    """

    def __init__(self, spec, d_model: int, expand=2, *, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4, A_floor: float = 1e-4, is_outproj_norm: bool = False,
                 layer_idx: Optional[int] = None, arch: Optional[str] = None, device=None, dtype=None, **kwargs):
        super().__init__()
        from mamba3_gen.spec.sources import resolve_spec

        for name in kwargs:
            if name in _SPEC_OWNED:
                raise InputError(f"{name}= comes from the spec here ({_SPEC_OWNED[name]}); set it in the spec "
                                 "and drop the argument")
        if kwargs:
            raise TypeError(f"Mamba3() got unexpected keyword arguments {sorted(kwargs)}")
        self.spec, _ = resolve_spec(spec)
        d = self.spec.dims
        N, P, R, G, S = d.d_state, d.headdim, d.mimo_rank, d.ngroups, self.spec.num_angles
        if isinstance(d_model, bool) or not isinstance(d_model, Integral) or d_model < 1:
            raise InputError(f"d_model must be a positive whole number; got {d_model!r}")
        if isinstance(expand, bool) or not isinstance(expand, Real) or expand <= 0:
            raise InputError(f"expand must be a positive number; got {expand!r}")
        d_inner = int(expand * d_model)
        if d_inner % P or d_inner == 0:
            raise InputError(f"expand·d_model = {expand}·{d_model} = {d_inner} channels is not a whole number of heads "
                             f"of headdim P={P} (dims.headdim); try d_model={max(P, (d_model // P) * P)} or another "
                             "expand")
        H = d_inner // P
        if H % G:
            raise InputError(f"d_inner / headdim = {H} heads is not a multiple of ngroups G={G} (dims.ngroups); "
                             f"try d_model={d_model * G // math.gcd(H, G)}")
        if not (0 < dt_min <= dt_max):
            raise InputError(f"dt_min, dt_max must satisfy 0 < dt_min <= dt_max; got {dt_min}, {dt_max}")
        if dt_init_floor < 0 or A_floor < 0:
            raise InputError(f"dt_init_floor and A_floor must be >= 0; got {dt_init_floor}, {A_floor}")
        self.d_model, self.expand, self.d_inner = int(d_model), expand, d_inner
        self.nheads, self.headdim, self.d_state, self.mimo_rank, self.ngroups = H, P, N, R, G
        self.num_rope_angles = S
        self.A_floor = A_floor
        self.is_outproj_norm = bool(is_outproj_norm)
        self.layer_idx = layer_idx
        self.arch = arch
        opts = self.spec.options
        self.has_z = opts.z_gate  # z gates the kernel's output, or the output norm
        # With the output norm the gate moves from the kernel to the norm: the kernel runs without it.
        self.kernel_spec = self.spec if not (self.is_outproj_norm and opts.z_gate) else \
            self.spec.model_copy(update={"options": opts.model_copy(update={"z_gate": False})})
        self._op_key = (self.kernel_spec.model_dump_json(by_alias=True), arch)
        self.op  # build and import now: a bad target fails here, not at the first forward

        # official order (math doc §1); slices the spec does not use are left out
        split = [("z", d_inner if self.has_z else 0), ("x", d_inner), ("B", R * G * N), ("C", R * G * N),
                 ("dd_dt", H), ("dd_A", H), ("trap", H if self.spec.has_trap_input else 0), ("angles", S)]
        self.in_proj_split = [(n, w) for n, w in split if w]
        fk = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(d_model, sum(w for _, w in self.in_proj_split), bias=False, **fk)

        dt0 = torch.exp(torch.rand(H, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt0 = dt0.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt0 + torch.log(-torch.expm1(-dt0)))  # softplus⁻¹(Δ₀)
        self.dt_bias._no_weight_decay = True
        self.B_bias = nn.Parameter(torch.ones(H, R, N, device=device))
        self.C_bias = nn.Parameter(torch.ones(H, R, N, device=device))
        self.B_norm = RMSNorm(N, eps=1e-5, **fk)
        self.C_norm = RMSNorm(N, eps=1e-5, **fk)
        if R > 1:
            self.mimo_x = nn.Parameter(torch.full((H, R, P), 1.0 / R, device=device))
            if self.has_z:
                self.mimo_z = nn.Parameter(torch.ones(H, R, P, device=device))
            self.mimo_o = nn.Parameter(torch.full((H, R, P), 1.0 / R, device=device))
        if opts.d_skip:
            self.D = nn.Parameter(torch.ones(H, device=device))
            self.D._no_weight_decay = True
        if self.is_outproj_norm:
            self.norm = RMSNorm(d_inner, eps=1e-5, group_size=P, **fk)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False, **fk)

    def extra_repr(self) -> str:
        return (f"spec={self.spec.name!r}, d_model={self.d_model}, d_inner={self.d_inner}, heads={self.nheads}, "
                f"headdim={self.headdim}, d_state={self.d_state}, mimo_rank={self.mimo_rank}, "
                f"ngroups={self.ngroups}, rule={self.spec.discretization.rule}, is_outproj_norm={self.is_outproj_norm}")

    @property
    def op(self):
        """The generated module of ``kernel_spec`` (``mamba3_forward``, ``mamba3_step``, ``META``)."""
        module = _OPS.get(self._op_key)
        if module is None:
            from mamba3_gen import load

            module = _OPS[self._op_key] = load(self.kernel_spec, self.arch)
        return module

    # -- preprocessing (math doc §1), shared by forward and step -------------------------------------------------
    def _inputs(self, u: torch.Tensor) -> tuple[dict, Optional[torch.Tensor]]:
        """The op's keyword inputs for u (*lead, d_model), lead = (B, L) or (B,), and z (*lead, H, P) for the output
        norm (None when the kernel gates or there is no z)."""
        H, P, N, R, G, S = self.nheads, self.headdim, self.d_state, self.mimo_rank, self.ngroups, self.num_rope_angles
        parts = dict(zip([n for n, _ in self.in_proj_split],
                         torch.split(self.in_proj(u), [w for _, w in self.in_proj_split], dim=-1)))

        def per_head(t):  # (*lead, H) -> (B, H[, L]): the op's per-step layout
            return t.movedim(-1, 1)

        A = torch.clamp(-heavy_tail(parts["dd_A"].float()), max=-self.A_floor)
        dt = F.softplus(parts["dd_dt"] + self.dt_bias)  # fp32: dt_bias is fp32
        kw = {"dt": per_head(dt), "adt": per_head(A if self.spec.inputs.decay == "a" else A * dt)}
        if "trap" in parts:  # the pre-sigmoid logit, or λ itself when the spec's op takes λ
            trap = parts["trap"] if self.spec.inputs.trap == "logit" else torch.sigmoid(parts["trap"].float())
            kw["trap"] = per_head(trap)
        rank_group = (R, G, N) if R > 1 else (G, N)
        kw["k"] = self.B_norm(parts["B"].unflatten(-1, rank_group))
        kw["q"] = self.C_norm(parts["C"].unflatten(-1, rank_group))
        kw["k_bias"] = self.B_bias if R > 1 else self.B_bias[:, 0]
        kw["q_bias"] = self.C_bias if R > 1 else self.C_bias[:, 0]
        kw["v"] = parts["x"].unflatten(-1, (H, P))
        if S:  # one set of raw angles per token, shared by all heads (a stride-0 view, not a copy)
            ang = parts["angles"].float().unsqueeze(-2)
            kw["angles"] = ang.expand(*ang.shape[:-2], H, S)
        if self.spec.options.d_skip:
            kw["D"] = self.D
        z = parts["z"].unflatten(-1, (H, P)) if self.has_z else None
        if R > 1:  # with the output norm, mimo_o=None: the op returns y per rank and _output contracts it
            kw["mimo_v"] = self.mimo_x
            kw["mimo_o"] = None if self.is_outproj_norm else self.mimo_o
        if self.kernel_spec.options.z_gate:
            kw["z"] = z
            if R > 1:
                kw["mimo_z"] = self.mimo_z
            z = None
        return kw, z

    def _output(self, y: torch.Tensor, z: Optional[torch.Tensor], dtype) -> torch.Tensor:
        """out_proj of the SSM output y (*lead, H, P), or of the per-rank y (*lead, R, H, P) with the output norm."""
        if self.is_outproj_norm:
            if self.mimo_rank > 1:  # per rank: norm, gate by silu(z ⊙ mimo_z_r), then contract with mimo_o
                zr = None if z is None else (z.float().unsqueeze(-3) * self.mimo_z.transpose(0, 1)).flatten(-2)
                y = self.norm(y.float().flatten(-2), zr).unflatten(-1, (self.nheads, self.headdim))
                y = (y * self.mimo_o.transpose(0, 1)).sum(-3)  # (H, R, P) -> (R, H, P)
            else:
                y = self.norm(y.flatten(-2), None if z is None else z.flatten(-2)).unflatten(-1, y.shape[-2:])
        return self.out_proj(y.flatten(-2).to(dtype))

    # -- sequences -------------------------------------------------------------------------------------------------
    def forward(self, u: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, inference_params=None):
        """The layer on a batch of sequences: u (B, L, d_model) → (B, L, d_model) in u's dtype.

        cu_seqlens: None, or (NS + 1,) int32/int64 offsets of NS sequences packed along L (B must be 1; the spec
        needs ``options.varlen: true``); each sequence starts from a zero state and never reads another.

        inference_params (mamba_ssm's ``InferenceParams``: ``key_value_memory_dict``, ``seqlen_offset``; needs
        ``layer_idx``): at ``seqlen_offset == 0`` a prefill: the sequences run from zero states and their final
        states (NS rows) are written into this layer's cache entry, a ``Mamba3State`` made on first use (as
        ``allocate_inference_cache``). At ``seqlen_offset > 0`` the tokens continue the cached sequences: one decode
        step per token (or, for L > 1 and a spec with ``options.initial_states``, one forward from the cache).

        Raises:
            InputError: u is not a (B, L, d_model) float tensor; cu_seqlens with B != 1, a spec without varlen, or a
                decode (seqlen_offset > 0); inference_params without layer_idx, with a cache entry of another batch
                size, or on a spec without ``options.final_states``; and the op's own input errors.
        """
        if not isinstance(u, torch.Tensor) or u.dim() != 3 or u.shape[-1] != self.d_model:
            got = f"shape {tuple(u.shape)}" if isinstance(u, torch.Tensor) else type(u).__name__
            raise InputError(f"u must be a tensor of shape (B, L, d_model={self.d_model}); got {got}")
        if not u.is_floating_point():
            raise InputError(f"u has dtype {u.dtype}; expected a float dtype (fp32, bf16, fp16)")
        if cu_seqlens is not None:
            cu_seqlens = check_cu_seqlens(cu_seqlens, u.device)
            if u.shape[0] != 1:
                raise InputError(f"with cu_seqlens the sequences are packed along L: u must be (1, L, d_model="
                                 f"{self.d_model}); got shape {tuple(u.shape)}")
        state = None
        if inference_params is not None:
            _check_inference_params(inference_params)
            NS = u.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
            state = self._cache(inference_params, NS, u.device)
            if inference_params.seqlen_offset > 0:
                if cu_seqlens is not None:
                    raise InputError("cu_seqlens with inference_params.seqlen_offset > 0: a decode continues B "
                                     "sequences of one token each; pass u (B, 1, d_model) without cu_seqlens")
                return self._continue(u, state)
            if not self.spec.options.final_states:
                raise InputError(f"inference_params (a prefill that fills the cache) needs the final states, but "
                                 f"spec {self.spec.name!r} has options.final_states: false")
        out, final = self._sequence(u, cu_seqlens, want_final=state is not None)
        if state is not None:
            _copy_state(state, final)
        return out

    def _sequence(self, u, cu_seqlens, want_final: bool, initial_states=None):
        kw, z = self._inputs(u)
        fwd = self.op.mamba3_forward
        extra = {"cu_seqlens": cu_seqlens, "initial_states": initial_states}

        res = fwd(**kw, **extra, return_final_states=want_final)
        y, final = res if want_final else (res, None)  # y (B, L, R, H, P) per rank with the output norm and R > 1
        return self._output(y, z, u.dtype), final

    def _continue(self, u, state: Mamba3State):
        """Tokens after the cached ones: u (B, L, d_model), the cache updated in place."""
        if u.shape[1] > 1 and self.spec.options.initial_states:
            out, final = self._sequence(u, None, want_final=True, initial_states=state)
            _copy_state(state, final)
            return out
        return torch.stack([self.step(u[:, t], *state)[0] for t in range(u.shape[1])], dim=1)

    # -- decode -----------------------------------------------------------------------------------------------------
    def step(self, u: torch.Tensor, angle_state=None, ssm_state=None, k_state=None, v_state=None, **kwargs):
        """One decode step of B sequences, updating the state in place (official ``Mamba3.step``, math doc §6).

        Args:
            u: (B, d_model) or (B, 1, d_model), any float dtype.
            angle_state, ssm_state, k_state, v_state: the fields of this layer's ``Mamba3State``
                (``allocate_inference_cache``, so ``layer.step(u, *cache)`` works): Θ (B, H, S) fp32 (complex
                state), H (B, H, P, N), the last J tokens' keys (B, [J,] [R,] H, N) and values (B, [J,] H, P) (rules
                with lags), in the spec's state dtype and contiguous. A field the spec does not carry is None.
            kwargs: ignored (the official signature's).

        Returns:
            (out, angle_state, ssm_state, k_state, v_state): out (B, d_model) or (B, 1, d_model) like u, in u's
            dtype, and the same state tensors, now holding the state after this token.

        Raises:
            InputError: u has another shape; grad mode is on while parameters require grad (the decode kernel has no
                backward: use torch.no_grad() or torch.inference_mode()); the state does not fit the spec (the op's
                message names the field and the expected shape and dtype).
        """
        one_token = isinstance(u, torch.Tensor) and u.dim() == 3 and u.shape[1] == 1
        if not isinstance(u, torch.Tensor) or not (u.dim() == 2 or one_token) or u.shape[-1] != self.d_model:
            got = f"shape {tuple(u.shape)}" if isinstance(u, torch.Tensor) else type(u).__name__
            raise InputError(f"u must be one token per sequence, a tensor of shape (B, d_model={self.d_model}) or "
                             f"(B, 1, d_model={self.d_model}); got {got}")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            raise InputError("Mamba3.step runs the decode kernel, which has no backward; call it under "
                             "torch.no_grad() or torch.inference_mode()")
        u2 = u[:, 0] if one_token else u
        state = Mamba3State(angle_state, ssm_state, k_state, v_state)
        kw, z = self._inputs(u2)
        step = self.op.mamba3_step
        y, _ = step(**kw, state=state, inplace=True)  # y (B, R, H, P) per rank with the output norm and R > 1
        out = self._output(y, z, u.dtype)
        return (out.unsqueeze(1) if one_token else out, *state)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: Optional[int] = None, device=None, dtype=None,
                                 **kwargs) -> Mamba3State:
        """The zero decode state of ``batch_size`` sequences: ``Mamba3State(angle, ssm, k, v)`` in the spec's layout
        (README, Tensor shapes): Θ (B, H, S) fp32, H (B, H, P, N), keys (B, [J,] [R,] H, N) and values (B, [J,] H, P)
        in the spec's ``dtypes.state``; a field the spec does not carry is None. ``max_seqlen``, ``dtype`` and
        ``kwargs`` are accepted for mamba_ssm's generation utilities and not used (the state's size does not
        depend on the length; its dtypes are the spec's). ``device``: default in_proj's."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
            raise InputError(f"batch_size must be a positive whole number; got {batch_size!r}")
        device = self.in_proj.weight.device if device is None else device
        return self.op.mamba3_step.zero_state(int(batch_size), self.nheads, device)

    def _cache(self, inference_params, batch: int, device) -> Mamba3State:
        if self.layer_idx is None:
            raise InputError("inference_params needs the layer's layer_idx (its key in key_value_memory_dict); "
                             "construct Mamba3(..., layer_idx=i)")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            cache[self.layer_idx] = self.allocate_inference_cache(batch, device=device)
        state = cache[self.layer_idx]
        if not isinstance(state, Mamba3State) or state.ssm.shape[0] != batch:
            got = tuple(state.ssm.shape) if isinstance(state, Mamba3State) else type(state).__name__
            raise InputError(f"inference_params.key_value_memory_dict[{self.layer_idx}] must be this layer's "
                             f"Mamba3State for {batch} sequences (ssm ({batch}, {self.nheads}, {self.headdim}, "
                             f"{self.d_state})); got {got}")
        return state


def _copy_state(dst: Mamba3State, src: Mamba3State) -> None:
    for a, b in zip(dst, src):
        if a is not None:
            a.copy_(b)


# ----------------------------------------------------------------------------------------------------------------
# float64 reference
# ----------------------------------------------------------------------------------------------------------------
def layer_reference(layer: Mamba3, u: torch.Tensor, cu_seqlens=None, initial_states=None):
    """The forward of ``layer`` recomputed in float64 on the CPU with plain torch: (out (B, L, d_model), final
    Mamba3State), both float64.

    Every step is written out here from the math doc (§1 preprocessing, the output norm), independently of the
    layer's code; the recurrence is the float64 oracle ``mamba3_gen.reference.naive_recurrence`` (§2, §4, the
    spec's rule). For MIMO with the output norm, the per-rank outputs y_r come from the oracle with mimo_o the
    indicator of rank r. The parameters are read as they are and cast to float64, not detached: the result is
    differentiable with respect to u and the layer's parameters (float64 gradients: pass a float64 copy of the
    layer, ``copy.deepcopy(layer).double()``, whose parameters then receive them).

    Raises:
        ValueError: from the oracle, for inputs that do not fit the spec.
    """
    from mamba3_gen.reference import naive_recurrence

    f64 = torch.float64
    p = {name: t.to("cpu", f64) for name, t in layer.state_dict(keep_vars=True).items()}
    spec, kspec = layer.spec, layer.kernel_spec
    H, P, N, R, G, S = layer.nheads, layer.headdim, layer.d_state, layer.mimo_rank, layer.ngroups, layer.num_rope_angles
    Bsz, L, _ = u.shape
    proj = u.to("cpu", f64) @ p["in_proj.weight"].T
    widths = {"z": H * P if spec.options.z_gate else 0, "x": H * P, "B": R * G * N, "C": R * G * N,
              "dd_dt": H, "dd_A": H, "trap": H if spec.has_trap_input else 0, "angles": S}
    cols, at = {}, 0
    for name, w in widths.items():  # official order (math doc §1)
        cols[name], at = proj[..., at:at + w], at + w
    assert at == proj.shape[-1], "in_proj width"

    def rms(x, w, group):
        g = x.unflatten(-1, (-1, group))
        return (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(-2) * w

    dd_A = cols["dd_A"]
    f = torch.where(dd_A >= 0, 1 + dd_A, 1 / (1 - dd_A.clamp(max=0)))  # heavy tail
    A = torch.minimum(-f, torch.tensor(-layer.A_floor, dtype=f64))
    dt = F.softplus(cols["dd_dt"] + p["dt_bias"])
    kw = {"dt": dt.transpose(1, 2), "adt": (A if spec.inputs.decay == "a" else A * dt).transpose(1, 2)}
    if widths["trap"]:
        trap = cols["trap"] if spec.inputs.trap == "logit" else torch.sigmoid(cols["trap"])
        kw["trap"] = trap.transpose(1, 2)
    Bm = rms(cols["B"].reshape(Bsz, L, R, G, N), p["B_norm.weight"], N)
    Cm = rms(cols["C"].reshape(Bsz, L, R, G, N), p["C_norm.weight"], N)
    kw["k"], kw["q"] = (Bm, Cm) if R > 1 else (Bm[:, :, 0], Cm[:, :, 0])
    kw["k_bias"], kw["q_bias"] = (p["B_bias"], p["C_bias"]) if R > 1 else (p["B_bias"][:, 0], p["C_bias"][:, 0])
    kw["v"] = cols["x"].reshape(Bsz, L, H, P)
    if S:
        kw["angles"] = cols["angles"][:, :, None, :].expand(Bsz, L, H, S)
    if spec.options.d_skip:
        kw["D"] = p["D"]
    z = cols["z"].reshape(Bsz, L, H, P) if spec.options.z_gate else None
    if R > 1:
        kw["mimo_v"] = p["mimo_x"]
    if kspec.options.z_gate:
        kw["z"] = z
        if R > 1:
            kw["mimo_z"] = p["mimo_z"]
    extra = {"cu_seqlens": cu_seqlens, "initial_states": initial_states}

    if not layer.is_outproj_norm:
        y, final = naive_recurrence(kspec, **kw, mimo_o=p["mimo_o"] if R > 1 else None, **extra)
    elif R == 1:
        y, final = naive_recurrence(kspec, **kw, **extra)
        y = rms(y.reshape(Bsz, L, H * P), p["norm.weight"], P)
        y = y * F.silu(z.reshape(Bsz, L, H * P)) if z is not None else y
    else:
        ys = []
        for r in range(R):
            eye = torch.zeros(H, R, P, dtype=f64)
            eye[:, r] = 1
            y_r, fin_r = naive_recurrence(kspec, **kw, mimo_o=eye, **extra)
            final = fin_r if r == 0 else final
            y_r = rms(y_r.reshape(Bsz, L, H * P), p["norm.weight"], P).reshape(Bsz, L, H, P)
            if z is not None:
                y_r = y_r * F.silu(z * p["mimo_z"][:, r])
            ys.append(y_r * p["mimo_o"][:, r])
        y = sum(ys)
    out = y.reshape(Bsz, L, H * P) @ p["out_proj.weight"].T
    return out, final
