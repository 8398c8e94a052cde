"""The spec loader: shipped specs, the canonical hash, the JSON schema, and one exact message per kind of mistake."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from mamba3_gen.spec.loader import SpecError, json_schema, load_spec, load_spec_text, spec_hash
from mamba3_gen.spec.model import Spec

SPECS = Path(__file__).resolve().parent.parent / "specs"
SHIPPED = [
    "siso_euler_real",
    "siso_trap_complex",
    "mimo_r4",
    "mimo_r2_const_half_fullrope",
    "mimo_r4_init",
    "zoh_real",
    "two_lag_complex",
]


def problems(text: str, filename: str = "specs/x.yaml") -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec_text(text, filename)
    err = info.value
    assert str(err) == "\n".join(err.problems)
    for line in err.problems:
        assert line.startswith(f"{filename}:"), line
        assert "; try " in line, line
        assert "\n" not in line, line
    return err.problems


def one_problem(text: str, filename: str = "specs/x.yaml") -> str:
    found = problems(text, filename)
    assert len(found) == 1, found
    return found[0]


# ----------------------------------------------------------------------------------------------- shipped specs


@pytest.mark.parametrize("stem", SHIPPED)
def test_shipped_spec_loads(stem):
    path = SPECS / f"{stem}.yaml"
    spec = load_spec(path)
    assert spec.name == stem
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# "), "a header comment"
    for raw in text.splitlines():
        if raw.strip() and not raw.lstrip().startswith("#") and not raw.rstrip().endswith(":"):
            assert "#" in raw, f"field without a comment: {raw!r}"


def test_shipped_spec_contents():
    euler = load_spec(SPECS / "siso_euler_real.yaml")
    assert euler.discretization.rule == "exp_euler"
    assert euler.state.kind == "real" and not euler.is_complex and euler.num_angles == 0
    assert euler.lags == 0 and not euler.has_trap_input
    assert (euler.dims.d_state, euler.dims.headdim, euler.dims.mimo_rank, euler.dims.ngroups) == (128, 64, 1, 1)
    assert euler.dims.chunk_size == 64
    assert (euler.dtypes.input, euler.dtypes.compute, euler.dtypes.state) == ("bf16", "tf32", "fp32")
    assert all(euler.options.model_dump().values())

    siso = load_spec(SPECS / "siso_trap_complex.yaml")
    assert siso.discretization.rule == "exp_trapezoidal" and siso.discretization.lambda_ == "data"
    assert siso.has_trap_input and siso.lags == 1
    assert (siso.state.kind, siso.state.rope_fraction, siso.state.rotation) == ("complex", 0.5, "pairwise")
    assert siso.num_angles == 32 and siso.dims.mimo_rank == 1 and siso.dims.chunk_size == 64
    assert all(siso.options.model_dump().values())

    mimo = load_spec(SPECS / "mimo_r4.yaml")
    assert (mimo.state.rope_fraction, mimo.state.rotation) == (0.5, "halved")
    assert (mimo.dims.mimo_rank, mimo.dims.chunk_size, mimo.dims.ngroups) == (4, 16, 1)
    assert mimo.options.model_dump() == {
        "d_skip": True, "z_gate": True, "initial_states": False, "final_states": True, "varlen": True,
    }

    init = load_spec(SPECS / "mimo_r4_init.yaml")
    assert init.options.initial_states is True
    same = init.model_dump()
    same["name"] = "mimo_r4"
    same["options"]["initial_states"] = False
    assert same == mimo.model_dump(), "mimo_r4_init differs from mimo_r4 only by initial_states"

    const = load_spec(SPECS / "mimo_r2_const_half_fullrope.yaml")
    assert (const.discretization.lambda_, const.discretization.lambda_value) == ("constant", 0.5)
    assert not const.has_trap_input and const.lags == 1
    assert (const.state.rope_fraction, const.state.rotation, const.num_angles) == (1.0, "halved", 64)
    assert (const.dims.mimo_rank, const.dims.chunk_size) == (2, 32)
    assert all(const.options.model_dump().values())


def test_shipped_formula_specs():
    zoh = load_spec(SPECS / "zoh_real.yaml")
    assert zoh.discretization.rule == "zoh" and zoh.lags == 0 and not zoh.has_trap_input and not zoh.is_complex
    two = load_spec(SPECS / "two_lag_complex.yaml")
    assert two.discretization.rule == "custom" and two.lags == 2 and two.has_trap_input and two.is_complex
    assert len(two.discretization.weights) == 3 and two.discretization.log_decay == "adt - 0.05 * dt"


def test_no_unlisted_specs_shipped():
    assert sorted(p.stem for p in SPECS.glob("*.yaml")) == sorted(SHIPPED)


# ------------------------------------------------------------------------------------------------------ hashing


def test_spec_hash_is_stable_and_canonical():
    hashes = {stem: spec_hash(load_spec(SPECS / f"{stem}.yaml")) for stem in SHIPPED}
    assert len(set(hashes.values())) == len(SHIPPED), "distinct specs hash differently"
    for h in hashes.values():
        assert len(h) == 64 and int(h, 16) >= 0

    spec = load_spec(SPECS / "mimo_r4.yaml")
    # Round trip through canonical JSON and through a re-validated dump: same hash.
    dumped = spec.model_dump(mode="json", by_alias=True)
    assert spec_hash(Spec.model_validate(dumped)) == hashes["mimo_r4"]
    assert spec_hash(Spec.model_validate(json.loads(json.dumps(dumped)))) == hashes["mimo_r4"]
    # Comments, key order, flow style and spelled-out defaults do not change the hash.
    minimal = (
        "dims: {mimo_rank: 4, chunk_size: 16}  # everything else default\n"
        "state: {rotation: halved}\n"
        "options: {initial_states: false, varlen: true}\n"
        "name: mimo_r4\n"
    )
    assert spec_hash(load_spec_text(minimal)) == hashes["mimo_r4"]
    # Any changed value changes it.
    assert spec_hash(load_spec_text(minimal.replace("chunk_size: 16", "chunk_size: 32"))) != hashes["mimo_r4"]


def test_spec_hash_matches_documented_recipe():
    import hashlib

    spec = load_spec_text("name: a\n")
    canonical = json.dumps(spec.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))
    assert '"lambda":"data"' in canonical and "lambda_" not in canonical.replace("lambda_value", "")
    assert spec_hash(spec) == hashlib.sha256(canonical.encode()).hexdigest()


def test_json_schema():
    schema = json_schema()
    assert schema["$id"].startswith("urn:mamba3-gen:spec")
    assert schema["title"] == "mamba3-gen layer spec"
    assert schema["required"] == ["name"]
    assert set(schema["properties"]) == {"name", "discretization", "state", "dims", "dtypes", "inputs", "options"}
    disc = schema["$defs"]["Discretization"]["properties"]
    assert "lambda" in disc and "lambda_" not in disc
    dims = schema["$defs"]["Dims"]["properties"]
    assert dims["mimo_rank"]["minimum"] == 1 and dims["mimo_rank"]["maximum"] == 8
    assert dims["d_state"]["minimum"] == 4 and dims["headdim"]["minimum"] == 4
    json.dumps(schema)  # serialisable


# ------------------------------------------------------------------------------------------- file-level errors


def test_file_not_found(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(missing)
    assert info.value.problems == [
        f"{missing}:1: file: no such file; try a path to an existing spec, e.g. specs/mimo_r4.yaml"
    ]


def test_path_as_given_by_user(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "x.yaml").write_text("name: a\ndims:\n  mimo_rank: 9\n")
    with pytest.raises(SpecError) as info:
        load_spec("specs/x.yaml")
    assert info.value.problems == [
        "specs/x.yaml:3: dims.mimo_rank: 9 is too large (must be <= 8); try mimo_rank: 8"
    ]


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert info.value.problems == [f"{tmp_path}:1: file: is a directory; try the path of one .yaml spec file inside it"]


def test_yaml_syntax_error_line():
    text = "name: a\ndims:\n  d_state: 64\n    headdim: 3\n"
    assert one_problem(text) == (
        "specs/x.yaml:4: yaml: mapping values are not allowed here; "
        "try indenting this line as the other keys of its section (an indented 'key: value' under a value is read "
        "as part of it), a space after each ':' and one 'key: value' per line (quote values that contain ': ')"
    )


def test_yaml_tab_and_duplicate_key():
    assert one_problem("name: a\ndims:\n\td_state: 64\n") == (
        "specs/x.yaml:3: yaml: found character '\\t' that cannot start any token; try indenting with spaces, not tabs"
    )
    assert one_problem("# a comment\nname: a\nstate:\n  kind: real\nname: b\n") == (
        'specs/x.yaml:5: yaml: found duplicate key "name" with value "b" (original value: "a"); '
        "try keeping only one of the two keys"
    )


def test_top_level_not_a_mapping():
    assert one_problem("# header\n- name: a\n- dims: {}\n") == (
        "specs/x.yaml:2: spec: the top level must be a mapping of sections, got a list; "
        "try 'key: value' lines: name, discretization, state, dims, dtypes, inputs, options"
    )
    assert one_problem("just text\n").startswith("specs/x.yaml:1: spec: the top level must be a mapping of sections, got 'just text';")
    assert one_problem("# only a comment\n") == (
        "specs/x.yaml:1: spec: the document is empty; try starting it with 'name: my_layer' (see specs/*.yaml)"
    )


# ----------------------------------------------------------------------------------------------- field errors


def test_unknown_keys_with_suggestions():
    text = (
        "name: a\n"          # 1
        "dims:\n"            # 2
        "  d_stat: 64\n"     # 3  typo of a key of this section
        "  foo: 1\n"         # 4  nothing close
        "d_state: 64\n"      # 5  right key, wrong section
        "optoins:\n"         # 6  typo of a section
        "  varlen: true\n"   # 7
    )
    assert problems(text) == [
        "specs/x.yaml:3: dims.d_stat: unknown key 'd_stat'; try 'd_state'",
        "specs/x.yaml:4: dims.foo: unknown key 'foo'; "
        "try removing it (keys allowed in 'dims': d_state, headdim, mimo_rank, ngroups, chunk_size)",
        "specs/x.yaml:5: d_state: unknown key 'd_state'; try moving it under 'dims:'",
        "specs/x.yaml:6: optoins: unknown key 'optoins'; try 'options'",
    ]


def test_missing_name_points_at_line_1():
    assert one_problem("# comment\n\ndims:\n  d_state: 64\n") == (
        "specs/x.yaml:1: name: missing required key 'name'; try adding 'name: my_layer'"
    )


def test_wrong_types():
    text = (
        "name: a\n"              # 1
        "dims:\n"                # 2
        "  d_state: big\n"       # 3
        "  headdim: 64.5\n"      # 4
        "options:\n"             # 5
        "  z_gate: true\n"       # 6
        "  d_skip: maybe\n"      # 7
        "discretization:\n"      # 8
        "  lambda: constant\n"   # 9
        "  lambda_value: half\n"  # 10
    )
    assert problems(text) == [
        "specs/x.yaml:3: dims.d_state: expected a whole number, got 'big' (a string); try d_state: 128",
        "specs/x.yaml:4: dims.headdim: expected a whole number, got 64.5 (a decimal number); try headdim: 64",
        "specs/x.yaml:7: options.d_skip: expected true or false, got 'maybe' (a string); try d_skip: true",
        "specs/x.yaml:10: discretization.lambda_value: expected a number, got 'half' (a string); try lambda_value: 0.5",
    ]


def test_section_of_wrong_type():
    text = "name: a\ndims: 5\nstate:\noptions: [1]\n"
    assert problems(text) == [
        "specs/x.yaml:2: dims: expected a mapping of keys, got 5; try indented lines such as 'd_state: 128' under 'dims:'",
        "specs/x.yaml:3: state: section is empty; "
        "try indented lines such as 'kind: complex' under 'state:', or removing 'state:' to keep the defaults",
        "specs/x.yaml:4: options: expected a mapping of keys, got a list; "
        "try indented lines such as 'd_skip: true' under 'options:'",
    ]


def test_name_pattern_and_null():
    assert one_problem("name: Mamba3-SISO\n") == (
        "specs/x.yaml:1: name: 'Mamba3-SISO' is not a lowercase identifier (letters, digits, '_', starting with a "
        "letter); try name: mamba3_siso"
    )
    assert one_problem("dims: {}\nname:\n") == "specs/x.yaml:2: name: expected a string, got nothing (null); try name: my_layer"


def test_enum_values_list_the_allowed_ones():
    text = (
        "name: a\n"                 # 1
        "discretization:\n"         # 2
        "  rule: exp_eular\n"       # 3
        "state:\n"                  # 4
        "  rope_fraction: 0.25\n"   # 5
        "  kind: Complex\n"         # 6
        "  rotation: interleaved\n"  # 7
        "dtypes:\n"                 # 8
        "  input: fp16\n"           # 9
        "  compute: fp64\n"         # 10  nothing spelled close: the default is suggested
    )
    assert problems(text) == [
        "specs/x.yaml:3: discretization.rule: 'exp_eular' is not allowed (allowed: exp_euler, exp_trapezoidal, zoh, custom); "
        "try rule: exp_euler",
        "specs/x.yaml:5: state.rope_fraction: 0.25 is not allowed (allowed: 0.5, 1.0); try rope_fraction: 0.5",
        "specs/x.yaml:6: state.kind: 'Complex' is not allowed (allowed: real, complex); try kind: complex",
        "specs/x.yaml:7: state.rotation: 'interleaved' is not allowed (allowed: pairwise, halved); try rotation: pairwise",
        "specs/x.yaml:9: dtypes.input: 'fp16' is not allowed (allowed: bf16, fp32); try input: bf16",
        "specs/x.yaml:10: dtypes.compute: 'fp64' is not allowed (allowed: tf32, bf16, fp32); try compute: tf32",
    ]


def test_lambda_given_a_number():
    assert one_problem("name: a\ndiscretization:\n  lambda: 0.5\n") == (
        "specs/x.yaml:3: discretization.lambda: 0.5 is not allowed (allowed: data, constant); "
        "try lambda: constant with lambda_value: 0.5"
    )


def test_rope_fraction_integer_one_is_accepted():
    assert load_spec_text("name: a\nstate:\n  rope_fraction: 1\n").state.rope_fraction == 1.0


def test_dims_bounds():
    text = "name: a\ndims:\n  mimo_rank: 9\n  d_state: 2\n  headdim: 2\n  ngroups: 0\n"
    assert problems(text) == [
        "specs/x.yaml:3: dims.mimo_rank: 9 is too large (must be <= 8); try mimo_rank: 8",
        "specs/x.yaml:4: dims.d_state: 2 is too small (must be >= 4); try d_state: 4 or more (default 128)",
        "specs/x.yaml:5: dims.headdim: 2 is too small (must be >= 4); try headdim: 4 or more (default 64)",
        "specs/x.yaml:6: dims.ngroups: 0 is too small (must be >= 1); try ngroups: 1 or more (default 1)",
    ]
    assert one_problem("name: a\ndims:\n  mimo_rank: 0\n") == (
        "specs/x.yaml:3: dims.mimo_rank: 0 is too small (must be >= 1); try mimo_rank: 1 or more (default 1)"
    )


def test_small_chunks_are_allowed():
    spec = load_spec_text("name: a\ndims:\n  chunk_size: 2\n  mimo_rank: 8\n  d_state: 4\n  headdim: 4\n")
    assert (spec.dims.chunk_size, spec.dims.mimo_rank, spec.dims.d_state) == (2, 8, 4)
    assert load_spec_text("name: a\ndims:\n  chunk_size: 32\n  mimo_rank: 8\n").dims.chunk_size == 32  # 256 rows


def test_chunk_rows_limit_points_at_chunk_size():
    text = "name: a\ndims:\n  chunk_size: 128\n  mimo_rank: 4\n"
    assert one_problem(text) == (
        "specs/x.yaml:3: dims.chunk_size: chunk_size*mimo_rank=512 rows exceed 256 per chunk tile; try chunk_size: 16"
    )
    assert one_problem("name: a\ndims:\n  chunk_size: 512\n") == (
        "specs/x.yaml:3: dims.chunk_size: chunk_size*mimo_rank=512 rows exceed 256 per chunk tile; try chunk_size: 64"
    )


def test_chunk_rows_limit_with_chunk_size_defaulted_points_at_dims():
    # chunk_size is not written (default 64): the problem is reported on the 'dims:' line.
    assert one_problem("name: a\n\ndims:\n  mimo_rank: 8\n") == (
        "specs/x.yaml:3: dims.chunk_size: chunk_size*mimo_rank=512 rows exceed 256 per chunk tile; try chunk_size: 8"
    )


def test_cross_field_validators_point_at_the_field():
    assert one_problem("name: a\ndims:\n  headdim: 64\n  d_state: 127\n") == (
        "specs/x.yaml:4: dims.d_state: N=127 is odd (the state is split into two halves); try d_state: 128"
    )
    assert one_problem("name: a\ndims:\n  chunk_size: 48\n") == (
        "specs/x.yaml:3: dims.chunk_size: 48 is not a power of two; try chunk_size: 32"
    )
    assert one_problem("name: a\ndims:\n  chunk_size: 56\n  mimo_rank: 2\n") == (
        "specs/x.yaml:3: dims.chunk_size: 56 is not a power of two; try chunk_size: 64"
    )
    # 65*3 = 195 rows fits, but 128*3 would not: the suggestion stays under the limit.
    assert one_problem("name: a\ndims:\n  chunk_size: 65\n  mimo_rank: 3\n") == (
        "specs/x.yaml:3: dims.chunk_size: 65 is not a power of two; try chunk_size: 64"
    )


def test_lambda_validators():
    assert one_problem("name: a\ndiscretization:\n  rule: exp_trapezoidal\n  lambda: constant\n") == (
        "specs/x.yaml:4: discretization.lambda: 'constant' needs lambda_value in [0, 1]; try adding lambda_value: 0.5"
    )
    assert one_problem("name: a\ndiscretization:\n  lambda_value: 1.5\n  lambda: constant\n") == (
        "specs/x.yaml:3: discretization.lambda_value: 1.5 is outside [0, 1]; try lambda_value: 0.5"
    )
    assert one_problem("name: a\ndiscretization:\n  rule: exp_euler\n  lambda_value: 0.5\n") == (
        "specs/x.yaml:4: discretization.lambda_value: the rule exp_euler does not use λ (its formulas have no lam); "
        "try removing 'lambda_value', or rule: exp_trapezoidal"
    )
    assert one_problem("name: a\ndiscretization:\n  rule: exp_euler\n  lambda: constant\n  lambda_value: 1\n") == (
        "specs/x.yaml:4: discretization.lambda: the rule exp_euler does not use λ (its formulas have no lam); "
        "try removing 'lambda', or rule: exp_trapezoidal"
    )
    assert one_problem("name: a\ndiscretization:\n  lambda_value: 0.5\n") == (
        "specs/x.yaml:3: discretization.lambda_value: only read when lambda: constant; "
        "try removing lambda_value, or setting lambda: constant"
    )


def test_fields_the_spec_never_reads_are_refused():
    """A rotation field on a real state, or inputs.trap where no λ is read per token, is a mistake (as lambda on a
    rule without λ). A section with every field written is a dump of a Spec re-read, which is accepted."""
    assert one_problem("name: a\nstate:\n  kind: real\n  rotation: halved\n") == (
        "specs/x.yaml:4: state.rotation: only read for a complex state (kind: real rotates nothing); "
        "try removing 'rotation', or kind: complex")
    assert one_problem("name: a\nstate:\n  kind: real\n  rope_fraction: 1.0\n") == (
        "specs/x.yaml:4: state.rope_fraction: only read for a complex state (kind: real rotates nothing); "
        "try removing 'rope_fraction', or kind: complex")
    assert one_problem("name: a\ndiscretization:\n  rule: zoh\ninputs:\n  trap: lambda\n") == (
        "specs/x.yaml:5: inputs.trap: only read when the layer takes λ per token, and the rule zoh does not use λ; "
        "try removing 'trap'")
    assert one_problem("name: a\ndiscretization:\n  lambda: constant\n  lambda_value: 0.5\ninputs:\n  trap: logit\n") \
        == ("specs/x.yaml:6: inputs.trap: only read when the layer takes λ per token, and its λ is constant "
            "(lambda: constant); try removing 'trap'")
    spec = load_spec_text("name: a\nstate:\n  kind: real\n  rope_fraction: 1.0\n  rotation: halved\n")  # a dump
    assert not spec.is_complex and spec.num_angles == 0


def test_flow_mappings_and_non_string_keys():
    assert problems("name: a\ndims: {d_state: 3, 1: 2}\n") == [
        "specs/x.yaml:2: dims.d_state: 3 is too small (must be >= 4); try d_state: 4 or more (default 128)",
        "specs/x.yaml:2: dims.1: key 1 is not a name; try one of: d_state, headdim, mimo_rank, ngroups, chunk_size",
    ]


def test_problems_sorted_by_line_across_sections():
    text = "options:\n  varlen: 3\nname: a\ndims:\n  mimo_rank: 99\n"
    found = problems(text)
    assert [int(p.split(":")[1]) for p in found] == [2, 5]


def test_multiple_documents():
    assert one_problem("---\nname: a\n---\nname: b\n") == (
        "specs/x.yaml:3: yaml: but found another document; "
        "try one document per file (remove the second '---' and what follows it)"
    )


@pytest.mark.parametrize(
    "text, first_line",
    [
        ("name: a\ndims: !!binary aGVsbG8=\n", 2),
        ("name: [1]\n", 1),
        ("? [a]\n: 1\nname: a\n", 1),
        ("name: a\n<<: {dims: 1}\n", 1),
        ("name: a\nstate: {kind: [real]}\n", 2),
        ("name: a\ndims:\n  d_state: .inf\n", 3),
        ("name: a\ndiscretization: {lambda: constant, lambda_value: .nan}\n", 2),
        ("name: a\ndiscretization: {lambda: constant, lambda_value: 2000-01-01}\n", 2),
        ("\x00", 1),
    ],
)
def test_odd_inputs_give_spec_errors_not_tracebacks(text, first_line):
    found = problems(text)
    assert found and found[0].startswith(f"specs/x.yaml:{first_line}: ")


def test_spec_error_survives_pickle():
    try:
        load_spec_text("name: a\ndims:\n  mimo_rank: 9\n")
    except SpecError as e:
        copy = pickle.loads(pickle.dumps(e))
        assert copy.problems == e.problems and str(copy) == str(e)
    else:  # pragma: no cover
        pytest.fail("expected a SpecError")


def test_every_bad_dim_in_one_report():
    """One-field checks of dims (odd N, a chunk size that is not a power of two) come with the others at once."""
    assert problems("name: a\ndims:\n  d_state: 15\n  chunk_size: 48\n  headdim: 2\n  ngroups: 0\n") == [
        "specs/x.yaml:3: dims.d_state: N=15 is odd (the state is split into two halves); try d_state: 16",
        "specs/x.yaml:4: dims.chunk_size: 48 is not a power of two; try chunk_size: 32",
        "specs/x.yaml:5: dims.headdim: 2 is too small (must be >= 4); try headdim: 4 or more (default 64)",
        "specs/x.yaml:6: dims.ngroups: 0 is too small (must be >= 1); try ngroups: 1 or more (default 1)",
    ]


def test_overrides_of_unread_fields_are_refused():
    """`--set` on a field the spec never reads is refused: the override goes through a dump, whose every field is
    written, so the spec's own refusal cannot tell it from the dumped defaults."""
    from mamba3_gen.spec.sources import spec_with_overrides

    with pytest.raises(SpecError) as e:
        spec_with_overrides(SPECS / "siso_euler_real.yaml", ["state.rotation=halved", "dims.d_state=64"])
    assert e.value.problems == ["--set: state.rotation=halved sets a field spec 'siso_euler_real' never reads; "
                                "try removing it"]
    with pytest.raises(SpecError, match="inputs.trap=lambda sets a field spec 'zoh_real' never reads"):
        spec_with_overrides(SPECS / "zoh_real.yaml", ["inputs.trap=lambda"])
    assert spec_with_overrides(SPECS / "siso_euler_real.yaml", ["dims.d_state=64"]).dims.d_state == 64
