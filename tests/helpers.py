"""Helpers shared by the kernel tests: building generated modules for throw-away specs, running them in the common
calling convention, and comparing their results with the float64 oracles.

The spec builder, golden cases and SSD formula come from tests/cases.py, shared with the reference tests, so the
kernels are checked against exactly the cases the references were checked on.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mamba3_gen.reference import max_abs, rel_err
from mamba3_gen.runtime.state import Mamba3State
from mamba3_gen.spec.loader import load_spec, spec_hash
from mamba3_gen.spec.model import Spec
from tests.cases import (  # noqa: F401  (re-exported for the kernel tests)
    GOLDEN,
    GOLDEN_DIR,
    GOLDEN_TOL,
    _TIME_DIM,
    angle_diff,
    golden_case,
    golden_errors,
    make_spec,
    pack_batch,
    ssd_head,
    state_slice,
    time_slice,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SPECS_DIR = REPO_ROOT / "specs"
SHIPPED_SPECS = sorted(SPECS_DIR.glob("*.yaml"))
STATE_FIELDS = ("angle", "ssm", "k", "v")


# ------------------------------------------------------------------------------------------------------------------
# specs
# ------------------------------------------------------------------------------------------------------------------
def respec(spec: Spec, **sections) -> Spec:
    """A copy of `spec` with some sections partly replaced, e.g. respec(s, dtypes={"compute": "fp32"})."""
    doc = spec.model_dump(mode="json", by_alias=True)
    for section, values in sections.items():
        if isinstance(values, dict):
            doc[section] = {**doc[section], **values}
        else:
            doc[section] = values
    return Spec.model_validate(doc)


def env_spec() -> Optional[Spec]:
    """The spec named by MAMBA3_GEN_SPEC (set by `mamba3-gen test SPEC`), or None."""
    path = os.environ.get("MAMBA3_GEN_SPEC")
    return load_spec(path) if path else None


def env_examples() -> Optional[int]:
    """The hypothesis max_examples override from MAMBA3_GEN_EXAMPLES, or None."""
    val = os.environ.get("MAMBA3_GEN_EXAMPLES")
    return int(val) if val else None


# ------------------------------------------------------------------------------------------------------------------
# building generated modules
# ------------------------------------------------------------------------------------------------------------------
class KernelCache:
    """Generated modules for specs, built once per spec (keyed by the spec hash and the arch) under `root`.

    Each spec gets its own output directory, so specs sharing a name (all test specs are called "ref_test") never
    collide; the spec is written as JSON (which is YAML) and goes through the normal loader and build.
    """

    def __init__(self, root: Path, arch: str):
        self.root = Path(root)
        self.arch = arch
        self._modules: dict[str, object] = {}

    def __call__(self, spec: Spec):
        from mamba3_gen.backends.triton.build import load_module

        key = spec_hash(spec)
        if key not in self._modules:
            d = self.root / f"{self.arch}_{key[:20]}"
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"{spec.name}.yaml"
            path.write_text(json.dumps(spec.model_dump(mode="json", by_alias=True), indent=1))
            self._modules[key] = load_module(path, d / "generated", arch=self.arch)
        return self._modules[key]


def run_op(module, spec: Spec, kw: dict, final: Optional[bool] = None):
    """Call the generated op with the inputs of make_inputs; returns (out, Mamba3State or None)."""
    final = spec.options.final_states if final is None else final
    res = module.mamba3_forward(**kw, return_final_states=final)
    if kw["v"].is_cuda:
        torch.cuda.synchronize()  # a fault surfaces in the example that caused it, not in a later one
    return res if final else (res, None)


def to_device(kw: dict, device) -> dict:
    def mv(x):
        if x is None:
            return None
        if isinstance(x, Mamba3State):
            return Mamba3State(*[mv(f) for f in x])
        return x.to(device) if isinstance(x, torch.Tensor) else x

    return {k: mv(v) for k, v in kw.items()}


# ------------------------------------------------------------------------------------------------------------------
# comparisons
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tol:
    """‖got − ref‖ ≤ rel·‖ref‖ (+ atol·√numel, only so that an all-zero reference compares) and
    max|got − ref| ≤ rel·max|ref| + atol; an angle is compared as a circular (wrapped) max error ≤ rel·2π + atol."""

    rel: float
    atol: float = 1e-5
    max_rel: Optional[float] = None  # max-abs factor; defaults to rel

    def check(self, what: str, got, ref) -> Optional[str]:
        got = got.detach().to("cpu", torch.float64)
        ref = ref.detach().to("cpu", torch.float64)
        if got.shape != ref.shape:
            return f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
        if not torch.isfinite(got).all():
            return f"{what}: {int((~torch.isfinite(got)).sum())} non-finite values"
        if got.numel() == 0:
            return None
        norm_err = torch.linalg.vector_norm(got - ref).item()
        norm_ref = torch.linalg.vector_norm(ref).item()
        mx = max_abs(got, ref)
        ref_max = ref.abs().max().item()
        max_rel = self.rel if self.max_rel is None else self.max_rel
        bad = []
        if norm_err > self.rel * norm_ref + self.atol * math.sqrt(got.numel()):
            bad.append(f"rel err {rel_err(got, ref):.3e} > {self.rel:g}")
        if mx > max_rel * ref_max + self.atol:
            bad.append(f"max abs err {mx:.3e} > {max_rel:g}·{ref_max:.3e} + {self.atol:g}")
        return f"{what}: " + ", ".join(bad) if bad else None

    def check_angle(self, what: str, got, ref) -> Optional[str]:
        if got.shape != ref.shape:
            return f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
        err = angle_diff(got.cpu(), ref.cpu())
        lim = self.rel * 2 * math.pi + self.atol
        return None if err <= lim else f"{what}: circular max err {err:.3e} > {lim:.3e}"


def compare(got: tuple, ref: tuple, tol: Tol, what: str = "") -> list[str]:
    """Problems (empty if none) comparing (out, state) with a reference (out, state); a state of None skips states."""
    (out, st), (rout, rst) = got, ref
    prefix = f"{what}: " if what else ""
    problems = [tol.check(prefix + "out", out, rout)]
    if st is not None and rst is not None:
        for f in STATE_FIELDS:
            a, b = getattr(st, f), getattr(rst, f)
            if (a is None) != (b is None):
                problems.append(f"{prefix}state.{f}: present in {'kernel' if a is not None else 'reference'} only")
            elif a is not None:
                problems.append(tol.check_angle(prefix + "state.angle", a, b) if f == "angle"
                                else tol.check(f"{prefix}state.{f}", a, b))
    return [p for p in problems if p]


def assert_matches(got: tuple, ref: tuple, tol: Tol, what: str = "") -> None:
    problems = compare(got, ref, tol, what)
    assert not problems, "\n".join(problems)


def split_varlen(kw: dict) -> list[dict]:
    """The single-sequence inputs of each sequence of a varlen pack."""
    cu = kw["cu_seqlens"].tolist()
    base = {k: v for k, v in kw.items() if k != "cu_seqlens"}
    parts = []
    for i, (s, e) in enumerate(zip(cu, cu[1:])):
        one = time_slice(base, s, e)
        one["initial_states"] = state_slice(kw.get("initial_states"), i)
        parts.append(one)
    return parts
