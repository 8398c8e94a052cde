"""A spec from wherever a user has it: a file path, YAML text, a dict or a :class:`Spec` (a sweep needs no files).

Errors are :class:`SpecError` lines as the file loader writes them: ``<file>:<line>: <field>: <problem>; try <fix>``
for files and YAML text (``<string>`` names the text), ``<dict>: <field>: ...`` for dicts and Spec objects, which
have no lines.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from pydantic import ValidationError

from mamba3_gen.errors import SpecError
from mamba3_gen.spec.loader import MAX_PROBLEMS, _translate_safely, cap_problems, check_nodes, load_spec, load_spec_text
from mamba3_gen.spec.model import Spec

__all__ = ["SpecSource", "resolve_spec", "load_spec_dict", "apply_overrides", "spec_with_overrides"]

SpecSource = Union[str, os.PathLike, Mapping, Spec, bytes]
TEXT_NAME = "<string>"
DICT_NAME = "<dict>"


def load_spec_dict(doc: Mapping, name: str = DICT_NAME) -> Spec:
    """Validate a spec given as a dict (keys as in YAML, e.g. ``{"name": "x", "dims": {"mimo_rank": 2}}``).

    Raises:
        SpecError: one ``<dict>: field: problem; try fix`` line per problem.
    """
    if not isinstance(doc, Mapping):
        raise SpecError([f"{name}: spec: expected a mapping of sections, got {type(doc).__name__}; "
                         "try a dict such as {'name': 'my_layer', 'dims': {'mimo_rank': 2}}"])
    plain = dict(doc)

    def drop_line(msg: str) -> str:  # the loader writes '<name>:<line>: ...'; a dict has no lines
        head, sep, rest = msg.partition(": ")
        return f"{head.rsplit(':', 1)[0]}: {rest}" if sep and head.startswith(name + ":") else msg

    try:
        check_nodes(plain, name)  # bounded work, also for self-referencing dicts
    except SpecError as e:
        raise SpecError([drop_line(m) for m in e.problems]) from None
    try:
        return Spec.model_validate(plain)
    except ValidationError as e:
        errors = e.errors()
    problems = [_translate_safely(err, plain, name)[1] for err in errors[:2 * MAX_PROBLEMS]]
    lines = list(dict.fromkeys(drop_line(msg) for msg in problems))
    raise SpecError([drop_line(m) for m in cap_problems(lines, len(errors) - len(problems), name, 1)])


def _looks_like_yaml(text: str) -> bool:
    stripped = text.strip()
    return "\n" in stripped or stripped.startswith("{") or ": " in stripped


def resolve_spec(source: Any) -> tuple[Spec, str]:
    """(validated Spec, the name to show for it) of a spec given as:

    - a path (``str`` or ``os.PathLike``) to a YAML file;
    - YAML text (a ``str`` with a newline, or a one-line flow mapping such as ``"{name: x, dims: {mimo_rank: 2}}"``);
    - a dict, as the YAML would parse;
    - a :class:`Spec` (validated again, so that fields changed after construction are checked too).

    Raises:
        SpecError: the spec is invalid or cannot be read; or ``source`` is none of the above.
    """
    if isinstance(source, Spec):
        return load_spec_dict(source.model_dump(mode="json", by_alias=True), "<Spec>"), f"spec {source.name!r}"
    if isinstance(source, Mapping):
        return load_spec_dict(source), DICT_NAME
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpecError([f"{TEXT_NAME}:1: file: is not UTF-8 text ({e.reason}); try passing a str"]) from None
    if isinstance(source, os.PathLike):
        return load_spec(source), os.fspath(source)
    if isinstance(source, str):
        if "\n" not in source and Path(source).is_file():
            return load_spec(source), source
        if _looks_like_yaml(source):
            return load_spec_text(source, TEXT_NAME), TEXT_NAME
        return load_spec(source), source  # a path that does not exist: the loader says so
    raise SpecError([f"<spec>: spec: expected a path, YAML text, a dict or a Spec, got {type(source).__name__}; "
                     "try mamba3_gen.load('specs/mimo_r4.yaml')"])


def apply_overrides(doc: Mapping, sets: "list[str] | tuple[str, ...]", option: str = "--set") -> dict:
    """A copy of the spec dict ``doc`` (keys as in YAML) with each ``SECTION.FIELD=VALUE`` of ``sets`` applied in
    order, e.g. ``dims.d_state=64``. VALUE is parsed as YAML (``64`` a number, ``true`` a bool, ``adt - dt`` text;
    ``[dt]`` a list), so every type a spec file can hold can be set. Nothing is validated here: pass the result to
    :func:`load_spec_dict` (as :func:`spec_with_overrides` does).

    Raises:
        SpecError: an item not of the form ``SECTION.FIELD=VALUE`` or whose VALUE is not YAML (one line each,
        ``<option>: ...; try ...``).
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    out = {key: (dict(val) if isinstance(val, Mapping) else val) for key, val in doc.items()}
    problems = []
    for item in sets:
        key, sep, value = item.partition("=")
        path = key.strip().split(".")
        if not sep or len(path) != 2 or not all(path):
            problems.append(f"{option}: takes SECTION.FIELD=VALUE, got {item!r}; try e.g. {option} dims.d_state=64")
            continue
        try:
            parsed = YAML(typ="safe", pure=True).load(value) if value.strip() else value
        except YAMLError as e:
            problems.append(f"{option}: the value of {key} is not YAML ({type(e).__name__}); try quoting it")
            continue
        section = out.get(path[0])
        out[path[0]] = section = dict(section) if isinstance(section, Mapping) else {}
        section[path[1]] = parsed
    if problems:
        raise SpecError(problems)
    return out


def spec_with_overrides(source: Any, sets: "list[str] | tuple[str, ...]" = (), option: str = "--set") -> Spec:
    """The validated Spec of ``source`` (anything :func:`resolve_spec` takes) with ``SECTION.FIELD=VALUE``
    overrides applied (:func:`apply_overrides`); ``source`` itself when ``sets`` is empty.

    Raises:
        SpecError: the source is invalid, an override is malformed, or the overridden spec is invalid
        (``<dict>: field: ...`` lines).
    """
    spec, _ = resolve_spec(source)
    if not sets:
        return spec
    out = load_spec_dict(apply_overrides(spec.model_dump(mode="json", by_alias=True), list(sets), option))
    # the dump writes every field, so the spec's own refusal of unread fields cannot see which one was overridden
    unread = set(out.unread_fields())
    wasted = [item for item in sets if item.partition("=")[0].strip() in unread]
    if wasted:
        raise SpecError([f"{option}: {item} sets a field spec {out.name!r} never reads; try removing it"
                         for item in wasted])
    return out
