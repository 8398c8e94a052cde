"""Typed model of a Mamba-3 layer spec (the YAML a user writes).

Every field a user can write lives here, with its default and its meaning; cross-field rules that need no device
knowledge are checked by validators here, device limits (shared memory) are checked later in the backend.
"""
from __future__ import annotations

import functools
import keyword
import re
import sys
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mamba3_gen.spec.rules import CUSTOM, MAX_LAGS, PRESETS, Rule, make_rule, preset_rule

DType = Literal["bf16", "fp16", "fp32"]


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must never be silently ignored. Strict types: 'd_state: "128"' or
    # 'd_state: true' is refused as a string or a boolean, never read as 128 or 1.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


RuleName = Literal[tuple(PRESETS) + (CUSTOM,)]  # type: ignore[valid-type]


class Discretization(_Strict):
    rule: RuleName = Field(
        "exp_trapezoidal",
        description="a preset (" + ", ".join(PRESETS) + ") or 'custom' (then 'weights', and optionally "
        "'log_decay', give the rule as formulas). `mamba3-gen check` prints every rule's formulas.",
    )
    lambda_: Literal["data", "constant"] = Field(
        "data",
        alias="lambda",
        description="rules whose formulas use lam only (written for a rule without lam, it is refused). "
        "data: λ_t = σ(trap_t) from the trap input; constant: λ = lambda_value.",
    )
    lambda_value: float | None = Field(
        None, description="The constant λ in [0, 1] when lambda is 'constant' (0.5 is the classic trapezoid)."
    )
    log_decay: str | None = Field(
        None,
        description="custom rules: a_t, the log of step t's decay, as a formula over dt, adt, lam (default adt).",
    )
    weights: list[str] | None = Field(
        None,
        description="custom rules: c_0(t), c_1(t), ... (1 to 4 formulas over dt, adt, lam): c_j is the weight of "
        "token t-j's input in step t: H_t = exp(a_t) H_{t-1} + Σ_j c_j(t) v_{t-j} k_{t-j}ᵀ.",
    )

    @model_validator(mode="before")
    @classmethod
    def _formula_field_types(cls, data):
        # A formula field of the wrong YAML type gets a message naming it, the type found and the YAML to write
        # (pydantic's would say "input should be a valid list"); raised here, relative to the section, so that
        # weights[j] points at its item.
        if not isinstance(data, dict):
            return data  # not a mapping: pydantic's section message
        weights = data.get("weights")
        if weights is not None and not isinstance(weights, list):
            raise ValueError(f"weights: expected a list of 1 to {MAX_LAGS + 1} formulas (c_0 for token t, c_1 for "
                             f"token t-1, ...), got {_type_of(weights)}; try weights: {_weights_example(weights)}")
        for j, item in enumerate(weights or ()):
            if item is None or isinstance(item, (list, dict)):  # other scalars: the loader's "write it in quotes"
                raise ValueError(f"weights[{j}]: expected a formula (a string such as 'lam * dt'), got "
                                 f"{_type_of(item)}; try one formula per item, quoted: weights: ['dt']")
        log_decay = data.get("log_decay")
        if log_decay is not None and not _is_formula_scalar(log_decay):
            raise ValueError(f"log_decay: expected a formula (a string such as 'adt - 0.1 * dt'), got "
                             f"{_type_of(log_decay)}; try log_decay: 'adt'")
        return data

    @field_validator("log_decay", mode="before")
    @classmethod
    def _number_as_formula(cls, value):
        # a bare number is a formula too (log_decay: 0, a constant weight 0.5); YAML reads it as a number
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return repr(value)
        return value

    @field_validator("weights", mode="before")
    @classmethod
    def _numbers_as_formulas(cls, value):
        if isinstance(value, list):
            return [cls._number_as_formula(v) for v in value]
        return value

    def resolved_rule(self) -> Rule:
        """The rule this section describes (a preset, or the custom formulas), before λ is resolved."""
        if self.rule == CUSTOM:
            return make_rule(CUSTOM, self.log_decay if self.log_decay is not None else "adt", self.weights)
        return preset_rule(self.rule)

    @model_validator(mode="after")
    def _check_rule(self) -> "Discretization":
        # Messages start with the offending field ("lambda_value: ...", relative to this section) so that the loader can
        # point at its line; every message says what to do.
        if self.rule == CUSTOM:
            if self.weights is None:
                raise ValueError("weights: rule: custom needs its weights as formulas; try weights: ['lam * dt', "
                                 "'(1 - lam) * dt * exp(adt)'] or a preset rule (" + ", ".join(PRESETS) + ")")
        else:
            for key, val in (("weights", self.weights), ("log_decay", self.log_decay)):
                if val is not None:
                    raise ValueError(f"{key}: only read with rule: custom (the preset {self.rule} has its own "
                                     f"formulas); try rule: custom, or removing '{key}'")
        rule = self.resolved_rule()  # FormulaError (a ValueError) names weights[j] or log_decay
        if not rule.uses_lambda:
            # 'lambda: data' is the default, so the value alone cannot tell that a user wrote it: what was written
            # is model_fields_set. A section with every field written is a dump (model_dump of a Spec, re-read
            # by resolve_spec, a package's spec.json, the CuTe AOT's temporary YAML), not a user's choice.
            written = _written(self)
            if self.lambda_ != "data" or "lambda_" in written:
                raise ValueError(f"lambda: the rule {self.rule} does not use λ (its formulas have no lam); "
                                 f"try removing 'lambda', or {_with_lambda(self.rule)}")
            if self.lambda_value is not None or "lambda_value" in written:
                raise ValueError(f"lambda_value: the rule {self.rule} does not use λ (its formulas have no lam); "
                                 f"try removing 'lambda_value', or {_with_lambda(self.rule)}")
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


def _written(section: BaseModel) -> set:
    """The fields a user wrote in a section: none when every field is set (a dump of a Spec re-read)."""
    fields = section.model_fields_set
    return set() if fields == set(type(section).model_fields) else fields


def _with_lambda(rule: str) -> str:
    """What to write for a rule that reads λ instead of ``rule``."""
    return "weights that use lam, e.g. ['lam * dt', '(1 - lam) * dt * exp(adt)']" if rule == CUSTOM else (
        "rule: exp_trapezoidal")


def _is_formula_scalar(value) -> bool:
    """A string, or a bare number (a formula too); not a boolean, list or mapping."""
    return isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _type_of(value) -> str:
    """The YAML type of a wrongly typed formula field, for a message: "'dt' (a string)", "a mapping"."""
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a boolean)"
    if isinstance(value, str):
        return f"'{value}' (a string)"
    if isinstance(value, (int, float)):
        return f"{value!r} (a number)"
    if isinstance(value, dict):
        return "a mapping" + (f" (keys {', '.join(map(str, list(value)[:4]))})" if value else "")
    if isinstance(value, list):
        return "a list"
    return "nothing (null)" if value is None else repr(value)  # loader.Foreign names itself


def _weights_example(value) -> str:
    """The YAML list a non-list ``weights`` most likely meant: one formula in a list, or a mapping's values."""
    items = list(value.values()) if isinstance(value, dict) else [value]
    if items and len(items) <= MAX_LAGS + 1 and all(_is_formula_scalar(v) for v in items):
        return "[" + ", ".join(f"'{v}'" for v in items) + "]"
    return "['lam * dt', '(1 - lam) * dt * exp(adt)']"


class State(_Strict):
    kind: Literal["real", "complex"] = Field(
        "complex", description="real: no rotation (Θ is not carried). complex: rotary state, pairs of dims rotated by Θ."
    )
    rope_fraction: Literal[0.5, 1.0] = Field(
        0.5,
        description="complex only (written on a real state: refused): fraction of the N state dims that are "
        "rotated, 0.5 or 1.0 (S = N·fraction/2 angles).",
    )
    rotation: Literal["pairwise", "halved"] = Field(
        "pairwise",
        description="complex only (written on a real state: refused): pairwise rotates dims (2j, 2j+1) as the "
        "official SISO; halved rotates (j, j+N/2) as the official MIMO.",
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

    # One-field checks are field validators, so a file with several bad dims gets every problem in one report.
    @field_validator("d_state")
    @classmethod
    def _even_state(cls, n: int) -> int:
        if n % 2:
            raise ValueError(f"N={n} is odd (the state is split into two halves); try d_state: {n + 1}")
        return n

    @field_validator("chunk_size")
    @classmethod
    def _pow2_chunk(cls, c: int, info) -> int:
        if c >= 1 and c & (c - 1):
            r = info.data.get("mimo_rank", 1)
            lower = 1 << (c.bit_length() - 1)
            upper = lower * 2
            best = upper if upper * r <= MAX_CHUNK_ROWS and upper - c < c - lower else lower
            raise ValueError(f"{c} is not a power of two; try chunk_size: {best}")
        return c

    @model_validator(mode="after")
    def _check_chunk_rows(self) -> "Dims":
        c, r = self.chunk_size, self.mimo_rank
        if c * r > MAX_CHUNK_ROWS:
            raise ValueError(
                f"chunk_size: chunk_size*mimo_rank={c * r} rows exceed {MAX_CHUNK_ROWS} per chunk tile; "
                f"try chunk_size: {max(1, 64 // r)}"
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
        "lambda: it is λ itself, in [0, 1] (official CuTe step). Read only with "
        "discretization.lambda: data on a rule that uses λ (written otherwise: refused).",
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


MAX_NAME = 64  # characters of spec.name: it becomes a folder, a module and part of a custom op's name

# Top-level modules a generated package must not shadow (generated/<name>/ is imported as <name> when generated/
# is on sys.path): the standard library, builtins, mamba3-gen's own packages and folders, and the import names of every
# distribution in the closure of its requirements (transitive ones included: cuda from cuda-python, which
# nvidia-cutlass-dsl pulls in; yaml; fsspec and pygments; shellingham). A fixed list, so that a spec is valid or not the
# same way everywhere; dependency_module_names() derives the closure from the installed metadata, is added to it (a
# newer dependency that brings a new module is still refused), and tests/test_spec_limits.py checks that the fixed
# list covers it. Packages installed here that mamba3-gen does not require play no part.
RESERVED_NAMES = frozenset(sys.stdlib_module_names) | frozenset(sys.builtin_module_names) | {
    "mamba3_gen", "generated", "tests", "benchmarks", "specs", "templates", "docs",
    # direct requirements
    "torch", "torchgen", "functorch", "triton", "numpy", "pydantic", "ruamel", "sympy", "isympy", "networkx", "jinja2",
    "typer", "platformdirs", "filelock", "cutlass", "nvidia", "nvidia_cutlass_dsl",
    # their requirements, transitively (pydantic, sympy, jinja2, typer and rich, torch, nvidia-cutlass-dsl)
    "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions", "mpmath", "markupsafe", "click",
    "rich", "shellingham", "pygments", "markdown_it", "mdurl", "annotated_doc", "fsspec", "setuptools",
    "_distutils_hack", "pkg_resources", "cuda", "cuda_bindings", "cuda_core", "cuda_pathfinder", "yaml",
    "optree", "opt_einsum",
    # the test extra and the packaging tools
    "pytest", "_pytest", "pluggy", "iniconfig", "packaging", "hypothesis", "sortedcontainers", "attr", "attrs",
    "pip", "wheel",
}


def _dist_key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.lru_cache(maxsize=None)
def dependency_module_names(root: str = "mamba3-gen") -> frozenset[str]:
    """The top-level import names of every installed distribution in the closure of `root`'s requirements (extras
    and requirements whose environment markers do not hold here left out). Empty when `root` is not installed."""
    from importlib import metadata
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging comes with pip and setuptools
        Requirement = None
    modules_of: dict[str, set[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(_dist_key(dist), set()).add(module)
    seen: set[str] = set()
    todo = [root]
    while todo:
        dist = todo.pop()
        if _dist_key(dist) in seen:
            continue
        seen.add(_dist_key(dist))
        try:
            requirements = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requirements:
            if Requirement is not None:
                req = Requirement(text)
                if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                    continue
                todo.append(req.name)
            elif ";" not in text:
                todo.append(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", text.strip()).group(0))
    seen.discard(_dist_key(root))
    return frozenset(m for dist in seen for m in modules_of.get(dist, ()) if m.isidentifier())


def is_reserved_name(name: str) -> bool:
    return name in RESERVED_NAMES or name in dependency_module_names()


class Spec(_Strict):
    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]*$",
                      description=f"a Python identifier: generated/<name>/ is written (at most {MAX_NAME} characters, "
                      "not a keyword, not the name of a standard or dependency module such as os or torch).")
    discretization: Discretization = Discretization()
    state: State = State()
    dims: Dims = Dims()
    dtypes: DTypes = DTypes()
    inputs: Inputs = Inputs()
    options: Options = Options()

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        better = f"{name[:MAX_NAME - 6]}_layer" if len(name) < MAX_NAME else name[:MAX_NAME - 6].rstrip("_") + "_layer"
        if len(name) > MAX_NAME:
            raise ValueError(f"{len(name)} characters is too long (at most {MAX_NAME}: the name becomes a folder, a "
                             f"module and an op name); try name: {better}")
        if keyword.iskeyword(name):  # soft keywords (match, case, type) are valid module names
            raise ValueError(f"'{name}' is a Python keyword, so generated.{name} cannot be imported; try name: {better}")
        if is_reserved_name(name):
            raise ValueError(f"'{name}' is the name of the importable module {name}, which the generated package "
                             f"would shadow (or be shadowed by); try name: {better}")
        return name

    @model_validator(mode="after")
    def _check_unread_fields(self) -> "Spec":
        # A field written where this spec never reads it is refused, as lambda on a rule without λ is (a section
        # with every field written is a dump, not a user's choice: see Discretization._check_rule). Which fields are
        # unread is unread_fields' one list; the discretization's own are refused by its validator, with its words.
        for dotted in self.unread_fields():
            section, key = dotted.split(".")
            if section == "discretization" or key not in _written(getattr(self, section)):
                continue
            if section == "state":
                raise ValueError(f"state.{key}: only read for a complex state (kind: real rotates nothing); "
                                 f"try removing '{key}', or kind: complex")
            why = ("its λ is constant (lambda: constant)" if self.rule.uses_lambda
                   else f"the rule {self.discretization.rule} does not use λ")
            raise ValueError(f"inputs.{key}: only read when the layer takes λ per token, and {why}; "
                             f"try removing '{key}'")
        return self

    def unread_fields(self) -> list[str]:
        """Dotted keys of the fields this spec never reads (λ settings of a rule without lam, a preset's formula
        fields, the rotation of a real state, the trap encoding without a per-token λ): `check` does not print
        them, and `--set` refuses to override them."""
        disc = self.discretization
        unread = []
        if not self.rule.uses_lambda:
            unread += ["discretization.lambda", "discretization.lambda_value"]
        elif disc.lambda_ == "data":
            unread.append("discretization.lambda_value")
        if disc.rule != "custom":
            unread += ["discretization.log_decay", "discretization.weights"]
        if not self.is_complex:
            unread += ["state.rope_fraction", "state.rotation"]
        if not self.has_trap_input:
            unread.append("inputs.trap")
        return unread

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
    def rule(self) -> Rule:
        """The discretization rule (preset or custom formulas)."""
        return self.discretization.resolved_rule()

    @property
    def lags(self) -> int:
        """J: how many previous tokens a step reads (0 for exp_euler and zoh, 1 for exp_trapezoidal); the state
        carries their k̂ and v."""
        return self.rule.lags

    @property
    def has_trap_input(self) -> bool:
        """Whether the layer reads λ from a per-token trap input: the rule uses λ and λ is data."""
        return self.rule.uses_lambda and self.discretization.lambda_ == "data"
