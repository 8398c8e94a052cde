"""Triton backend: spec -> lowered quantities + stage plan -> rendered kernel source under generated/<name>/.

Rendering is pure (no clock, no environment), so a build is byte-for-byte reproducible; each file's header names
the spec hash, the generator version and a hash of the templates.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2

from mamba3_gen.backends.templating import template_env, templates_hash
from mamba3_gen.backends.device import DEFAULT_TARGET, Target, get_target
from mamba3_gen.backends.printing import input_codes, print_prologue, triton_printer
from mamba3_gen.backends.triton.resources import (ChunkedConfig, KernelConfig, StepConfig, choose_chunked_configs,
                                                   choose_configs, choose_step_config, chunk_states_dtype)
from mamba3_gen.graph.dataflow import PREPASS_VARIANTS, VARIANTS, KernelPlan, plan_kernel
from mamba3_gen.lower.derivatives import prologue_derivatives
from mamba3_gen.lower.lowering import Lowered, lower_discretization
from mamba3_gen.spec.loader import load_spec, spec_hash
from mamba3_gen.spec.model import Spec
from mamba3_gen.version import __version__
from mamba3_gen.errors import BuildError  # noqa: F401  (re-exported: it used to be defined here)
from mamba3_gen.paths import default_out_dir, templates_dir

REPO_ROOT = Path(__file__).resolve().parents[3]
TEMPLATE_DIR = templates_dir("triton")  # the checkout's templates/, or the copy inside an installed wheel
GENERATED_DIR = REPO_ROOT / "generated"  # the checkout's committed examples; build() defaults to default_out_dir()
KERNEL_NAME = "mamba3_fwd_kernel"
PREP_KERNEL_NAME = "mamba3_rotate_prep_kernel"  # complex states: Q̂, K̂ per head (biased, rotated) for PREPPED
STATES_KERNEL_NAME = "mamba3_chunk_states_kernel"  # the chunk-parallel forward: per-chunk entering states
OUT_KERNEL_NAME = "mamba3_chunk_out_kernel"  # ... and the outputs of every chunk from them
STEP_KERNEL_NAME = "mamba3_step_kernel"
# the files of one spec's package, in the order render() returns them (tests and docs read this list)
PACKAGE_FILES = ("__init__.py", "fwd.py", "bwd.py", "step.py", "spec.json", "step_cute.py")


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def template_hash() -> str:
    return templates_hash(TEMPLATE_DIR)


@dataclass
class Lowering:
    """Everything derived from a spec before rendering: one-way input of the renderer."""

    spec: Spec
    lowered: Lowered
    plan: KernelPlan
    target: Target
    configs: list[KernelConfig]
    step_config: StepConfig | None = None
    plans: dict[str, KernelPlan] | None = None  # every kernel variant's plan: fused, states, out
    chunked_configs: dict[str, list[ChunkedConfig]] | None = None

    @property
    def dims(self) -> dict:
        d = self.spec.dims
        return {
            "N": d.d_state, "N2": d.d_state // 2, "BN2": max(16, _next_pow2(d.d_state // 2)), "BN": _next_pow2(d.d_state),
            "P": d.headdim, "BP": max(16, _next_pow2(d.headdim)), "R": d.mimo_rank, "C": d.chunk_size,
            "S": self.spec.num_angles,
        }

    def meta(self) -> dict:
        s = self.spec
        return {
            "name": s.name, "spec_hash": spec_hash(s), "generator": __version__, **self.dims,
            "G": s.dims.ngroups, "has_trap": self.lowered.lam_source == "data", "lambda": self.lowered.lam_source,
            "J": self.lowered.lags, "d_skip": s.options.d_skip, "z_gate": s.options.z_gate,
            "initial_states": s.options.initial_states, "final_states": s.options.final_states,
            "varlen": s.options.varlen, "input_dtype": s.dtypes.input, "compute_dtype": s.dtypes.compute,
            "state_dtype": s.dtypes.state, "trap_input": s.inputs.trap, "decay_input": s.inputs.decay,
            "arch": self.target.arch, "template_hash": template_hash()[:12],
            "chunk_states_dtype": chunk_states_dtype(s), "backward_refusal": self.lowered.backward_refusal,
            "rotation": s.state.rotation if s.state.kind == "complex" else None,
        }


def lower(spec: Spec, arch: str = DEFAULT_TARGET) -> Lowering:
    target = get_target(arch)
    lowered = lower_discretization(spec)
    plan = plan_kernel(spec, lowered)
    d = spec.dims
    rows = d.chunk_size * d.mimo_rank
    if rows & (rows - 1):
        raise BuildError(f"dims.mimo_rank: R={d.mimo_rank} makes chunk rows C·R={rows}, not a power of two; "
                         "try mimo_rank 1, 2, 4 or 8")
    if rows < target.min_dot_k:
        raise BuildError(f"dims.chunk_size: chunk_size·mimo_rank={rows} is below {target.min_dot_k}, the smallest "
                         f"tensor-core dot on {target.name}; try chunk_size: {-(-target.min_dot_k // d.mimo_rank)}, or --arch interpreter for CPU runs")
    low = Lowering(spec, lowered, plan, target, [])
    low.plans = {v: plan if v == "fused" else plan_kernel(spec, lowered, v) for v in VARIANTS
                 if v not in PREPASS_VARIANTS or spec.is_complex}
    low.configs = choose_configs(low)
    low.chunked_configs = choose_chunked_configs(low)
    low.step_config = choose_step_config(low)
    return low


def backward_dot_dtype(spec) -> str:
    """The backward kernels' dot operand precision: the spec's ``dtypes.compute``, but tf32 where it says bf16.

    Measured on the H200 (benchmarks/NOTES.md, session 2026-12-03 second): bf16 operands made the backward no faster
    (siso_trap_complex B8 L4096 fwd+bwd 20.8 ms either way; mimo_r4 55.8 ms against 44.6 with tf32), and Triton 3.6
    miscompiled its chunk_qk kernel with them (an out-of-range shared-memory access for MIMO, wrong dq/dk for
    siso_euler_real; tests/test_backward.py::test_gpu_backward_of_shipped_specs). The forward keeps bf16 operands."""
    return "tf32" if spec.dtypes.compute == "bf16" else spec.dtypes.compute


def _env() -> jinja2.Environment:
    return template_env(TEMPLATE_DIR)


def file_header(spec, spec_path: str = "<spec>", spec_note: str = "") -> dict[str, str]:
    """The fields of a generated file's header: the spec's hash, the generator's version and template hash, and how
    the spec is named (``spec_path`` + ``spec_note``, see _display_path)."""
    return {"generated_by": "Generated by mamba3-gen from a spec; reproducible byte for byte.",
            "spec_hash": spec_hash(spec), "version": __version__, "template_hash": template_hash(),
            "spec_path": spec_path, "spec_note": spec_note}


def render(low: Lowering, spec_path: str = "<spec>", spec_note: str = "") -> dict[str, str]:
    """Return {file name: source} for generated/<name>/; the headers name the spec as ``spec_path`` followed by
    ``spec_note`` (see _display_path)."""
    env = _env()
    header = file_header(low.spec, spec_path, spec_note)
    ctx = dict(spec=low.spec, lowered=low.lowered, plan=low.plan, plans=low.plans, header=header, meta=low.meta(),
               configs=low.configs, chunked_configs=low.chunked_configs, kernel_name=KERNEL_NAME,
               states_kernel_name=STATES_KERNEL_NAME, out_kernel_name=OUT_KERNEL_NAME,
               prep_kernel_name=PREP_KERNEL_NAME, prepped=False, J=low.lowered.lags,
               prologue=print_prologue(low.lowered, triton_printer()), input_codes=input_codes(low.spec, low.lowered),
               shifted_input_codes=[input_codes(low.spec, low.lowered, suffix=f"_s{k}") for k in range(low.lowered.lags + 1)],
               chunk_terms=[(n, triton_printer().doprint(e)) for n, e in low.lowered.chunk_terms()],
               dot_dtype=low.spec.dtypes.compute, **low.dims)
    fwd = env.get_template("fwd.py.jinja").render(**ctx)
    # the backward (issue 12): its kernels, and the rule's prologue derivatives printed for them
    bwd = env.get_template("bwd.py.jinja").render(**{**ctx, "dot_dtype": backward_dot_dtype(low.spec)}, derivatives=[
        (sym, [(name, triton_printer().doprint(e)) for name, e in terms])
        for sym, terms in prologue_derivatives(low.lowered)])
    step = env.get_template("step.py.jinja").render(
        **{**ctx, "kernel_name": STEP_KERNEL_NAME, "step_config": low.step_config,
           "d_skip": low.spec.options.d_skip, "z_gate": low.spec.options.z_gate})
    init = (f"# {header['generated_by']}\n# spec: {low.spec.name}  sha256: {header['spec_hash']}\n"
            f"# generator: mamba3-gen {__version__}\n"
            f'"""Generated Mamba-3 ops for spec `{low.spec.name}`: ``mamba3_forward(...)`` (chunked prefill) and '
            '``mamba3_step(...)`` (decode, one token)."""\n'
            f"from .fwd import META, mamba3_forward, {KERNEL_NAME}, {STATES_KERNEL_NAME}, {OUT_KERNEL_NAME}\n"
            f"from .step import mamba3_step, {STEP_KERNEL_NAME}\n"
            "from . import bwd as _bwd  # noqa: F401  (registers the forward's autograd formula)\n\n"
            f'__all__ = ["META", "mamba3_forward", "mamba3_step", "{KERNEL_NAME}", "{STATES_KERNEL_NAME}",\n'
            f'           "{OUT_KERNEL_NAME}", "{STEP_KERNEL_NAME}"]\n')
    spec_json = json.dumps(low.spec.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True) + "\n"
    # the CuTe DSL twin of the decode step (its tiling covers every state shape)
    from mamba3_gen.backends.cute.build import render_step

    files = {"__init__.py": init, "fwd.py": fwd, "bwd.py": bwd, "step.py": step, "spec.json": spec_json,
             "step_cute.py": render_step(low, header)}
    assert tuple(files) == PACKAGE_FILES
    return files


def build(spec_path: str | Path, out_dir: str | Path | None = None, arch: str = DEFAULT_TARGET,
          write: bool = True, force: bool = False) -> tuple[Path, dict[str, str]]:
    """Render the spec at ``spec_path`` into ``<out_dir>/<name>/`` (default: ``paths.default_out_dir()``) and, with
    ``write``, write what changed (atomically, under the package's lock; see mamba3_gen.files.write_package).

    Raises:
        SpecError: the spec is invalid. BuildError: it cannot be built for ``arch``, or (unless ``force``) the
        folder holds the package of another spec. FileSystemError: a file cannot be written.
    """
    spec = load_spec(str(spec_path))
    low = lower(spec, arch)
    root = Path(out_dir) if out_dir is not None else default_out_dir()
    target_dir = root / spec.name
    files = render(low, *_display_path(spec_path, target_dir))
    if write:
        from mamba3_gen.files import write_package

        write_package(root, spec.name, files, force=force)
    return target_dir, files


def _display_path(p, package_dir=None) -> tuple[str, str]:
    """How a generated file's header names its spec, the same whatever the working directory or the spelling of the
    path (builds are byte-for-byte reproducible): (path, note). From the checkout's root for a spec inside it (no
    note), else from the package folder ``package_dir`` (noted so), else the path as given."""
    p = Path(p)
    try:
        return p.resolve().relative_to(REPO_ROOT).as_posix(), ""
    except ValueError:
        pass
    if package_dir is None:
        return p.as_posix(), ""
    rel = Path(os.path.relpath(p.resolve(), Path(package_dir).resolve())).as_posix()
    return rel, " (the spec's path from this folder)"


def load_module(spec_path, out_dir: str | Path | None = None, arch: str = DEFAULT_TARGET, force: bool = False):
    """Build (if needed) and import the generated package of a spec: into the cache, or ``out_dir/<name>/``. The
    module is keyed on the build's fingerprint (mamba3_gen.cache), so an edited spec gives a new module."""
    from mamba3_gen.cache import load

    return load(spec_path, arch=arch, out_dir=out_dir, force=force)
