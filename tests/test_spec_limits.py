"""Spec files as a hostile or careless user writes them (issue 10, items 8-10): the work on any spec is bounded (size,
values with aliases expanded, nesting, problems listed) and fails fast; names that cannot be imported, shadow a
module or are too long are refused at validation; YAML types are strict and messages name the type found. Every
refusal is one ``file:line: field: message; try ...`` line and exit code 2 on the CLI, never a traceback."""
from __future__ import annotations

import re
import time

import pytest
from typer.testing import CliRunner

from mamba3_gen.cli import app
from mamba3_gen.errors import SpecError
from mamba3_gen.spec.loader import MAX_NODES, MAX_PROBLEMS, MAX_SPEC_BYTES, load_spec, load_spec_text
from mamba3_gen.spec.sources import load_spec_dict

FAST_S = 5.0  # generous for 2 shared CPU cores: each of these takes well under a second when bounded

FORMAT = r"^x\.yaml:\d+: [a-z_.\[\]0-9]+: .+; try .+$"


def problems(text: str) -> list[str]:
    t0 = time.perf_counter()
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "x.yaml")
    assert time.perf_counter() - t0 < FAST_S, "refusing a spec must be fast"
    for line in info.value.problems:
        assert re.match(FORMAT, line), line
        assert "TaggedScalar" not in line and "object at 0x" not in line
    return info.value.problems


def _alias_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + f"\nname: *a{levels}\n"


# -------------------------------------------------------------------------------------------------------- item 8
def test_alias_bomb_is_refused_fast():
    text = _alias_bomb()
    assert len(text) < 700  # the 600-byte file of the issue: 9^10 values once expanded
    (line,) = problems(text)
    assert f"more than {MAX_NODES} values" in line


def test_oversized_file_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: a\n" + "".join(f"k{i}: 1\n" for i in range(2_000_000)))  # ~21 MB of keys
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=rf"big\.yaml:1: file: is more than {MAX_SPEC_BYTES // 1024} KiB"):
        load_spec(path)
    assert time.perf_counter() - t0 < FAST_S


def test_many_unknown_keys_list_a_bounded_number_of_problems():
    text = "name: a\n" + "".join(f"key_{i}: 1\n" for i in range(1500))  # under the size limit, over the problems
    lines = problems(text)
    assert len(lines) == MAX_PROBLEMS + 1
    assert lines[0].startswith("x.yaml:2: key_0: unknown key 'key_0'")
    assert lines[-1].endswith(f"{1500 - MAX_PROBLEMS} more problems not shown; try fixing the ones above first")


@pytest.mark.parametrize("text", ["name: " + "[" * 400 + "]" * 400 + "\n",
                                  "name: a\ndims: {d_state: " + "{a: " * 40 + "1" + "}" * 41 + "\n"],
                         ids=["flow-list", "flow-map"])
def test_deep_nesting_is_refused_fast(text):
    (line,) = problems(text)
    assert "nested" in line


def test_deep_block_nesting_is_refused():
    text = "".join(" " * i + "a:\n" for i in range(200)) + " " * 200 + "b: 1\n"  # under the size limit
    (line,) = problems(text)
    assert "nested" in line


def test_self_referencing_dict_is_refused():
    doc: dict = {"name": "a", "dims": {}}
    doc["dims"]["loop"] = doc
    with pytest.raises(SpecError, match="nested more than|more than .* values"):
        load_spec_dict(doc)


# -------------------------------------------------------------------------------------------------------- item 9
@pytest.mark.parametrize("name", ["class", "import", "lambda", "def", "async"])
def test_keyword_names(name):
    assert problems(f"name: {name}\n") == [
        f"x.yaml:1: name: '{name}' is a Python keyword, so generated.{name} cannot be imported; try name: {name}_layer"]


@pytest.mark.parametrize("name", ["os", "torch", "triton", "mamba3_gen", "generated", "sys", "json", "numpy", "tests"])
def test_module_shadowing_names(name):
    (line,) = problems(f"name: {name}\n")
    assert line.startswith(f"x.yaml:1: name: '{name}' is the name of the importable module {name}")
    assert line.endswith(f"try name: {name}_layer")


@pytest.mark.parametrize("name", ["cuda", "yaml", "fsspec", "pygments", "shellingham", "markdown_it", "mdurl",
                                  "annotated_types", "click", "rich", "cutlass", "mpmath"])
def test_transitive_dependency_module_names(name):
    """Modules of the requirements' requirements (cuda from cuda-python via nvidia-cutlass-dsl, ...) are refused too."""
    (line,) = problems(f"name: {name}\n")
    assert line == (f"x.yaml:1: name: '{name}' is the name of the importable module {name}, which the generated "
                    f"package would shadow (or be shadowed by); try name: {name}_layer")


def test_reserved_names_cover_the_dependency_closure():
    """The fixed list holds every import name of the installed closure of mamba3-gen's requirements, so a spec is
    valid or not the same way wherever it is checked (the closure is also consulted at run time)."""
    from mamba3_gen.spec.model import RESERVED_NAMES, dependency_module_names

    closure = dependency_module_names()
    assert {"torch", "cuda", "fsspec", "pygments", "shellingham"} <= closure  # found transitively, through metadata
    assert closure <= RESERVED_NAMES, f"add to RESERVED_NAMES: {sorted(closure - RESERVED_NAMES)}"


def test_unrelated_installed_packages_do_not_reserve_names():
    """Only the closure of mamba3-gen's requirements is read from the metadata: its extras (the test extra) and
    distributions it does not require play no part."""
    from mamba3_gen.spec.model import dependency_module_names

    assert "hypothesis" not in dependency_module_names()  # the test extra is not a requirement
    assert dependency_module_names("no-such-distribution-here") == frozenset()
    assert load_spec_text("name: zoh_real\n").name == "zoh_real"


@pytest.mark.parametrize("text, line", [
    ("name: y\nnull: 2\n", "x.yaml:2: null: key null is not a name; try one of: name, discretization, state, "
                            "dims, dtypes, inputs, options"),
    ("name: y\n~: 2\n", "x.yaml:2: null: key null is not a name; try one of: name, discretization, state, dims, "
                         "dtypes, inputs, options"),
    ("name: y\n\ndims:\n  d_state: 8\n  true: 3\n", "x.yaml:5: dims.true: key true is not a name; try one of: "
                                                    "d_state, headdim, mimo_rank, ngroups, chunk_size"),
    ("name: y\ndims:\n  2: 3\n", "x.yaml:3: dims.2: key 2 is not a name; try one of: d_state, headdim, mimo_rank, "
                                 "ngroups, chunk_size"),
])
def test_non_string_keys_are_shown_as_written_on_their_line(text, line):
    """A key that is not a string is shown as YAML writes it (null, true, 2; not None or 1) on the key's own line."""
    assert problems(text) == [line]


LONG = "a" * 5000


@pytest.mark.parametrize("text", [
    f"name: {LONG.upper()}\n", f"name: x\nstate:\n  kind: {LONG}\n", f"name: x\ndims:\n  d_state: {LONG}\n",
    f"name: x\ndtypes:\n  compute: {LONG}\n", f"{LONG}\n", f"name: x\ndims:\n  d_state: !foo {LONG}\n",
    f"name: x\ndims:\n  d_state: {'9' * 5000}\n",
])
def test_long_values_are_clipped_in_messages(text):
    """A 5000-character value is echoed as its first 80 characters, '…' and its length (not a 5000-character
    line); the advice stays short and valid; a whole number Python will not convert is a problem line, not a crash."""
    (line,) = problems(text)
    assert len(line) < 400, line
    assert "a" * 81 not in line.lower()
    if "9" * 5000 not in text:
        assert "… (5000 characters)" in line or "… (50" in line


def test_clip():
    from mamba3_gen.spec.loader import clip

    assert clip("short") == "short" and clip("a" * 80) == "a" * 80
    assert clip("a" * 81) == "a" * 80 + "… (81 characters)"


def test_soft_keywords_are_valid_names():
    assert load_spec_text("name: match\n").name == "match"  # importable: generated.match


def test_overlong_name():
    (line,) = problems("name: " + "a" * 309 + "\n")
    assert line.startswith("x.yaml:1: name: 309 characters is too long (at most 64")
    fix = line.rsplit("try name: ", 1)[1]
    assert len(fix) <= 64 and load_spec_text(f"name: {fix}\n").name == fix  # the advice is itself valid


def test_overlong_name_on_the_cli(tmp_path):
    spec = tmp_path / "long.yaml"
    spec.write_text("name: " + "b" * 309 + "\n")
    res = CliRunner().invoke(app, ["build", str(spec), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "309 characters is too long" in res.output and "Traceback" not in res.output
    assert "File name too long" not in res.output


# ------------------------------------------------------------------------------------------------------- item 10
@pytest.mark.parametrize("value, found, fix", [
    ("true", "true (a boolean)", "d_state: 128"),
    ('"128"', "'128' (a string)", "d_state: 128 (no quotes)"),
    ("!!str 64", "'64' (a string)", "d_state: 64 (no quotes)"),
    ("128.0", "128.0 (a decimal number)", "d_state: 128"),
    ("[128]", "a list", "d_state: 128"),
    ("!custom 64", "a value tagged !custom ('64'); custom YAML tags are not read", "d_state: 128"),
    ("2024-01-01", "a date (2024-01-01); quote it if it is meant as text", "d_state: 128"),
    ("!!binary aGVsbG8=", "binary data (!!binary)", "d_state: 128"),
])
def test_strict_types_name_what_was_found(value, found, fix):
    assert problems(f"name: a\ndims:\n  d_state: {value}\n") == [
        f"x.yaml:3: dims.d_state: expected a whole number, got {found}; try {fix}"]


def test_strict_types_other_fields():
    assert problems("name: a\noptions:\n  varlen: 'yes'\n  d_skip: 1\n") == [
        "x.yaml:3: options.varlen: expected true or false, got 'yes' (a string); try varlen: true",
        "x.yaml:4: options.d_skip: expected true or false, got 1 (a whole number); try d_skip: true",
    ]
    assert problems("name: a\nstate:\n  rope_fraction: '0.5'\n") == [
        "x.yaml:3: state.rope_fraction: '0.5' (a string) is not allowed (allowed: 0.5, 1.0); try rope_fraction: 0.5"]
    assert problems("name: a\ndiscretization:\n  rule: custom\n  weights: [dt, true]\n") == [
        "x.yaml:4: discretization.weights[1]: expected a string, got true (a boolean); try writing it in quotes: "
        "'true'"]
    # a bare number is a formula (a constant weight), as YAML reads it
    assert load_spec_text("name: a\ndiscretization:\n  rule: custom\n  weights: [dt, 5]\n").rule.weights[1] == 5
    assert problems("name: !!int 5\n") == [
        "x.yaml:1: name: expected a string, got 5 (a whole number); try name: my_layer"]


def test_strict_types_keep_what_yaml_means():
    """Strictness refuses wrong types, not the YAML spellings of right ones: !!str on a string, ints for floats."""
    spec = load_spec_text("name: !!str a\ndiscretization:\n  lambda: constant\n  lambda_value: 1\n")
    assert spec.name == "a" and spec.discretization.lambda_value == 1.0
    assert load_spec_text("name: a\nstate:\n  rope_fraction: 1\n").state.rope_fraction == 1.0


def test_cli_exit_code_2_for_each_kind(tmp_path):
    for i, text in enumerate([_alias_bomb(), "name: os\n", "name: a\ndims:\n  d_state: true\n"]):
        spec = tmp_path / f"s{i}.yaml"
        spec.write_text(text)
        res = CliRunner().invoke(app, ["check", str(spec), "--no-aot"])
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and f"s{i}.yaml:" in res.output
