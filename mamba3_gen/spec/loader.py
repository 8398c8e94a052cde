"""Read a YAML spec file into a validated :class:`Spec`, with errors a user can act on.

Every problem becomes one line ``<file>:<line>: <field.path>: <what is wrong>; try <what to do>``: the file as the
user named it, the 1-based line of the offending key (of its parent mapping, or line 1, when the key is missing),
the dotted field path as written in YAML (aliases, e.g. ``discretization.lambda``) and a fix. File-level problems
use the pseudo fields ``file`` (cannot read), ``yaml`` (syntax) and ``spec`` (the document as a whole).
"""
from __future__ import annotations

import datetime
import difflib
import hashlib
import json
import os
import re
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq, CommentedSet, TaggedScalar
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from mamba3_gen.errors import SpecError
from mamba3_gen.spec.model import MAX_NAME, Spec
from mamba3_gen.version import __version__

__all__ = ["SpecError", "load_spec", "load_spec_text", "spec_hash", "json_schema"]

Loc = tuple[Any, ...]

# Bounds on the work a spec costs (a spec is a few dozen lines): the file is read at most this far, the YAML is
# walked with aliases expanded at most this many nodes deep and wide, and at most this many problems are reported.
MAX_SPEC_BYTES = 32 * 1024
MAX_NODES = 5_000
MAX_DEPTH = 16
MAX_PROBLEMS = 50


# ---------------------------------------------------------------------------------------------------------- public


def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Load and validate the spec at ``path``; raise :class:`SpecError` (never another exception) on a user mistake."""
    shown = os.fspath(path)
    try:
        with open(shown, encoding="utf-8") as f:
            text = f.read(MAX_SPEC_BYTES + 1)  # never more: a spec that long is refused anyway
    except FileNotFoundError:
        raise SpecError([_line(shown, 1, "file", "no such file; try a path to an existing spec, e.g. specs/mimo_r4.yaml")])
    except IsADirectoryError:
        raise SpecError([_line(shown, 1, "file", "is a directory; try the path of one .yaml spec file inside it")])
    except UnicodeDecodeError as e:
        raise SpecError([_line(shown, 1, "file", f"is not UTF-8 text ({e.reason}); try saving it as UTF-8")])
    except OSError as e:
        raise SpecError([_line(shown, 1, "file", f"cannot be read ({e.strerror}); try checking its permissions")])
    return load_spec_text(text, filename=shown)


def load_spec_text(text: str, filename: str = "<string>") -> Spec:
    """Same as :func:`load_spec`, from the YAML text itself (``filename`` is only used in messages).

    The work is bounded: text over ``MAX_SPEC_BYTES``, flow brackets nested deeper than ``MAX_DEPTH``, or a document
    of more than ``MAX_NODES`` nodes once its aliases are expanded is refused before it is validated, and at most
    ``MAX_PROBLEMS`` problems are listed.

    Raises:
        SpecError: one ``file:line: field: problem; try fix`` line per problem.
    """
    _check_size(text, filename)
    doc = _parse_yaml(text, filename)
    if doc is None:
        raise SpecError(
            [_line(filename, 1, "spec", "the document is empty; try starting it with 'name: my_layer' (see specs/*.yaml)")]
        )
    if not isinstance(doc, dict):
        raise SpecError(
            [
                _line(
                    filename,
                    _node_line(doc),
                    "spec",
                    f"the top level must be a mapping of sections, got {_describe(_plain(doc))}; "
                    f"try 'key: value' lines: {', '.join(_keys_of(Spec))}",
                )
            ]
        )
    check_nodes(doc, filename)
    try:
        return Spec.model_validate(_plain(doc))
    except ValidationError as e:
        errors = e.errors()
    # At most a few problems more than are shown are translated: the work stays bounded for any document.
    problems = [_translate_safely(err, doc, filename) for err in errors[:2 * MAX_PROBLEMS]]
    # Sort by line (stable: pydantic's field order within a line), dropping exact duplicates.
    problems.sort(key=lambda p: p[0])
    lines = list(dict.fromkeys(msg for _, msg in problems))
    raise SpecError(cap_problems(lines, len(errors) - len(problems), filename, problems[-1][0] if problems else 1))


def cap_problems(lines: list[str], untranslated: int, filename: str, last_line: int) -> list[str]:
    """The first ``MAX_PROBLEMS`` problem lines, and one more saying how many were left out, if any."""
    left = len(lines) - MAX_PROBLEMS + untranslated
    if left <= 0:
        return lines
    return lines[:MAX_PROBLEMS] + [f"{filename}:{last_line}: spec: {left} more problems not shown; try fixing the "
                                   "ones above first"]


def check_nodes(doc: Any, filename: str) -> None:
    """Refuse a document of more than ``MAX_NODES`` values (aliases expanded, so a nest of aliases that would expand
    to millions of values is caught after ``MAX_NODES`` steps) or nested deeper than ``MAX_DEPTH``. Also bounds
    self-referencing dicts given by Python callers.

    Raises:
        SpecError: naming the limit and where the document exceeds it.
    """
    count = 0
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise SpecError([_line(filename, _node_line(node), "spec",
                                   f"the document has more than {MAX_NODES} values (an alias counts its values at each use); "
                                   "try a spec of a few dozen lines as in specs/*.yaml, without aliases of big values")])
        if depth > MAX_DEPTH:
            raise SpecError([_line(filename, _node_line(node), "spec",
                                   f"values are nested more than {MAX_DEPTH} levels deep; try the flat sections of "
                                   "specs/*.yaml (section: key: value)")])
        if isinstance(node, dict):
            for key, value in node.items():
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend((value, depth + 1) for value in node)


def _check_size(text: str, filename: str) -> None:
    if len(text) > MAX_SPEC_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
        raise SpecError([_line(filename, 1, "file", f"is more than {MAX_SPEC_BYTES // 1024} KiB, far more than a spec "
                               "needs; try a spec of a few dozen lines as in specs/*.yaml")])
    depth = deepest = 0
    quote = None
    for ch in text:  # flow brackets nested deep make the YAML parser recurse for seconds before it gives up
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
        elif ch == "\n":
            quote = None  # an unclosed quote is YAML's error to report, not this scan's
    if deepest > MAX_DEPTH:
        raise SpecError([_line(filename, 1, "yaml", f"brackets are nested {deepest} deep (at most {MAX_DEPTH}); "
                               "try the flat sections of specs/*.yaml (section: key: value)")])


def spec_hash(spec: Spec) -> str:
    """sha256 (hex) of the spec's canonical JSON: all fields, defaults included, keys sorted, no spaces."""
    canonical = json.dumps(spec.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a spec file (keys as written in YAML), for editors and documentation."""
    schema = Spec.model_json_schema(by_alias=True)
    out: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:mamba3-gen:spec:{__version__}",
    }
    out.update(schema)
    out["title"] = "mamba3-gen layer spec"
    out.setdefault("description", "A Mamba-3 SSM layer for mamba3-gen to compile into Triton kernels.")
    return out


# ------------------------------------------------------------------------------------------------------- YAML input


def _parse_yaml(text: str, filename: str) -> Any:
    yaml = YAML(typ="rt")
    try:
        return yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = (e.problem or e.context or "invalid YAML").strip()
        raise SpecError([_line(filename, line, "yaml",
                               f"{clip(_one_line(problem), 2 * MAX_SHOWN)}; try {_yaml_hint(problem)}")]) from None
    except YAMLError as e:
        raise SpecError([_line(filename, 1, "yaml", f"{clip(_one_line(str(e)), 2 * MAX_SHOWN)}; try fixing the YAML "
                               "syntax")]) from None
    except ValueError:  # Python refuses to convert a whole number of more than 4300 digits
        long = re.search(r"[0-9][0-9_]{4300,}", text)
        line = text.count("\n", 0, long.start()) + 1 if long else 1
        raise SpecError([_line(filename, line, "yaml", "a whole number of more than 4300 digits cannot be read; try "
                               "a number of the size the field needs (see `mamba3-gen schema`)")]) from None
    except RecursionError:
        raise SpecError([_line(filename, 1, "yaml", "the document is nested too deeply to read; try the flat sections "
                               "of specs/*.yaml (section: key: value)")]) from None


def _yaml_hint(problem: str) -> str:
    if "duplicate key" in problem:
        return "keeping only one of the two keys"
    if "\\t" in problem or "\t" in problem:
        return "indenting with spaces, not tabs"
    if "mapping values are not allowed" in problem:
        return ("indenting this line as the other keys of its section (an indented 'key: value' under a value is "
                "read as part of it), a space after each ':' and one 'key: value' per line (quote values that contain "
                "': ')")
    if "another document" in problem:
        return "one document per file (remove the second '---' and what follows it)"
    if "end of stream" in problem or "expected" in problem:
        return "closing every quote and bracket that is opened"
    return "fixing the indentation, colons and quotes near this line"


class Foreign:
    """A YAML value no spec field can hold (a date, binary data, a set, a custom tag), kept only to be named in the
    error message: pydantic refuses it as it refuses any wrong type, and the message says what it was."""

    def __init__(self, what: str):
        self.what = what

    def __repr__(self) -> str:
        return self.what


_STR_TAG = "tag:yaml.org,2002:str"


def _plain(node: Any) -> Any:
    """ruamel round-trip nodes -> plain Python values (ScalarFloat -> float, CommentedMap -> dict, ``!!str 64`` ->
    '64'); values of other kinds become :class:`Foreign` placeholders that name them."""
    tag = getattr(getattr(node, "tag", None), "value", None)
    if isinstance(node, TaggedScalar):
        if tag == _STR_TAG:
            return str(node.value)
        return Foreign(f"a value tagged {tag} ({_repr(node.value)}); custom YAML tags are not read")
    if tag and tag.startswith("!") and isinstance(node, (CommentedMap, CommentedSeq)):
        return Foreign(f"a {'mapping' if isinstance(node, dict) else 'list'} tagged {tag}; custom YAML tags are not read")
    if isinstance(node, (set, frozenset, CommentedSet)):
        return Foreign("a set (!!set)")
    if isinstance(node, dict):
        return {_plain_key(k): _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    if isinstance(node, bool) or type(node).__name__ == "ScalarBoolean":
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    if isinstance(node, (bytes, bytearray)):
        return Foreign("binary data (!!binary)")
    if isinstance(node, (datetime.date, datetime.datetime)):
        return Foreign(f"a date ({node.isoformat()}); quote it if it is meant as text")
    if node is None:
        return None
    return Foreign(f"a {type(node).__name__} value")


def _plain_key(key: Any) -> Any:
    """A mapping key as a hashable plain value (YAML allows '? [a, b]' keys; they are reported as unknown keys)."""
    key = _plain(key)
    if isinstance(key, (list, dict)):
        return str(key)
    return key


def _node_line(node: Any) -> int:
    lc = getattr(node, "lc", None)
    return lc.line + 1 if lc is not None and lc.line is not None else 1


def _find_line(doc: Any, path: Loc) -> tuple[int, bool]:
    """(line of the deepest key of ``path`` present in the YAML, whether all of it is present).

    A missing key reports the line of its parent's key (the mapping it should be in), or line 1 at the top level."""
    node, line = doc, 1
    for part in path:
        try:
            if isinstance(node, CommentedMap) and part in node:
                child = node[part]
                line = node.lc.key(part)[0] + 1
            elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
                child = node[part]
                line = node.lc.item(part)[0] + 1
            else:
                return line, False
        except (KeyError, IndexError, TypeError, AttributeError):  # e.g. a key brought in by a '<<' merge
            return line, False
        node = child
    return line, True


# ------------------------------------------------------------------------------------------------ the model's shape


def _model_at(path: Loc) -> type[BaseModel] | None:
    """The pydantic model class of the section at ``path`` (aliases), or None when the path leaves the models."""
    model: type[BaseModel] = Spec
    for part in path:
        name = _field_name(model, part)
        if name is None:
            return None
        ann = model.model_fields[name].annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _field_name(model: type[BaseModel], key: Any) -> str | None:
    for name, info in model.model_fields.items():
        if key == (info.alias or name):
            return name
    return None


def _keys_of(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _field_info(path: Loc):
    parent = _model_at(path[:-1]) if path else None
    if parent is None:
        return None
    name = _field_name(parent, path[-1])
    return parent.model_fields[name] if name else None


def _allowed(path: Loc) -> list[Any]:
    info = _field_info(path)
    if info is None:
        return []
    values: list[Any] = []
    for arg in [info.annotation, *typing.get_args(info.annotation)]:
        if typing.get_origin(arg) is typing.Literal:
            values.extend(typing.get_args(arg))
    return values


def _default(path: Loc) -> Any:
    info = _field_info(path)
    if info is None or info.is_required():
        return None
    return info.get_default(call_default_factory=True)


def _is_valid_path(path: Loc) -> bool:
    if not path:
        return False
    if isinstance(path[-1], int):  # an item of a list field (e.g. discretization.weights[1])
        return _is_valid_path(path[:-1])
    parent = _model_at(path[:-1])
    return parent is not None and _field_name(parent, path[-1]) is not None


# --------------------------------------------------------------------------------------------- error translation


_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*|\[[0-9]+\])*): (.*)$", re.S)
_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\[[0-9]+\]")


def _translate_safely(err: dict[str, Any], doc: Any, filename: str) -> tuple[int, str]:
    """:func:`_translate`, falling back to pydantic's own message should an unforeseen error shape trip it up."""
    try:
        return _translate(err, doc, filename)
    except Exception:  # noqa: BLE001 - a user mistake must never end in a traceback
        loc: Loc = tuple(err.get("loc", ()))
        try:
            line, _ = _find_line(doc, loc)
        except Exception:  # noqa: BLE001
            line = 1
        msg = _one_line(str(err.get("msg", "invalid value")))
        return line, _line(filename, line, _dotted(loc), f"{msg}; try a value as in specs/*.yaml")


def _translate(err: dict[str, Any], doc: Any, filename: str) -> tuple[int, str]:
    loc: Loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    value = err.get("input")

    if kind in ("value_error", "assertion_error"):
        # A validator's own message. It may start with "field.path: " relative to the section that raised it.
        msg = str(err.get("ctx", {}).get("error", err.get("msg", "")))
        match = _PREFIX.match(msg)
        if match:
            rel = tuple(int(p[1:-1]) if p.startswith("[") else p for p in _PART.findall(match.group(1)))
            for cand in (loc + rel, rel):
                if _is_valid_path(cand):
                    loc, msg = cand, match.group(2)
                    break
        line, _ = _find_line(doc, loc)
        if "try " not in msg:
            msg += "; try changing this field to a value the documentation allows (see specs/*.yaml)"
        return line, _line(filename, line, _dotted(loc), _one_line(msg))

    line, _ = _find_line(doc, loc)
    field = _dotted(loc)
    key = str(loc[-1]) if loc else "spec"
    default = _default(loc)
    example = yaml_value(default) if default is not None else None

    if kind == "extra_forbidden":
        msg = f"unknown key '{key}'; try {_suggest_key(loc)}"
    elif kind == "invalid_key":
        # pydantic's loc holds str(key) (or 1 for true): point at the key itself, and show it as written in YAML.
        written = _written(value)
        line, _ = _find_line(doc, loc[:-1] + (value,))
        field = f"{_dotted(loc[:-1])}.{written}" if loc[:-1] else written
        msg = f"key {written} is not a name; try one of: {', '.join(_keys_of(_model_at(loc[:-1]) or Spec))}"
    elif kind == "missing":
        line, _ = _find_line(doc, loc[:-1])
        hint = "my_layer" if key == "name" else (example or "...")
        msg = f"missing required key '{key}'; try adding '{key}: {hint}'"
    elif kind == "literal_error":
        allowed = _allowed(loc)
        shown = ", ".join(yaml_value(a) for a in allowed) or err.get("ctx", {}).get("expected", "?")
        if key == "lambda" and isinstance(value, (int, float)) and not isinstance(value, bool):
            fix = f"lambda: constant with lambda_value: {value}"
        else:
            fix = f"{key}: {yaml_value(_closest(value, allowed, default))}"
        shown_value = _typed(value) if isinstance(value, str) and not any(isinstance(a, str) for a in allowed) else (
            _describe(value))  # '0.5' for a number: say it is a string
        msg = f"{shown_value} is not allowed (allowed: {shown}); try {fix}"
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        model = _model_at(loc)
        first = next(iter(model.model_fields.items())) if model else None
        if first:
            fname, finfo = first
            fkey = finfo.alias or fname
            fdef = yaml_value(finfo.get_default(call_default_factory=True))
            sample = f"indented lines such as '{fkey}: {fdef}' under '{key}:'"
        else:
            sample = f"indented 'key: value' lines under '{key}:'"
        if value is None:
            msg = f"section is empty; try {sample}, or removing '{key}:' to keep the defaults"
        else:
            msg = f"expected a mapping of keys, got {_describe(value)}; try {sample}"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        fix = _as_whole(value)
        msg = (f"expected a whole number, got {_typed(value)}; try {key}: "
               f"{fix if fix is not None else example or 1}" + (" (no quotes)" if isinstance(value, str) and fix else ""))
    elif kind in ("float_type", "float_parsing"):
        msg = f"expected a number, got {_typed(value)}; try {key}: {example or 0.5}"
    elif kind in ("bool_type", "bool_parsing"):
        fix = {"true": "true", "yes": "true", "on": "true", "1": "true", "false": "false", "no": "false", "off": "false",
               "0": "false"}.get(str(value).strip().lower()) if isinstance(value, (str, int)) else None
        msg = f"expected true or false, got {_typed(value)}; try {key}: {fix or example or 'true'}"
    elif kind in ("string_type",):
        if loc and isinstance(loc[-1], int):  # an item of a list of formulas
            msg = f"expected a string, got {_typed(value)}; try writing it in quotes: '{_written(value)}'"
        else:
            msg = f"expected a string, got {_typed(value)}; try {key}: {example or _fix_name(value)}"
    elif kind == "string_pattern_mismatch":
        msg = (
            f"{_describe(value)} is not a lowercase identifier (letters, digits, '_', starting with a letter); "
            f"try {key}: {_fix_name(value)}"
        )
    elif kind in ("greater_than_equal", "greater_than"):
        bound = err["ctx"].get("ge", err["ctx"].get("gt"))
        op = ">=" if kind == "greater_than_equal" else ">"
        low = bound if kind == "greater_than_equal" else bound + 1
        also = f" (default {example})" if example is not None else ""
        msg = f"{_describe(value)} is too small (must be {op} {bound}); try {key}: {low} or more{also}"
    elif kind in ("less_than_equal", "less_than"):
        bound = err["ctx"].get("le", err["ctx"].get("lt"))
        op = "<=" if kind == "less_than_equal" else "<"
        high = bound if kind == "less_than_equal" else bound - 1
        msg = f"{_describe(value)} is too large (must be {op} {bound}); try {key}: {high}"
    else:
        base = str(err.get("msg", "invalid value"))
        msg = f"{base[:1].lower()}{base[1:]} (got {_describe(value)}); try {key}: {example or 'a valid value'}"
    return line, _line(filename, line, field, _one_line(msg))


def _suggest_key(loc: Loc) -> str:
    bad = str(loc[-1])
    here = _model_at(loc[:-1])
    valid = _keys_of(here) if here else []
    # The right key in the wrong section (e.g. d_state at the top level)?
    sections = [s for s in _keys_of(Spec) if _model_at((s,)) is not None and (s,) != loc[:-1]]
    for section in sections:
        if bad in _keys_of(_model_at((section,))):
            return f"moving it under '{section}:'"
    close = difflib.get_close_matches(bad, valid, n=1, cutoff=0.6)
    if close:
        return f"'{close[0]}'"
    for section in sections:
        found = difflib.get_close_matches(bad, _keys_of(_model_at((section,))), n=1, cutoff=0.8)
        if found:
            return f"'{found[0]}' under '{section}:'"
    where = f"'{_dotted(loc[:-1])}'" if loc[:-1] else "the top level"
    return f"removing it (keys allowed in {where}: {', '.join(valid)})"


def _closest(value: Any, allowed: list[Any], default: Any = None) -> Any:
    """The allowed value nearest to ``value`` (numerically, or by spelling); the default when nothing is close."""
    if not allowed:
        return value
    numbers = [a for a in allowed if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and numbers:
        return min(numbers, key=lambda a: abs(a - value))
    texts = [str(a) for a in allowed]
    close = difflib.get_close_matches(str(value).lower(), texts, n=1, cutoff=0.6)
    if close:
        return allowed[texts.index(close[0])]
    return default if default in allowed else allowed[0]


def _fix_name(value: Any) -> str:
    if not isinstance(value, str):
        return "my_layer"
    name = re.sub(r"[^a-z0-9_]+", "_", value.strip().lower()).strip("_")
    if not name:
        return "my_layer"
    name = name if name[0].isalpha() else f"layer_{name}"
    return name[:MAX_NAME].rstrip("_")  # the advice is itself a valid name


def _typed(value: Any) -> str:
    """A value and its YAML type, for messages about a value of the wrong type: "'128' (a string)"."""
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list, tuple, Foreign)) or value == "":
        return _describe(value)
    if isinstance(value, str):
        return f"{_describe(value)} (a string)"
    if isinstance(value, int):
        return f"{_repr(value)} (a whole number)"
    if isinstance(value, float):
        return f"{_repr(value)} (a decimal number)"
    return _describe(value)


def _as_whole(value: Any) -> int | None:
    """The whole number a wrongly typed value spells ('128', 128.0), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
        return int(value)
    return None


MAX_SHOWN = 80  # characters of a value echoed in a message; longer ones are cut with an ellipsis and their length


def clip(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` for a message: whole when short, else its first ``limit`` characters, '…' and its length."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _repr(value: Any) -> str:
    """repr() of a value, clipped; a whole number too long for str() (over 4300 digits) says how many bits it has."""
    try:
        return clip(repr(value))
    except ValueError:
        return f"a whole number of {value.bit_length()} bits"


def _written(value: Any) -> str:
    """A scalar as written in YAML (:func:`yaml_value`), clipped for a message."""
    try:
        return clip(yaml_value(value))
    except ValueError:  # a whole number over 4300 digits
        return _repr(value)


def _describe(value: Any) -> str:
    if isinstance(value, Foreign):
        return clip(value.what, 2 * MAX_SHOWN)
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a boolean)"
    if isinstance(value, str):
        return f"'{clip(value)}'" if value else "'' (an empty string)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return _repr(value)


def yaml_value(value: Any) -> str:
    """A scalar as it is written in YAML (null, true/false, numbers, bare strings)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _dotted(loc: Loc) -> str:
    out = ""
    for i, p in enumerate(loc):
        if isinstance(p, int) and _is_list_field(loc[:i]):
            out += f"[{p}]"  # an item of a list field: discretization.weights[1]
        else:
            out += f".{p}" if out else str(p)
    return out or "spec"


def _is_list_field(path: Loc) -> bool:
    info = _field_info(path) if path else None
    if info is None:
        return False
    return any(typing.get_origin(a) is list for a in [info.annotation, *typing.get_args(info.annotation)])


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _line(filename: str, line: int, field: str, msg: str) -> str:
    return f"{filename}:{line}: {field}: {msg}"
