"""A non-editable install works from any directory (issue 9, failure 1): the wheel carries the templates, `mamba3-gen
build` writes into the working directory (never site-packages), and `mamba3_gen.load` builds into the cache and runs.

The wheel test (marked `install`, about half a minute) builds a wheel of the checkout and installs it, without its
dependencies, into a fresh virtual environment that sees this environment's packages (torch, triton, ...) but not the
project's source: the `.pth` hook of an editable install is not run there, and every command runs from a temporary
directory.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from mamba3_gen.backends.triton.build import PACKAGE_FILES
from tests.tiny import TINY

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_pyproject_lists_every_package_and_maps_the_templates():
    """The package list is explicit (the templates mapping needs it): a new subpackage must be added to it."""
    cfg = _pyproject()["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "mamba3_gen").rglob("__init__.py")
               if "__pycache__" not in p.parts}
    missing = sorted(on_disk - listed)
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}"
    assert cfg["package-dir"] == {"mamba3_gen.templates": "templates"}
    assert "mamba3_gen.templates" in listed
    deps = " ".join(_pyproject()["project"]["dependencies"])
    assert "platformdirs" in deps and "filelock" in deps


def _system_site_paths() -> list[str]:
    """This environment's site folders and the plain folders their .pth files add (import hooks, such as the
    editable install's finder, are left out: the venv must not see the checkout)."""
    paths = []
    for sp in site.getsitepackages():
        paths.append(sp)
        for pth in sorted(Path(sp).glob("*.pth")):
            for line in pth.read_text(errors="replace").splitlines():
                line = line.strip()
                if not line or line.startswith(("#", "import ")):
                    continue
                folder = (Path(sp) / line).resolve()
                if folder.is_dir() and REPO not in (folder, *folder.parents):
                    paths.append(str(folder))
    return paths


def _run(cmd, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc


@pytest.mark.install
def test_wheel_install_builds_and_loads_from_a_foreign_directory(tmp_path):
    # 1. a wheel of the checkout's files (copied, so that the build leaves nothing in the working tree)
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("mamba3_gen", "templates"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", src / "pyproject.toml")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MAMBA3_GEN_CACHE_DIR")}
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path / "dist"),
          str(src)], cwd=tmp_path, env=env)
    (wheel,) = (tmp_path / "dist").glob("mamba3_gen-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    templates = sorted(p.relative_to(REPO / "templates").as_posix() for p in (REPO / "templates").rglob("*.jinja"))
    assert [n for n in templates if f"mamba3_gen/templates/{n}" not in names] == []

    # 2. a fresh venv that sees this environment's packages but not the checkout
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=env)
    py = venv / "bin" / "python"
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path,
                   env=env).stdout.strip()
    Path(purelib, "_host_packages.pth").write_text("\n".join(_system_site_paths()) + "\n")
    _run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], cwd=tmp_path, env=env)

    # 3. from a foreign directory: the CLI builds into ./generated, load builds into the cache and runs a forward
    work = tmp_path / "work"
    work.mkdir()
    (work / "tiny.yaml").write_text(TINY)
    env.update(MAMBA3_GEN_CACHE_DIR=str(tmp_path / "cache"), TRITON_INTERPRET="1")
    cli = venv / "bin" / "mamba3-gen"
    first = _run([str(cli), "build", "tiny.yaml", "--arch", "interpreter"], cwd=work, env=env)
    assert "written" in first.stdout
    built = sorted(p.name for p in (work / "generated" / "tiny").iterdir())
    assert built == sorted(PACKAGE_FILES)
    again = _run([str(cli), "build", "tiny.yaml", "--arch", "interpreter"], cwd=work, env=env)
    assert "written" not in again.stdout and again.stdout.count("unchanged") == len(PACKAGE_FILES)

    script = textwrap.dedent("""\
        import json, sys
        import mamba3_gen
        from mamba3_gen.reference import make_inputs, naive_recurrence, rel_err
        from mamba3_gen.spec.sources import resolve_spec
        module = mamba3_gen.load("tiny.yaml")
        spec, _ = resolve_spec("tiny.yaml")
        kw = make_inputs(spec, 1, 6, 2)
        err = rel_err(module.mamba3_forward(**kw), naive_recurrence(spec, **kw)[0])
        print(json.dumps({"package": mamba3_gen.__file__, "module": module.__file__, "err": err,
                          "path": sys.path}))
    """)
    out = json.loads(_run([str(py), "-c", script], cwd=work, env=env).stdout.strip().splitlines()[-1])
    assert out["package"].startswith(str(venv)), out["package"]  # the installed copy, not the checkout
    assert not any(p and Path(p).resolve() == REPO for p in out["path"])
    assert out["module"].startswith(str(tmp_path / "cache")), out["module"]
    assert out["err"] < 1e-5
    assert not list(Path(purelib).glob("generated")) and not (Path(purelib) / "mamba3_gen" / "generated").exists()
