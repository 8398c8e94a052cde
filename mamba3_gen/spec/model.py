"""Typed model of a Mamba-3 layer spec (the YAML a user writes).

Every field a user can write lives here, with its default and its meaning; cross-field rules that need no device
knowledge are checked by validators here, device limits (shared memory) are checked later in the backend.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DType = Literal["bf16", "fp16", "fp32"]


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must never be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Discretization(_Strict):
    rule: Literal["exp_euler", "exp_trapezoidal"] = Field(
        "exp_trapezoidal",
        description="exp_euler: Mamba-2/SSD rule, one input term. exp_trapezoidal: Mamba-3 rule, current and previous token.",
    )
    lambda_: Literal["data", "constant"] = Field(
        "data",
        alias="lambda",
        description="exp_trapezoidal only. data: λ_t = σ(trap_t) from the trap input; constant: λ = lambda_value.",
    )
    lambda_value: float | None = Field(
        None, description="The constant λ in [0, 1] when lambda is 'constant' (0.5 is the classic trapezoid)."
    )

    @model_validator(mode="after")
    def _check_lambda(self) -> "Discretization":
        # Messages start with the offending field ("lambda_value: ...", relative to this section) so that the loader can
        # point at its line; every message says what to do.
        if self.rule == "exp_euler":
            if self.lambda_ != "data":
                raise ValueError(
                    "lambda: exp_euler has no λ (it is the λ=1 rule); try removing 'lambda', or rule: exp_trapezoidal"
                )
            if self.lambda_value is not None:
                raise ValueError(
                    "lambda_value: exp_euler has no λ (it is the λ=1 rule); try removing 'lambda_value', "
                    "or rule: exp_trapezoidal"
                )
        elif self.lambda_ == "constant":
            if self.lambda_value is None:
                raise ValueError("lambda: 'constant' needs lambda_value in [0, 1]; try adding lambda_value: 0.5")
            if not 0.0 <= self.lambda_value <= 1.0:
                raise ValueError(f"lambda_value: {self.lambda_value} is outside [0, 1]; try lambda_value: 0.5")
        elif self.lambda_value is not None:
            raise ValueError(
                "lambda_value: only read when lambda: constant; try removing lambda_value, or setting lambda: constant"
            )
        return self


class State(_Strict):
    kind: Literal["real", "complex"] = Field(
        "complex", description="real: no rotation (Θ is not carried). complex: rotary state, pairs of dims rotated by Θ."
    )
    rope_fraction: Literal[0.5, 1.0] = Field(
        0.5,
        description="complex only (ignored for a real state): fraction of the N state dims that are rotated, "
        "0.5 or 1.0 (S = N·fraction/2 angles).",
    )
    rotation: Literal["pairwise", "halved"] = Field(
        "pairwise",
        description="complex only (ignored for a real state): pairwise rotates dims (2j, 2j+1) as the official SISO; "
        "halved rotates (j, j+N/2) as the official MIMO.",
    )


MAX_CHUNK_ROWS = 256  # C_s·R: rows of one chunk tile (every rank of every token of a chunk is a row)


class Dims(_Strict):
    d_state: int = Field(128, ge=4, description="N, the state (Q/K) dim; even, at least 4.")
    headdim: int = Field(64, ge=4, description="P, the value dim of a head; at least 4.")
    mimo_rank: int = Field(1, ge=1, le=8, description="R, the MIMO rank, 1..8; 1 is SISO.")
    ngroups: int = Field(1, ge=1, description="G, the number of B/C (K/Q) groups; heads must be a multiple of it.")
    chunk_size: int = Field(
        64,
        ge=1,
        description="C_s, tokens per chunk of the chunked algorithm; a power of two, with chunk_size·mimo_rank <= "
        f"{MAX_CHUNK_ROWS} (64/R is the usual choice).",
    )

    @model_validator(mode="after")
    def _check_chunk_rows(self) -> "Dims":
        c, r = self.chunk_size, self.mimo_rank
        if c * r > MAX_CHUNK_ROWS:
            raise ValueError(
                f"chunk_size: chunk_size*mimo_rank={c * r} rows exceed {MAX_CHUNK_ROWS} per chunk tile; "
                f"try chunk_size={max(1, 64 // r)}"
            )
        return self


class DTypes(_Strict):
    input: Literal["bf16", "fp32"] = Field("bf16", description="dtype of Q, K, V, Z and the output.")
    compute: Literal["tf32", "bf16", "fp32"] = Field(
        "tf32",
        description="operand precision of the tensor-core products (accumulation is always fp32): "
        "fp32 (exact, slowest), tf32 (default), bf16 (fastest, least accurate).",
    )
    state: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="dtype of the carried state H, k̂ and v (initial/final states of the forward, the decode state); "
        "Θ is always fp32. Arithmetic is fp32 either way: bf16 halves the decode's state traffic.",
    )


class Inputs(_Strict):
    """How two per-token inputs are encoded: the official kernels disagree, so the spec says which one it takes."""

    trap: Literal["logit", "lambda"] = Field(
        "logit",
        description="logit: the trap input is the pre-sigmoid logit, λ = σ(trap) (official prefill and Triton step); "
        "lambda: it is λ itself, in [0, 1] (official CuTe step). Read only with discretization.lambda: data.",
    )
    decay: Literal["a_dt", "a"] = Field(
        "a_dt",
        description="a_dt: the decay input is A·Δ (official prefill and Triton step); a: it is A alone and the kernel "
        "multiplies it by Δ (official CuTe step).",
    )


class Options(_Strict):
    d_skip: bool = Field(True, description="add D[h]·v (the skip connection).")
    z_gate: bool = Field(True, description="gate the output with silu(z).")
    initial_states: bool = Field(False, description="accept initial states (Θ, H, k̂, v) of a previous segment.")
    final_states: bool = Field(True, description="can return the final states (Θ, H, k̂, v).")
    varlen: bool = Field(False, description="accept cu_seqlens (packed sequences, batch 1).")


class Spec(_Strict):
    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]*$", description="a Python identifier: generated/<name>/ is written.")
    discretization: Discretization = Discretization()
    state: State = State()
    dims: Dims = Dims()
    dtypes: DTypes = DTypes()
    inputs: Inputs = Inputs()
    options: Options = Options()

    @model_validator(mode="after")
    def _check_dims(self) -> "Spec":
        n, c, r = self.dims.d_state, self.dims.chunk_size, self.dims.mimo_rank
        if n % 2:
            raise ValueError(f"dims.d_state: N={n} is odd (the state is split into two halves); try d_state: {n + 1}")
        if c & (c - 1):
            lower = 1 << (c.bit_length() - 1)
            upper = lower * 2
            best = upper if upper * r <= MAX_CHUNK_ROWS and upper - c < c - lower else lower
            raise ValueError(f"dims.chunk_size: {c} is not a power of two; try chunk_size: {best}")
        return self

    # Derived quantities, used by the lowering and printed by `mamba3-gen check`.
    @property
    def is_complex(self) -> bool:
        return self.state.kind == "complex"

    @property
    def num_angles(self) -> int:
        """S: rotated pairs per token (0 for a real state)."""
        if not self.is_complex:
            return 0
        split = int(self.dims.d_state * self.state.rope_fraction)
        split -= split % 2
        return split // 2

    @property
    def has_trap_input(self) -> bool:
        return self.discretization.rule == "exp_trapezoidal" and self.discretization.lambda_ == "data"

    @property
    def carries_prev_token(self) -> bool:
        """Whether the state carries the previous token's k̂ and v: rules with a lagged input term. Decided by the
        rule, not by λ, so a constant λ = 1 (whose lagged weight is 0) keeps the same state layout as any other λ."""
        return self.discretization.rule != "exp_euler"
