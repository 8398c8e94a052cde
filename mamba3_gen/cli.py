"""The ``mamba3-gen`` command line: build, check, test, bench a spec, and print the spec schema.

Conventions: a user mistake (a bad spec, a bad option value, an unwritable --out) exits with code 2 and prints one
line per problem on stderr, ``<file>:<line>: <field>: <what is wrong>; try <fix>``, never a traceback. Work that
takes a while prints one progress line per step. Machine-readable output (``check --json``) goes to stdout alone;
its progress lines go to stderr.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mamba3_gen.backends.device import DEFAULT_TARGET, arch_help  # data only: the targets' table
from mamba3_gen.version import __version__

app = typer.Typer(
    name="mamba3-gen",
    epilog="Exit codes: 0 ok, 1 the work itself failed (tests, benchmark, no GPU), 2 bad input (spec, options).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,  # plain click help: paragraphs re-wrapped to the terminal, '<name>' and '__init__' kept
    context_settings={"help_option_names": ["-h", "--help"]},
)

USER_ERROR = 2


# ------------------------------------------------------------------------------------------------------- helpers


def _repo_root() -> Path:
    from mamba3_gen.paths import REPO_ROOT

    return REPO_ROOT


def _shown(path: Path) -> str:
    """A path as short as it can be: relative to the working directory when it is under it."""
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd().resolve()) else str(path)
    except (ValueError, OSError):
        return str(path)


def _fail(lines: list[str], code: int = USER_ERROR, as_json: bool = False) -> typer.Exit:
    """Print the problem lines (stderr; with ``as_json``, one JSON object on stdout) and return the Exit to raise."""
    if as_json:
        typer.echo(json.dumps({"ok": False, "errors": [_problem_fields(line) for line in lines]}, indent=2))
    else:
        for line in lines:
            typer.echo(line, err=True)
    return typer.Exit(code)


def _problem_fields(line: str) -> dict[str, Any]:
    """{file, line, field, message} of a ``file:line: field: message`` line (file and line None for a line about an
    option, such as ``--arch: ...``)."""
    m = re.match(r"^(?P<file>.*?):(?P<line>[0-9]+): (?P<field>[^ ]+?): (?P<message>.*)$", line, re.S)
    if m:
        return {"file": m["file"], "line": int(m["line"]), "field": m["field"], "message": m["message"]}
    field, sep, message = line.partition(": ")
    if sep and " " not in field:
        return {"file": None, "line": None, "field": field, "message": message}
    return {"file": None, "line": None, "field": None, "message": line}


def _check_arch(arch: str, as_json: bool = False) -> None:
    from mamba3_gen.backends.device import TARGETS

    if arch not in TARGETS:
        raise _fail([f"--arch: unknown target '{arch}'; try one of: {', '.join(TARGETS)}"], as_json=as_json)


def _yaml_line(spec_path: str, dotted: str) -> int:
    """1-based line of the deepest key of ``dotted`` (e.g. 'dims.chunk_size') present in the spec file; 1 if none."""
    try:
        from ruamel.yaml import YAML

        with open(spec_path, encoding="utf-8") as f:
            node = YAML(typ="rt").load(f)
    except Exception:  # noqa: BLE001 - only used to point at a line; the spec itself already loaded
        return 1
    line = 1
    for part in re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\[[0-9]+\]", dotted):  # 'a.b[2]' -> a, b, [2]
        lc = getattr(node, "lc", None)
        try:
            if part.startswith("[") and isinstance(node, list) and lc is not None:
                index = int(part[1:-1])
                line = lc.item(index)[0] + 1
                node = node[index]
                continue
            if not isinstance(node, dict) or part not in node or lc is None:
                break
            line = lc.key(part)[0] + 1
        except Exception:  # noqa: BLE001
            break
        node = node[part]
    return line


def _problem_lines(spec_path: str, err: Exception) -> list[str]:
    """The ``file:line: field: message`` lines of an error raised while loading or lowering a spec."""
    from mamba3_gen.spec.loader import SpecError

    if isinstance(err, SpecError):
        return list(err.problems)
    lines = []
    for raw in str(err).splitlines() or [type(err).__name__]:
        raw = " ".join(raw.split())
        if not raw:
            continue
        field, sep, rest = raw.partition(": ")
        if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*|\[[0-9]+\])*", field):
            msg = rest if "try " in rest else f"{rest}; try changing {field} (see `mamba3-gen schema`)"
            lines.append(f"{spec_path}:{_yaml_line(spec_path, field)}: {field}: {msg}")
        else:
            msg = raw if "try " in raw else f"{raw}; try another spec (see specs/*.yaml)"
            lines.append(f"{spec_path}:1: spec: {msg}")
    return lines


def _user_errors() -> tuple[type[Exception], ...]:
    from mamba3_gen.errors import Mamba3GenError
    from mamba3_gen.lower.lowering import LoweringError

    return (Mamba3GenError, LoweringError, ValueError)


def _load(spec_path: str, as_json: bool = False):
    """Load a spec or exit 2 with its problem lines (as JSON with ``as_json``)."""
    from mamba3_gen.spec.loader import SpecError, load_spec

    try:
        return load_spec(spec_path)
    except SpecError as e:
        raise _fail(_problem_lines(spec_path, e), as_json=as_json) from None


def _lower(spec_path: str, arch: str, as_json: bool = False):
    """(spec, lowering) of a spec for ``arch``, or exit 2 with the problem lines (as JSON with ``as_json``)."""
    from mamba3_gen.backends.triton.build import lower

    spec = _load(spec_path, as_json)
    try:
        return spec, lower(spec, arch)
    except _user_errors() as e:
        raise _fail(_problem_lines(spec_path, e), as_json=as_json) from None


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB"


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mamba3-gen {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", help="Print the mamba3-gen version and exit.", callback=_version_callback,
                     is_eager=True),
    ] = False,
) -> None:
    """Compile declarative Mamba-3 SSM layer specs (YAML) into Triton kernels; check, test and benchmark them.

    Typical use: `mamba3-gen check specs/mimo_r4.yaml`, then `mamba3-gen build specs/mimo_r4.yaml`, which writes
    generated/mimo_r4/{__init__.py,fwd.py,bwd.py,step.py,step_cute.py,spec.json}; in Python,
    `mamba3_gen.load("specs/mimo_r4.yaml")` builds it into the cache (`mamba3-gen cache path`) and imports it.
    `mamba3-gen COMMAND --help` explains each command.
    """


# --------------------------------------------------------------------------------------------------------- build


@app.command()
def build(
    specs: Annotated[list[str], typer.Argument(help="One or more spec files (YAML), e.g. specs/mimo_r4.yaml.",
                                               metavar="SPEC...")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Directory to write <name>/ packages into (default: generated/ of the repository "
                            "checkout, or ./generated when mamba3-gen is installed from a wheel).",
        file_okay=False)] = None,
    arch: Annotated[str, typer.Option(help="Target GPU architecture whose limits the kernels must fit: "
                                           + arch_help() + ".")] = DEFAULT_TARGET,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n",
                                          help="Validate and render, but write nothing; list what would change.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace a package built from another spec with the "
                                                              "same name (e.g. after editing the spec).")] = False,
) -> None:
    """Build each SPEC into a Python package <out>/<name>/ (__init__.py, fwd.py, bwd.py, step.py, step_cute.py,
    spec.json).

    Every file is listed with its state: 'written' (new or changed), 'unchanged' (byte-identical, left alone) or,
    with --dry-run, 'would write'. Builds are reproducible: the same spec, templates and generator version always
    give the same bytes. Files are replaced atomically under a lock of the package, so concurrent builds are safe.

    A package folder belongs to one spec: a build refuses to replace a package whose spec.json holds another spec
    (--force replaces it), and two SPECs with the same name in one call are both refused; a file given twice is
    built once. A bad spec, a refused
    package or a failed write prints 'file:line: field: problem; try fix' lines; the other specs are still built,
    and the command exits with code 2 at the end.
    """
    from mamba3_gen.backends.triton.build import build as build_spec
    from mamba3_gen.errors import Mamba3GenError
    from mamba3_gen.files import check_owner, package_states, write_package
    from mamba3_gen.paths import default_out_dir

    _check_arch(arch)
    root = out if out is not None else default_out_dir()
    if root.exists() and not root.is_dir():
        raise _fail([f"--out: {root} is a file, not a directory; try another --out directory"])
    # One file given twice (also as another path to it) is built once, with a note.
    first: dict[Path, str] = {}
    for spec_path in specs:
        try:
            key = Path(spec_path).resolve()
        except (OSError, RuntimeError):
            key = Path(os.path.abspath(spec_path))
        if key in first:
            same = "" if first[key] == spec_path else f" (as {first[key]})"
            typer.echo(f"note: {spec_path} was given more than once{same}; building it once", err=True)
        else:
            first[key] = spec_path
    specs = list(first.values())
    verb = "checking" if dry_run else "building"
    plural = "spec" if len(specs) == 1 else "specs"
    typer.echo(f"{verb} {len(specs)} {plural} for {arch} into {_shown(root)}/" + (" (dry run)" if dry_run else ""))

    # Two specs with one name would write one folder: refuse both rather than let the last one win.
    names: dict[str, list[str]] = {}
    for spec_path in specs:
        try:
            names.setdefault(_load_quietly(spec_path).name, []).append(spec_path)
        except Mamba3GenError:
            pass  # reported below, when the spec is built
    clash = {p: (n, ps) for n, ps in names.items() if len(ps) > 1 for p in ps}

    failed = 0

    def fail(prefix: str, lines: list[str]) -> None:
        nonlocal failed
        failed += 1
        typer.echo(f"{prefix}: failed")
        for line in lines:
            typer.echo(line, err=True)

    for i, spec_path in enumerate(specs, 1):
        prefix = f"[{i}/{len(specs)}] {spec_path}"
        if spec_path in clash:
            name, paths = clash[spec_path]
            others = ", ".join(p for p in paths if p != spec_path)
            fail(prefix, [f"{spec_path}:{_yaml_line(spec_path, 'name')}: name: '{name}' is also the name of "
                          f"{others}; both would be written to {_shown(root / name)}/; try giving each spec its own "
                          "name"])
            continue
        try:
            target_dir, files = build_spec(spec_path, out_dir=root, arch=arch, write=False)
        except _user_errors() as e:
            fail(prefix, _problem_lines(spec_path, e))
            continue
        try:
            check_owner(target_dir, files, force)
        except Mamba3GenError as e:  # the folder holds another spec's package: point at this spec's name
            fail(prefix, [f"{spec_path}:{_yaml_line(spec_path, 'name')}: name: {' '.join(str(e).split())}"])
            continue
        states: dict[Path, tuple[str, Optional[int]]] = {}
        pkg_init = root / "__init__.py"
        if not pkg_init.exists():
            states[pkg_init] = ("would write" if dry_run else "written", None)
        for p, state in package_states(target_dir, files).items():
            shown = "unchanged" if state == "unchanged" else ("would write" if dry_run else "written")
            states[p] = (shown, len(files[p.name].encode()))
        if not dry_run and any(s != "unchanged" for s, _ in states.values()):
            try:
                write_package(root, target_dir.name, files, force=force)
            except Mamba3GenError as e:  # a failed write (it names the path) or a lock held too long
                fail(prefix, [" ".join(str(e).split())])
                continue
        typer.echo(f"{prefix} -> {_shown(target_dir)}/")
        for p, (state, size) in states.items():
            if size is None and p.exists():
                size = p.stat().st_size
            typer.echo(f"  {state:<12} {_shown(p):<48} {'-' if size is None else _size(size):>10}")
    if failed:
        typer.echo(f"{failed} of {len(specs)} {plural} failed", err=True)
        raise typer.Exit(USER_ERROR)


def _load_quietly(spec_path: str):
    """The spec at ``spec_path`` (SpecError when invalid; the caller reports it later)."""
    from mamba3_gen.spec.loader import load_spec

    return load_spec(spec_path)


# --------------------------------------------------------------------------------------------------------- cache


cache_app = typer.Typer(
    name="cache",
    help="Show or clear the build cache of mamba3_gen.load (one folder per spec fingerprint).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(cache_app, name="cache")


@cache_app.command("path")
def cache_path() -> None:
    """Print the cache folder: $MAMBA3_GEN_CACHE_DIR, or the user cache folder (e.g. ~/.cache/mamba3-gen)."""
    from mamba3_gen.cache import cache_dir

    typer.echo(str(cache_dir()))


@cache_app.command("ls")
def cache_ls() -> None:
    """List the cached builds: folder, spec name, arch, size, and whether the build is complete.

    A build is complete when its manifest lists every file with its sha256 and every file matches; an incomplete
    one is rebuilt by the next load.
    """
    from mamba3_gen.cache import cache_dir, entries
    from mamba3_gen.errors import Mamba3GenError

    try:
        found = entries()
    except Mamba3GenError as e:
        raise _fail([str(e)]) from None
    typer.echo(f"{cache_dir()}: {len(found)} build{'' if len(found) == 1 else 's'}"
               + (f", {_size(sum(e.size for e in found))}" if found else ""))
    for e in found:
        typer.echo(f"  {e.path.name:<44} {e.name:<28} {e.arch:<12} {_size(e.size):>10}"
                   f"  {'complete' if e.complete else 'incomplete'}")


@cache_app.command("clear")
def cache_clear(
    names: Annotated[Optional[list[str]], typer.Argument(help="Only the builds of these spec names (default: all).",
                                                         metavar="[NAME]...", show_default=False)] = None,
) -> None:
    """Delete cached builds: all of them, or those of the given spec names.

    Each folder is deleted under its lock, so no build is cut in half. A folder that cannot be deleted is reported
    and the others are still deleted; the command then exits with code 2. Processes that already imported a build
    keep running it; do not clear a cache that running jobs are loading from.
    """
    from mamba3_gen.cache import cache_dir, entries, remove_entry
    from mamba3_gen.errors import Mamba3GenError

    try:
        found = entries()
    except Mamba3GenError as e:
        raise _fail([str(e)]) from None
    chosen = [e for e in found if not names or e.name in names]
    unknown = sorted(set(names or []) - {e.name for e in found})
    failed, freed = 0, 0
    for e in chosen:
        try:
            remove_entry(e)
            freed += e.size
        except Mamba3GenError as err:
            failed += 1
            typer.echo(str(err), err=True)
    typer.echo(f"removed {len(chosen) - failed} build{'' if len(chosen) - failed == 1 else 's'} from {cache_dir()} "
               f"({_size(freed)})")
    for name in unknown:
        typer.echo(f"note: no cached build of spec '{name}' (see `mamba3-gen cache ls`)", err=True)
    if failed:
        typer.echo(f"{failed} of {len(chosen)} builds could not be removed", err=True)
        raise typer.Exit(USER_ERROR)


# --------------------------------------------------------------------------------------------------------- check


def _resolved(model, prefix: str = "", parent_default: bool = False) -> list[tuple[str, Any, bool, bool]]:
    """(dotted key as written in YAML, value, is_default, is_section) for every field of a spec, defaults included."""
    from pydantic import BaseModel

    rows = []
    for name, info in type(model).model_fields.items():
        key = prefix + (info.alias or name)
        value = getattr(model, name)
        default = parent_default or name not in model.model_fields_set
        if isinstance(value, BaseModel):
            rows.append((key, None, default, True))
            rows.extend(_resolved(value, key + ".", default))
        else:
            rows.append((key, value, default, False))
    return rows


def _aot(spec_path: str, arch: str, configs, progress) -> dict:
    """Run the AOT compile report; {'available': bool, 'reason'|'configs': ...}."""
    from mamba3_gen.backends.device import get_target

    if not get_target(arch).is_gpu:
        return {"available": False, "reason": f"--arch {arch} is not a GPU target (compile reports are per GPU arch)"}
    try:
        from mamba3_gen.backends.triton.aot import compile_report
    except ImportError as e:
        return {"available": False, "reason": str(e) or type(e).__name__}
    progress(f"compiling {len(configs)} configs for {arch} (ahead of time, no GPU needed) ...")
    try:
        rows = compile_report(spec_path, arch)
    except Exception as e:  # noqa: BLE001 - reported; the rest of the check stands
        return {"available": True, "error": str(e).strip() or type(e).__name__}
    return {"available": True, "configs": [dict(r) for r in rows]}


@app.command()
def check(
    spec_path: Annotated[str, typer.Argument(help="The spec file (YAML) to check, e.g. specs/mimo_r4.yaml.",
                                             metavar="SPEC")],
    arch: Annotated[str, typer.Option(help="Target GPU architecture for the shared-memory check and the AOT "
                                           "report: " + arch_help() + ".")] = DEFAULT_TARGET,
    graph: Annotated[bool, typer.Option("--graph", help="Also print the kernel's stage graph: each stage, the "
                                                         "stages it depends on, and the tensors loaded/stored.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with everything instead of text; "
                                                         "for an invalid spec, {\"ok\": false, \"errors\": [{file, "
                                                         "line, field, message}, ...]} (exit code 2).")] = False,
    aot: Annotated[bool, typer.Option("--aot/--no-aot", help="Compile every autotune config ahead of time for the "
                                                              "target and report registers, spills and shared memory "
                                                              "(takes a while; no GPU needed).")] = True,
) -> None:
    """Validate SPEC and show what the compiler derives from it, without writing anything.

    Prints the resolved spec (every field, defaults marked), derived quantities (S rotation angles, chunk rows C·R,
    kernel dims), the discretization rule as formulas (log-decay a_t and lag weights c_j(t), presets included) as
    sympy lowered them (series at removable singularities, derivatives for the backward), the
    stage order, the autotune configs with their shared-memory estimates against the target's per-block limit,
    which GPU targets the spec fits, and (with --aot) what the compiler actually allocated per config.
    """
    from mamba3_gen.backends.device import TARGETS
    from mamba3_gen.backends.printing import print_prologue, triton_printer
    from mamba3_gen.backends.triton.build import BuildError, lower
    from mamba3_gen.graph.dataflow import PHASES
    from mamba3_gen.spec.loader import spec_hash, yaml_value

    _check_arch(arch, as_json)
    spec, low = _lower(spec_path, arch, as_json)
    target = low.target
    d = spec.dims
    dims = low.dims
    rows = d.chunk_size * d.mimo_rank
    limit = target.smem_per_block

    fits = {}
    for name, t in TARGETS.items():
        if not t.is_gpu:
            continue
        try:
            cfgs = low.configs if name == arch else lower(spec, name).configs
            fits[name] = {"target": t.name, "fits": True, "configs": len(cfgs), "smem_limit": t.smem_per_block,
                          "smallest_smem_estimate": min(c.smem_estimate for c in cfgs)}
        except (BuildError, ValueError) as e:
            fits[name] = {"target": t.name, "fits": False, "configs": 0, "smem_limit": t.smem_per_block,
                          "reason": " ".join(str(e).split())}

    def progress(msg: str) -> None:
        typer.echo(msg, err=as_json)

    report = _aot(spec_path, arch, low.configs, progress) if aot else None

    derived = {
        "S_angles": spec.num_angles,
        "chunk_rows": rows,
        "dims": dims | {"G": d.ngroups},
        "lambda_source": low.lowered.lam_source,
        "trap_input": spec.has_trap_input,
        "lags": spec.lags,
    }
    configs = [{"block_p": c.block_p, "num_warps": c.num_warps, "num_stages": c.num_stages, "maxnreg": c.maxnreg,
                "smem_estimate": c.smem_estimate, "smem_limit": limit} for c in low.configs]
    # the chunk-parallel forward's two kernels and the rotation pre-pass (complex specs): their autotune tiles
    other_configs = {kind: [{k: v for k, v in dataclasses.asdict(c).items() if v is not None} for c in cfgs]
                     for kind, cfgs in (low.chunked_configs or {}).items()}
    stage_order = {p: [s.name for s in low.plan.order[p]] for p in PHASES}
    from mamba3_gen.backends.triton.build import backward_dot_dtype

    bwd_dot = backward_dot_dtype(spec)
    # the backward's build-time facts and run-time choices (README, environment variables)
    backward = {"refused": low.lowered.backward_refusal or None, "dot_dtype": bwd_dot,
                "structure": {"variable": "MAMBA3_GEN_BWD", "auto": "chunked", "choices": ["chunked", "fused"]},
                "gqa_bias_sums": "atomics" if spec.lags <= 1 else "per_head"}

    if as_json:
        plan = low.plan
        obj = {
            "ok": True,
            "spec_path": spec_path,
            "spec": spec.model_dump(mode="json", by_alias=True),
            "defaults": [k for k, _, dflt, section in _resolved(spec) if dflt and not section],
            "unused_fields": spec.unread_fields(),
            "spec_hash": spec_hash(spec),
            "generator": __version__,
            "arch": arch,
            "target": target.name,
            "derived": derived,
            "lowering": low.lowered.describe(),
            "kernel_code": dict(print_prologue(low.lowered, triton_printer())),
            "stage_order": stage_order,
            "graph": {
                "stages": [{"name": s.name, "phase": s.phase, "doc": s.doc,
                            "depends_on": sorted(plan.graph.predecessors(s.name))} for s in plan.stages],
                "loads": plan.loads,
                "stores": plan.stores,
                "text": plan.describe(),
            },
            "configs": configs,
            "chunked_configs": other_configs,
            "targets": fits,
            "backward": backward,
            "aot": report,
        }
        typer.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))
    else:
        echo = typer.echo
        echo(f"{spec.name}: {spec_path} is valid  (sha256 {spec_hash(spec)[:16]}…, mamba3-gen {__version__})")
        echo("")
        echo("resolved spec (* = default, not written in the file):")
        unused = spec.unread_fields()
        for key, value, dflt, section in _resolved(spec):
            if key in unused:
                continue
            indent = "  " * (key.count(".") + 1)
            leaf = key.rsplit(".", 1)[-1]
            text = "" if section else " " + yaml_value(value)
            echo(f"{indent}{leaf}:{text}{'  *' if dflt else ''}")
        if unused:
            echo(f"  (not used by this spec, not shown: {', '.join(unused)})")
        echo("")
        echo("derived:")
        rf = spec.state.rope_fraction
        if spec.is_complex:
            echo(f"  S, rotation angles per token: {spec.num_angles}  (N·rope_fraction/2 = {d.d_state}·{rf}/2, "
                 f"{spec.state.rotation} pairs)")
        else:
            echo("  S, rotation angles per token: 0  (real state: no rotation)")
        echo(f"  chunk rows C·R: {d.chunk_size}·{d.mimo_rank} = {rows}  (token-major, rank-minor rows of a chunk tile)")
        echo(f"  kernel dims: N={dims['N']} (two halves of {dims['N2']}, padded to {dims['BN2']}), "
             f"P={dims['P']} (padded to {dims['BP']}), R={dims['R']}, G={d.ngroups}, C={dims['C']}")
        lam = {"data": "per token, λ_t = σ(trap_t) from the trap input",
               "constant": f"constant λ = {spec.discretization.lambda_value}",
               "none": "none (the rule's formulas do not use lam)"}[low.lowered.lam_source]
        echo(f"  λ: {lam}")
        echo(f"  previous tokens (k̂, v) carried in the state: {spec.lags} (the rule's lags)")
        echo("")
        echo("discretization, lowered by sympy:")
        desc = low.lowered.describe()
        width = max(len(k) for k in desc)
        for k, v in desc.items():
            echo(f"  {k + ':':<{width + 1}} {v}")
        echo("")
        echo("stage order:")
        for phase, names in stage_order.items():
            echo(f"  {phase}: {' -> '.join(names) or '-'}")
        if graph:
            echo("")
            echo("stage graph (stage <- stages it depends on):")
            for line in low.plan.describe().splitlines():
                echo(f"  {line}")
        echo("")
        echo(f"autotune configs for {arch} ({target.name}), shared memory limit {_size(limit)} per block:")
        echo(f"  {'block_p':>7} {'num_warps':>9} {'num_stages':>10} {'maxnreg':>7} {'smem estimate':>14} "
             f"{'of limit':>8}")
        for c in low.configs:
            echo(f"  {c.block_p:>7} {c.num_warps:>9} {c.num_stages:>10} {c.maxnreg or '-':>7} "
                 f"{_size(c.smem_estimate):>14} {100 * c.smem_estimate / limit:>7.0f}%")
        echo("other kernels' autotune tiles (P: block of the head dim, K: of rotation pairs, T: of tokens; w: warps, "
             "st: stages; shared-memory estimate):")
        names = {"states": "chunked forward, states kernel", "out": "chunked forward, out kernel",
                 "prep": "rotation pre-pass"}
        short = {"block_p": "P", "block_k": "K", "block_t": "T", "num_warps": "w", "num_stages": "st",
                 "maxnreg": "maxnreg"}
        for kind, cfgs in other_configs.items():
            tiles = "; ".join(" ".join(f"{short[k]}={v}" for k, v in c.items()
                                       if k in short and not (k == "block_p" and kind == "prep"))
                              + (f" ({_size(c['smem_estimate'])})" if c.get("smem_estimate") else "") for c in cfgs)
            echo(f"  {names.get(kind, kind)}: {tiles}")
        from mamba3_gen.runtime.forward import auto_rotation, chunked_below, keeps_chunk_states

        meta = low.meta()
        rot = auto_rotation(meta)
        # a differentiated call that keeps its chunk states (SAVE_STATES; a spec with a backward) may choose otherwise
        keeps = not low.lowered.backward_refusal and keeps_chunk_states(meta, "fused", "inline")
        rot_kept = auto_rotation(meta, keep_states=keeps)

        def below(fraction: float) -> str:
            return "the GPU's SM count" if fraction == 1 else f"{fraction:g} × the GPU's SM count"

        frac, frac_kept = chunked_below(meta, rot), chunked_below(meta, rot_kept)
        echo("at run time, on a GPU, with MAMBA3_GEN_FORWARD / MAMBA3_GEN_ROTATE unset (auto; README):")
        echo("  forward: " + ("chunked at every batch" if frac == float("inf") else
                              f"fused when sequences × heads >= {below(frac)}, else chunked")
             + (f" (chunked below {below(frac_kept)} in a differentiated call that keeps its chunk states)"
                if frac_kept != frac else ""))
        if meta["S"]:
            echo(f"  rotation: {'the pre-pass' if rot == 'prepass' else 'inline'}"
                 + (" (inline in a differentiated call that keeps its chunk states; MAMBA3_GEN_SAVE_STATES)"
                    if rot_kept != rot else ""))
        if spec.dtypes.input == "fp32" and spec.dtypes.compute == "bf16":
            echo("  note: bf16 dot operands round the fp32 inputs to bf16 at the products")
        if low.lowered.backward_refusal:
            echo(f"  backward: refused ({low.lowered.backward_refusal})")
        else:
            echo(f"  backward: {bwd_dot} dot operands"
                 + (f" (the spec's {spec.dtypes.compute} is the forward's: bf16 made the backward no faster and "
                    "Triton 3.6 miscompiled it)" if bwd_dot != spec.dtypes.compute else "")
                 + "; chunked: a reverse walk over the chunks stores each one's state adjoint, then chunk kernels "
                 "for every chunk at once, the value and coefficient ones split (MAMBA3_GEN_BWD_CHUNKS=merged: one "
                 "kernel); MAMBA3_GEN_BWD=fused (opt-in, slower so far): one program per sequence and head does the "
                 "walk and every chunk kernel's work")
            echo("  backward's GQA and bias sums of dq, dk: "
                 + ("atomics in the dq/dk kernel (heads added in a run-to-run order); per head + one more pass under "
                    "torch.use_deterministic_algorithms(True)" if spec.lags <= 1 else
                    "per head + one more pass (the rule's carried tokens add into them per head): deterministic"))
        sc = low.step_config
        echo("")
        from mamba3_gen.backends.cute.build import step_layout

        tiling = step_layout(meta, low.spec.state.rotation if meta["S"] else None)
        echo(f"decode step: Triton, one program per (batch row, head) over {sc.block_p} rows of H, {sc.num_warps} "
             f"warps, {'head-major' if sc.head_major else 'batch-major'} grid; CuTe DSL, {tiling['NT']} threads per "
             f"(batch row, head), {tiling['TC']} per row of H in {tiling['VEC']}-wide vectors")
        echo("")
        echo("GPU targets (the forward's fused kernel, by the shared-memory model):")
        for name, f in fits.items():
            if f["fits"]:
                echo(f"  {name:<7} fits: {f['configs']} configs, smallest estimate {_size(f['smallest_smem_estimate'])}"
                     f" of {_size(f['smem_limit'])}  ({f['target']})")
            else:
                echo(f"  {name:<7} does not fit: {f['reason']}")
        echo("  the backward's kernels are not estimated here: they compile at the first .backward(); "
             "`python -m mamba3_gen.backends.triton.aot_backward SPEC sm_90a` reports them without a GPU")
        if report is not None:
            echo("")
            _print_aot(report, arch, low.configs, limit)
    if report is not None and report.get("error"):
        if as_json:
            typer.echo(f"AOT report failed: {report['error'].splitlines()[0]}", err=True)
        raise typer.Exit(1)


_AOT_COLUMNS = ["block_p", "num_warps", "num_stages", "shared", "estimate", "registers", "spills", "spill_stores",
                "spill_loads", "stack_frame", "seconds", "compile_s"]


def _print_aot(report: dict, arch: str, configs, limit: int) -> None:
    echo = typer.echo
    if not report.get("available"):
        echo(f"AOT report unavailable: {report.get('reason')}")
        return
    if "error" in report:
        typer.echo("AOT report failed: " + report["error"].replace("\n", "\n  "), err=True)
        return
    rows = report.get("configs") or []
    echo(f"compiled for {arch}, per autotune config (shared memory as allocated vs the estimate above):")
    if not rows:
        echo("  (no configs compiled)")
        return
    est = {(c.block_p, c.num_warps, c.num_stages): c.smem_estimate for c in configs}
    table = []
    for r in rows:
        r = dict(r)
        key = (r.get("block_p"), r.get("num_warps"), r.get("num_stages"))
        if key in est:
            r["estimate"] = est[key]
        table.append(r)
    skip = {"spec", "arch", "name"}
    cols = [c for c in _AOT_COLUMNS if any(c in r for r in table)]
    cols += [c for c in table[0] if c not in cols and c not in skip]

    def cell(col: str, value: Any) -> str:
        if value is None:
            return "-"
        if col in ("shared", "estimate") and isinstance(value, int):
            return _size(value)
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    widths = {c: max(len(c), *(len(cell(c, r.get(c))) for r in table)) for c in cols}
    echo("  " + " ".join(f"{c:>{widths[c]}}" for c in cols))
    for r in table:
        line = "  " + " ".join(f"{cell(c, r.get(c)):>{widths[c]}}" for c in cols)
        shared = r.get("shared")
        if isinstance(shared, int) and shared > limit:
            line += f"  over the {_size(limit)} limit"
        echo(line)


# ---------------------------------------------------------------------------------------------------------- test


@app.command()
def test(
    spec_path: Annotated[str, typer.Argument(help="The spec file (YAML) whose generated kernel to test.",
                                             metavar="SPEC")],
    examples: Annotated[int, typer.Option(min=1, help="Hypothesis examples per property test "
                                                      "(sets MAMBA3_GEN_EXAMPLES).")] = 20,
    gpu: Annotated[bool, typer.Option("--gpu/--cpu", help="--cpu (default): run the kernel on the CPU through the "
                                                          "Triton interpreter (TRITON_INTERPRET=1, fp32). --gpu: run "
                                                          "the tests marked gpu on a CUDA device.")] = False,
) -> None:
    """Run the property tests of SPEC's generated kernels against the float64 references: forward, decode step and
    backward.

    Runs `python -m pytest tests/test_forward.py tests/test_step.py
    tests/test_backward.py::test_gradients_match_float64_autograd -q -rs -m "not gpu"` (or `-m gpu` with --gpu) from
    the repository root with MAMBA3_GEN_SPEC set to SPEC (the tests that do not draw SPEC are deselected), streams
    pytest's output (with the reason of every skipped test), and exits with pytest's exit code (5 means no test was
    collected). The backward's property test runs in the interpreter only: --gpu tests the forward and the step
    (the GPU backward tests use the shipped specs: `pytest -m gpu tests/test_backward.py`). GPU tests skip with a
    reason when no CUDA device is visible. Needs the test extra (pytest, hypothesis): `pip install -e ".[test]"` in
    the checkout.
    """
    _load(spec_path)
    missing = [m for m in ("pytest", "hypothesis") if importlib.util.find_spec(m) is None]
    if missing:
        typer.echo(f"mamba3-gen test needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                   f"installed in this Python ({sys.executable}); install the test extra: `pip install -e \".[test]\"` "
                   "in the mamba3-gen checkout (or `pip install pytest hypothesis`)", err=True)
        raise typer.Exit(1)
    root = _repo_root()
    targets = ["tests/test_forward.py", "tests/test_step.py",
               "tests/test_backward.py::test_gradients_match_float64_autograd"]
    missing_files = [t.split("::")[0] for t in targets if not (root / t.split("::")[0]).is_file()]
    if missing_files:
        typer.echo(f"{_shown(root / missing_files[0])} not found: the property tests ship with the repository "
                   "checkout; run from a clone of mamba3-gen installed with `pip install -e \".[test]\"`", err=True)
        raise typer.Exit(1)
    env = dict(os.environ)
    env["MAMBA3_GEN_SPEC"] = str(Path(spec_path).resolve())
    env["MAMBA3_GEN_EXAMPLES"] = str(examples)
    if gpu:
        env.pop("TRITON_INTERPRET", None)
        marker = "gpu"
        import torch

        if not torch.cuda.is_available():
            typer.echo("note: no CUDA device is visible here, so the gpu tests will be skipped (each with its reason)",
                       err=True)
    else:
        env["TRITON_INTERPRET"] = "1"
        marker = "not gpu"
    # -rs: the summary gives each skipped test's reason (a bare "25 skipped" hides why)
    cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-rs", "-m", marker]
    where = "GPU" if gpu else "CPU, TRITON_INTERPRET=1"
    typer.echo(f"testing {spec_path} ({where}, {examples} examples per property): "
               f"python -m pytest {' '.join(targets)} -q -rs -m \"{marker}\"")
    try:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, encoding="utf-8", errors="replace", bufsize=1)
    except OSError as e:
        typer.echo(f"cannot start pytest: {e}", err=True)
        raise typer.Exit(1) from None
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            typer.echo(line, nl=False)
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    if code == 5:
        typer.echo("pytest collected no tests (exit code 5)" + (": is any test marked gpu?" if gpu else ""), err=True)
    raise typer.Exit(code)


# -------------------------------------------------------------------------------------------------------- schema


@app.command()
def schema(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the schema to this file instead of "
                                                                    "stdout.", dir_okay=False)] = None,
) -> None:
    """Print the JSON Schema of spec files (for editor completion and validation of YAML specs).

    Every field with its type, default, allowed values and meaning; keys as written in YAML.
    """
    from mamba3_gen.spec.loader import json_schema

    text = json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
    if out is None:
        typer.echo(text, nl=False)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        raise _fail([f"--out: cannot write {out}: {e.strerror or e}; try a path in an existing, writable "
                     "directory"]) from None
    typer.echo(f"wrote {_shown(out)} ({_size(len(text.encode()))})")


# --------------------------------------------------------------------------------------------------------- bench


def _as_set_hint(problem: str) -> str:
    """A validator line about an overridden field, its YAML-style hint (``dims.d_state: ...; try d_state: 128``)
    rewritten as the option to type (``try --set dims.d_state=128``)."""
    m = re.match(r"([A-Za-z_][\w.]*): (.*); try ([A-Za-z_]\w*): (.+)$", problem)
    if m is None or not m.group(1).endswith("." + m.group(3)) and m.group(1) != m.group(3):
        return problem
    return f"{m.group(1)}: {m.group(2)}; try --set {m.group(1)}={m.group(4)}"


@app.command()
def bench(
    specs: Annotated[list[str], typer.Argument(help="One or more spec files (YAML) to benchmark.",
                                               metavar="SPEC...")],
    sizes: Annotated[Optional[str], typer.Option(
        help="Comma-separated B:L:H sizes [default: 8:4096:32; with --decode 1:1:32,16:1:32,256:1:32, L unused].",
        show_default=False)] = None,
    providers: Annotated[Optional[str], typer.Option(
        help="Comma-separated providers: generated (our Triton kernels), official (the official Triton / Mamba-2 "
             "/ TileLang kernel of the spec), generated-cute, official-cute (decode only) [default: generated,"
             "official; with --decode all four].", show_default=False)] = None,
    decode: Annotated[bool, typer.Option("--decode", help="Time the decode step (in place, CUDA-graph replay) "
                                         "instead of the prefill forward.")] = False,
    backward: Annotated[bool, typer.Option("--backward", help="Time forward + backward (and check the gradients "
                                           "of q, k, v, z too).")] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for <name>.json and <name>.png.",
                                      file_okay=False)] = Path("bench_results"),
    name: Annotated[str, typer.Option(help="Base name of the JSON and PNG files.")] = "bench",
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a spec field, SECTION.FIELD=VALUE (repeatable), e.g. --set dims.d_state=64.",
        metavar="SECTION.FIELD=VALUE")] = None,
    forward: Annotated[Optional[str], typer.Option(
        help="The generated forward for this run: auto, fused or chunked (sets MAMBA3_GEN_FORWARD; default: the "
             "environment's, else auto).", show_default=False)] = None,
    rotate: Annotated[Optional[str], typer.Option(
        help="Where a complex state is rotated for this run: auto, inline or prepass (sets MAMBA3_GEN_ROTATE; "
             "default: the environment's, else auto).", show_default=False)] = None,
) -> None:
    """Time SPEC's generated kernels beside the official ones on a CUDA GPU (exits 1 without one).

    For each spec and size the inputs are drawn once (bf16 Q, K, V, Z; fp32 the rest) and every provider runs on
    them; its outputs are checked against the generated kernel's before timing (bf16 output within 2e-2 relative;
    with --backward the gradients of q, k, v, z within 5e-2), and one that disagrees is reported as a mismatch and
    not timed. Times: medians of triton.testing.do_bench with the L2 flushed (CUDA-graph replay for --decode).
    Prints one table (ms, GB/s, TFLOP/s, % of the copy and bf16-GEMM ceilings measured in the same run, the ratio to
    every other provider) and writes OUT/NAME.json and OUT/NAME.png (the plot needs matplotlib: pip install -e
    ".[bench]"). Exits 1 if a provider disagreed or the generated kernel failed.
    """
    from mamba3_gen import bench as lib
    from mamba3_gen.errors import SpecError
    from mamba3_gen.spec.sources import spec_with_overrides

    if decode and backward:
        raise _fail(["--backward: the decode step has no backward; try one of --decode, --backward"])
    mode = "decode" if decode else "bwd" if backward else "fwd"
    try:
        size_list = lib.parse_sizes(lib.DEFAULT_SIZES[mode] if sizes is None else sizes, mode)
        names = lib.parse_providers(("generated,generated-cute,official,official-cute" if decode
                                     else "generated,official") if providers is None else providers)
    except lib.BenchArgError as e:
        raise _fail([str(e)]) from None
    sets = tuple(set_ or ())
    workloads, problems = [], []
    from mamba3_gen.runtime.forward import FORWARDS, ROTATIONS

    for opt, value, allowed, var in (("--forward", forward, FORWARDS, "MAMBA3_GEN_FORWARD"),
                                     ("--rotate", rotate, ROTATIONS, "MAMBA3_GEN_ROTATE")):
        if value is None:
            continue
        if value.strip().lower() not in allowed:
            problems.append(f"{opt}: {value!r} is not one of {', '.join(allowed)}; try {opt} {allowed[0]}")
        else:
            os.environ[var] = value.strip().lower()  # read by the generated op at each call (README)
    for path in specs:
        _load(path)  # the file's own problems, with their lines
        try:
            spec = spec_with_overrides(path, sets)
        except SpecError as e:
            problems += [f"{path} with --set: {_as_set_hint(p[len('<dict>: '):])}" if p.startswith("<dict>: ")
                         else p for p in e.problems]
            continue
        for B, L, H in size_list:
            if H % spec.dims.ngroups:
                g = spec.dims.ngroups
                problems.append(f"--sizes: H={H} in {B}:{L}:{H} is not a multiple of dims.ngroups={g} of {path}; "
                                f"try H={max(1, H // g) * g}")
                continue
            workloads.append(lib.Workload(spec, B, 1 if decode else L, H, mode, sets))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        problems.append(f"--name: {name!r} is not a plain file name (letters, digits, _ . -); try --name bench")
    if problems:
        raise _fail(list(dict.fromkeys(problems)))
    made: list[Path] = []  # the folders this check creates, outermost first
    try:  # before any GPU work: a run is not thrown away for a folder that cannot be written
        for d in [*reversed(out.absolute().parents), out.absolute()]:
            if not d.is_dir():
                d.mkdir()
                made.append(d)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise _fail([f"--out: cannot write {out}: {e.strerror or e}; try a writable folder"]) from None
    import torch

    if not torch.cuda.is_available():
        for d in reversed(made):  # a failed run leaves nothing behind; rmdir keeps a folder someone wrote into
            try:
                d.rmdir()
            except OSError:
                break
        typer.echo("bench needs a CUDA GPU, and none is visible here (torch.cuda.is_available() is False); "
                   "run it on a machine with an NVIDIA GPU, or use `mamba3-gen test SPEC` to run the kernel on the "
                   "CPU", err=True)
        raise typer.Exit(1)
    typer.echo(f"benchmarking {len(workloads)} workload{'s' * (len(workloads) != 1)} ({mode}) on "
               f"{torch.cuda.get_device_name()}: providers {', '.join(names)}", err=True)
    result = lib.run(workloads, names, log=lambda line: typer.echo(line, err=True))
    from rich.console import Console

    Console(width=200).print(lib.render_table(result.rows, result.ceilings, result.device))
    try:
        json_path = lib.write_json(out / f"{name}.json", result)
    except OSError as e:
        raise _fail([f"--out: cannot write {out}: {e.strerror or e}; try a writable folder"]) from None
    typer.echo(f"wrote {_shown(json_path)}")
    png = lib.plot(result.rows, out / f"{name}.png")
    if png is not None:
        typer.echo(f"wrote {_shown(png)}")
    bad = [r for r in result.rows if r["check"] == "mismatch" or (r["provider"] == "generated" and r["error"])]
    raise typer.Exit(1 if bad else 0)


def main() -> None:  # pragma: no cover - `python -m mamba3_gen.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
