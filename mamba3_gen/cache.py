"""The build cache behind :func:`mamba3_gen.load`: one folder per fingerprint, one imported module per fingerprint.

``load`` builds a spec into ``<cache>/<name>-<fingerprint[:16]>/`` (``<cache>`` is ``$MAMBA3_GEN_CACHE_DIR``, or the
user cache folder from ``platformdirs``). The fingerprint hashes everything the generated files depend on: the
canonical spec, the templates, the generator (its version and sources), the triton, torch and nvidia-cutlass-dsl
versions, and the target arch. So an edited spec gets a new folder and a new module, an unchanged one is reused
(in-process and across processes), and two specs that share a ``name`` never share either.

An entry is complete when its ``manifest.json`` (written last) lists the sha256 of each file and every file matches;
otherwise it is (re)built under the entry's lock, each file written atomically. Any number of processes may load the
same specs at once.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

from mamba3_gen.errors import BuildError, FileSystemError, Mamba3GenError
from mamba3_gen.files import (atomic_write, make_dirs, package_lock, remove_stale_temporaries, sha256_bytes,
                              write_package)
from mamba3_gen.version import __version__

ENV_CACHE_DIR = "MAMBA3_GEN_CACHE_DIR"
MANIFEST = "manifest.json"
CACHE_SPEC_PATH = "<spec>"  # what the files' header names as the source: cached bytes depend on the fingerprint only
_VERSIONED = ("triton", "torch", "nvidia-cutlass-dsl")

_MODULES: dict[tuple, ModuleType] = {}  # (fingerprint, package folder) -> imported module
_IMPORT_LOCK = threading.Lock()


# -------------------------------------------------------------------------------------------------------- where


def cache_dir() -> Path:
    """The cache folder: ``$MAMBA3_GEN_CACHE_DIR`` if set, else the user cache folder (``platformdirs``), e.g.
    ``~/.cache/mamba3-gen`` on Linux. Not created here."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("mamba3-gen", appauthor=False))


# -------------------------------------------------------------------------------------------------- fingerprint


@functools.lru_cache(maxsize=1)
def generator_hash() -> str:
    """sha256 of mamba3_gen's Python sources (once per process): a checkout whose lowering changed builds anew even
    though the version number did not."""
    from mamba3_gen.paths import PACKAGE_DIR

    h = hashlib.sha256()
    for p in sorted(PACKAGE_DIR.rglob("*.py")):
        if "__pycache__" in p.parts or "templates" in p.relative_to(PACKAGE_DIR).parts:
            continue
        h.update(p.relative_to(PACKAGE_DIR).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def fingerprint_inputs(spec, arch: str) -> dict[str, Any]:
    """Everything a build's bytes depend on, as a JSON-able dict (``fingerprint`` hashes it)."""
    from mamba3_gen.backends.templating import templates_hash
    from mamba3_gen.paths import templates_dir
    from mamba3_gen.spec.loader import spec_hash

    return {
        "spec": spec_hash(spec),
        "templates": templates_hash(templates_dir()),
        "generator": __version__,
        "generator_sources": generator_hash(),
        "versions": {d: _version(d) for d in _VERSIONED},
        "arch": arch,
    }


def fingerprint(spec, arch: str) -> str:
    """sha256 (hex) of :func:`fingerprint_inputs`: the cache key of a spec built for ``arch``."""
    inputs = fingerprint_inputs(spec, arch)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def entry_dir(spec, fp: str) -> Path:
    """The cache folder of a spec with fingerprint ``fp``."""
    return cache_dir() / f"{spec.name}-{fp[:16]}"


# ---------------------------------------------------------------------------------------------------------- arch


def gpu_arch() -> Optional[str]:
    """The target name (``mamba3_gen.backends.device.TARGETS``) of CUDA device 0, or None without a CUDA GPU.

    A GPU with no target of its own gets the target of its major version with the smallest shared memory (e.g.
    sm_86 -> sm_89's limits), which its kernels fit.

    Raises:
        BuildError: the GPU's major version has no target (e.g. a new architecture); pass ``arch=`` explicitly.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    from mamba3_gen.backends.device import TARGETS

    major, minor = torch.cuda.get_device_capability(0)
    for name in (f"sm_{major}{minor}a", f"sm_{major}{minor}"):
        if name in TARGETS:
            return name
    same_major = [t for t in TARGETS.values() if t.is_gpu and t.capability // 10 == major]
    if same_major:
        return min(same_major, key=lambda t: t.smem_per_block).arch
    gpus = ", ".join(n for n, t in TARGETS.items() if t.is_gpu)
    raise BuildError(f"arch: this GPU (compute capability {major}.{minor}) has no mamba3-gen target; try "
                     f"load(spec, arch=...) with the closest of: {gpus}")


def resolve_arch(arch: Optional[str]) -> str:
    """``arch`` checked against the known targets; None means the current GPU's, or ``"interpreter"`` without one.

    Raises:
        BuildError: an unknown arch name (lists the known ones).
    """
    from mamba3_gen.backends.device import TARGETS

    if arch is None:
        found = gpu_arch()
        if found is None:
            if os.environ.get("TRITON_INTERPRET") != "1":
                warnings.warn("mamba3_gen.load: no CUDA GPU here, so the kernels are built for the Triton interpreter, "
                              "but TRITON_INTERPRET=1 is not set: calls on CPU tensors will raise DeviceError. Start "
                              "Python with TRITON_INTERPRET=1 to run them on the CPU.", RuntimeWarning, stacklevel=3)
            return "interpreter"
        return found
    if arch not in TARGETS:
        raise BuildError(f"arch: unknown target {arch!r}; try one of: {', '.join(TARGETS)}")
    return arch


# ---------------------------------------------------------------------------------------------------------- build


def _render(spec, arch: str, spec_path: str, spec_note: str = "") -> dict[str, str]:
    """{file name: source} of a spec's package (headers naming ``spec_path`` + ``spec_note``). Lowering failures
    become BuildError."""
    from mamba3_gen.backends.triton.build import lower, render

    try:
        return render(lower(spec, arch), spec_path, spec_note)
    except Mamba3GenError:
        raise
    except ValueError as e:  # LoweringError and the targets' own ValueErrors: the spec cannot be built
        raise BuildError(" ".join(str(e).split()) or type(e).__name__) from e


def _manifest_ok(folder: Path, fp: str) -> bool:
    """True when ``folder`` is a complete cache entry of fingerprint ``fp`` (manifest present, every file intact)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("fingerprint") != fp:
            return False
        return all(sha256_bytes((folder / name).read_bytes()) == digest
                   for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def ensure_entry(spec, arch: str, fp: str) -> Path:
    """The complete cache entry of ``spec`` for ``arch`` (fingerprint ``fp``), built first when missing or damaged.

    Raises:
        BuildError: the spec cannot be built for ``arch``.
        FileSystemError: the cache folder cannot be written (set MAMBA3_GEN_CACHE_DIR to a writable folder).
    """
    folder = entry_dir(spec, fp)
    if _manifest_ok(folder, fp):
        return folder
    try:
        make_dirs(folder)
    except FileSystemError as e:
        raise FileSystemError(e.path, e.action, e.reason, f"setting {ENV_CACHE_DIR} to a writable folder") from e
    with package_lock(folder):
        if _manifest_ok(folder, fp):  # another process finished it while this one waited
            return folder
        remove_stale_temporaries(folder)
        files = _render(spec, arch, CACHE_SPEC_PATH)
        with contextlib.suppress(OSError):
            (folder / MANIFEST).unlink()  # incomplete until the new manifest lands
        for name, text in files.items():
            atomic_write(folder / name, text)
        manifest = {"fingerprint": fp, "name": spec.name, "arch": arch,
                    "inputs": fingerprint_inputs(spec, arch),
                    "files": {name: sha256_bytes(text.encode("utf-8")) for name, text in files.items()}}
        atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return folder


# --------------------------------------------------------------------------------------------------------- import


def _module_name(spec, fp: str, folder: Path, in_cache: bool) -> str:
    name = f"mamba3_gen_kernels_{spec.name}_{fp[:16]}"
    if not in_cache:  # the same spec built into two folders: two modules, each reading its own files
        name += "_" + hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]
    return name


def import_package(folder: Path, module_name: str) -> ModuleType:
    """Import the generated package in ``folder`` as ``module_name`` (its submodules as ``module_name.fwd``, ...).

    Raises:
        BuildError: the package cannot be imported (the message names the folder and the cause).
    """
    init = Path(folder) / "__init__.py"
    spec = importlib.util.spec_from_file_location(module_name, init, submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        raise BuildError(f"{folder}: not an importable package; try `mamba3-gen cache clear` and load again")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Mamba3GenError:
        _forget(module_name)
        raise
    except Exception as e:
        _forget(module_name)
        raise BuildError(f"{folder}: the generated package does not import ({type(e).__name__}: "
                         f"{' '.join(str(e).split())}); try `mamba3-gen cache clear` and load again, and report it if "
                         "it persists") from e
    return module


def _forget(module_name: str) -> None:
    for name in [n for n in sys.modules if n == module_name or n.startswith(module_name + ".")]:
        del sys.modules[name]


def load(spec, arch: Optional[str] = None, *, out_dir=None, force: bool = False) -> ModuleType:
    """Build (if needed) and import a spec's generated package; see :func:`mamba3_gen.load`."""
    from mamba3_gen.spec.sources import resolve_spec

    spec_obj, origin = resolve_spec(spec)
    arch = resolve_arch(arch)
    fp = fingerprint(spec_obj, arch)
    if out_dir is None:
        folder = entry_dir(spec_obj, fp)
    else:
        folder = Path(out_dir) / spec_obj.name
    key = (fp, str(folder.resolve()))
    with _IMPORT_LOCK:  # threads of one process: one import per key
        if key in _MODULES:
            return _MODULES[key]
        if out_dir is None:
            folder = ensure_entry(spec_obj, arch, fp)
        else:
            from mamba3_gen.backends.triton.build import _display_path

            shown = _display_path(origin, folder) if isinstance(spec, (str, os.PathLike)) and origin != "<string>" \
                else (CACHE_SPEC_PATH, "")
            write_package(Path(out_dir), spec_obj.name, _render(spec_obj, arch, *shown), force=force)
        module = import_package(folder, _module_name(spec_obj, fp, folder, out_dir is None))
        _MODULES[key] = module
        return module


# ---------------------------------------------------------------------------------------------------- ls / clear


@dataclass
class Entry:
    """One folder of the cache."""

    path: Path
    name: str  # the spec's name ('?' when the manifest is unreadable)
    arch: str
    fingerprint: str
    complete: bool
    size: int  # bytes, all files of the folder


def _size(folder: Path) -> int:
    total = 0
    for p in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                total += p.stat().st_size
    return total


def entries() -> list[Entry]:
    """The cache's entries, by spec name then folder (none when the cache folder does not exist).

    Raises:
        FileSystemError: the cache folder exists but cannot be listed.
    """
    root = cache_dir()
    if not root.is_dir():
        return []
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name != "locks")
    except OSError as e:
        raise FileSystemError.wrap(e, root, "list the cache", "checking its permissions") from e
    out = []
    for folder in folders:
        try:
            m = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            name, arch, fp = m["name"], m["arch"], m["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            name, arch, fp = folder.name.rsplit("-", 1)[0] if "-" in folder.name else "?", "?", ""
        out.append(Entry(folder, name, arch, fp, bool(fp) and _manifest_ok(folder, fp), _size(folder)))
    return sorted(out, key=lambda e: (e.name, e.path.name))


def remove_entry(entry: Entry) -> None:
    """Delete one cache entry (under its lock, so that no process is writing it meanwhile).

    Raises:
        FileSystemError: the folder cannot be deleted.
    """
    with package_lock(entry.path):
        try:
            shutil.rmtree(entry.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise FileSystemError.wrap(e, entry.path, "delete it", "checking the permissions of the cache folder") from e
