"""Where mamba3-gen finds its templates and writes its packages, in a source checkout and in an installed wheel alike.

The templates live at the repository root (``templates/``); the wheel maps that folder into the package as
``mamba3_gen/templates/`` (``package-dir`` in pyproject.toml). An editable install or a checkout on ``sys.path``
reads them from the repository.
"""
from __future__ import annotations

from pathlib import Path

from mamba3_gen.errors import BuildError

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent  # the checkout's root when running from one; site-packages in an installed wheel


def in_checkout() -> bool:
    """True when this mamba3_gen runs from a source checkout (the package beside pyproject.toml and templates/)."""
    return (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "templates").is_dir()


def templates_dir(backend: str | None = None) -> Path:
    """The templates folder (of one backend, e.g. ``"triton"``, when given).

    Raises:
        BuildError: neither the installed copy (``mamba3_gen/templates``) nor the checkout's ``templates/`` exists.
    """
    for root in (PACKAGE_DIR / "templates", REPO_ROOT / "templates"):
        if root.is_dir():
            return root / backend if backend else root
    raise BuildError(f"templates: not found in {PACKAGE_DIR / 'templates'} (installed) or {REPO_ROOT / 'templates'} "
                     "(checkout); the installation is incomplete; try `pip install --force-reinstall mamba3-gen`, "
                     "or `pip install -e .` in a checkout")


def default_out_dir() -> Path:
    """Where ``mamba3-gen build`` writes without ``--out``: the checkout's ``generated/`` (the committed examples), or
    ``./generated`` in the working directory when mamba3-gen is installed from a wheel (never site-packages)."""
    return REPO_ROOT / "generated" if in_checkout() else Path.cwd() / "generated"
