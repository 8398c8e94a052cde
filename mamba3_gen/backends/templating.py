"""Jinja plumbing shared by the backends: one environment setup and one template hash, so that every backend
renders with the same strictness (unknown names are errors) and whitespace rules, reproducibly."""
from __future__ import annotations

import hashlib
import pprint
from pathlib import Path

import jinja2


def template_env(template_dir: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["pyrepr"] = lambda obj: pprint.pformat(obj, width=110, sort_dicts=True)
    env.filters["add_suffix"] = lambda name, suffix: f"{name}{suffix}"
    return env


def templates_hash(template_dir: Path) -> str:
    """sha256 over a template folder (relative paths and bytes), for the generated files' headers."""
    h = hashlib.sha256()
    for p in sorted(template_dir.rglob("*.jinja")):
        h.update(p.relative_to(template_dir).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()
