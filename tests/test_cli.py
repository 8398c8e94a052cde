"""The mamba3-gen command line, through typer's CliRunner (in process, no GPU, a few seconds)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mamba3_gen.cli as cli
from mamba3_gen.cli import app
from mamba3_gen.backends.triton.build import PACKAGE_FILES
from mamba3_gen.version import __version__

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "specs" / "mimo_r4.yaml"
FILES = PACKAGE_FILES

try:  # click < 8.2 mixes stderr into stdout unless told not to; later versions always keep them apart
    runner = CliRunner(mix_stderr=False)
except TypeError:
    runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"mamba3-gen {__version__}"


@pytest.mark.parametrize("command", [None, "build", "check", "test", "schema", "bench", "cache", "cache ls",
                                     "cache clear", "cache path"])
def test_help(command):
    result = invoke(*(command.split() if command else []), "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout
    assert "Traceback" not in result.output


def test_build_dry_run_lists_the_five_files():
    result = invoke("build", SPEC, "--dry-run")
    assert result.exit_code == 0, result.output
    for name in FILES:
        assert f"mimo_r4/{name}" in result.stdout
    assert "dry run" in result.stdout
    assert "written " not in result.stdout  # nothing is written in a dry run


def test_build_writes_then_unchanged(tmp_path):
    out = tmp_path / "gen"
    first = invoke("build", SPEC, "--out", out)
    assert first.exit_code == 0, first.output
    assert "building 1 spec" in first.stdout
    rows = {ln.split()[1]: ln.split() for ln in first.stdout.splitlines() if ln.startswith("  ")}
    for name in FILES:
        path = out / "mimo_r4" / name
        assert path.is_file()
        (row,) = [r for shown, r in rows.items() if shown.endswith(f"mimo_r4/{name}")]
        assert row[0] == "written" and row[-1] in ("B", "KiB")
    assert "mamba3_fwd_kernel" in (out / "mimo_r4" / "fwd.py").read_text()

    second = invoke("build", SPEC, "--out", out)
    assert second.exit_code == 0, second.output
    states = [ln.split()[0] for ln in second.stdout.splitlines() if ln.startswith("  ")]
    assert states == ["unchanged"] * len(FILES)


def test_build_outside_the_checkout_is_reproducible(tmp_path, monkeypatch):
    """A spec outside the checkout, built from two working directories with two spellings of its path, gives the same
    bytes: the headers name it from the package folder."""
    spec = tmp_path / "specs" / "mine.yaml"
    spec.parent.mkdir()
    spec.write_text(Path(SPEC).read_text())
    out = tmp_path / "gen"
    monkeypatch.chdir(tmp_path)
    assert invoke("build", "specs/mine.yaml", "--out", "gen").exit_code == 0
    first = {f: (out / "mimo_r4" / f).read_bytes() for f in FILES}
    monkeypatch.chdir(spec.parent)
    again = invoke("build", spec, "--out", out)
    assert again.exit_code == 0, again.output
    assert [ln.split()[0] for ln in again.stdout.splitlines() if ln.startswith("  ")] == ["unchanged"] * len(FILES)
    assert {f: (out / "mimo_r4" / f).read_bytes() for f in FILES} == first
    assert "rebuild with `mamba3-gen build ../../specs/mine.yaml` (the spec's path from this folder)." in \
        first["fwd.py"].decode()


def test_build_dry_run_into_new_dir_writes_nothing(tmp_path):
    out = tmp_path / "nowhere"
    result = invoke("build", SPEC, "--out", out, "-n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("would write") == 1 + len(FILES)  # the package __init__.py and the spec's files
    assert not out.exists()


def _bad_spec(tmp_path) -> Path:
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        name: bad
        dims:
          mimo_rank: 9
    """))
    return bad


def test_bad_spec_exits_2_with_one_line(tmp_path):
    bad = _bad_spec(tmp_path)
    for command in ("build", "check"):
        result = invoke(command, bad, "--no-aot") if command == "check" else invoke(command, bad)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert f"{bad}:3: dims.mimo_rank: 9 is too large (must be <= 8); try mimo_rank: 8" in result.stderr.splitlines()


def test_build_error_points_at_the_field(tmp_path):
    spec = tmp_path / "r3.yaml"
    spec.write_text("name: r3\ndims:\n  mimo_rank: 3\n  chunk_size: 16\n")
    result = invoke("build", spec, "--dry-run")
    assert result.exit_code == 2
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith(str(spec))]
    assert line.startswith(f"{spec}:3: dims.mimo_rank: ")
    assert "; try " in line


def test_good_and_bad_specs_together(tmp_path):
    bad = _bad_spec(tmp_path)
    result = invoke("build", bad, SPEC, "--out", tmp_path / "gen")
    assert result.exit_code == 2
    assert (tmp_path / "gen" / "mimo_r4" / "fwd.py").is_file()  # the good spec is still built
    assert "1 of 2 specs failed" in result.stderr


def test_missing_file_and_bad_arch(tmp_path):
    result = invoke("check", tmp_path / "nope.yaml", "--no-aot")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"{tmp_path / 'nope.yaml'}:1: file: no such file; try a path to an existing spec, e.g. specs/mimo_r4.yaml"
    result = invoke("build", SPEC, "--arch", "sm_70")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("--arch: unknown target 'sm_70'; try one of: sm_90a")


def test_check_json_errors_are_json(tmp_path):
    """With --json an invalid spec, a missing file or an unknown --arch is one JSON object on stdout, listing each
    error's file, line, field and message; the exit code stays 2 and stderr says nothing."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndims:\n  d_state: 7\n")
    result = invoke("check", "--json", bad, "--no-aot")
    assert result.exit_code == 2
    assert result.stderr.strip() == ""
    assert json.loads(result.stdout) == {"ok": False, "errors": [
        {"file": str(bad), "line": 3, "field": "dims.d_state",
         "message": "N=7 is odd (the state is split into two halves); try d_state: 8"}]}
    for args in ([tmp_path / "nope.yaml"], [SPEC, "--arch", "sm_70"]):
        result = invoke("check", "--json", "--no-aot", *args)
        assert result.exit_code == 2
        (error,) = json.loads(result.stdout)["errors"]
        assert set(error) == {"file", "line", "field", "message"} and "try " in error["message"]
    assert json.loads(invoke("check", "--json", "--no-aot", SPEC).stdout)["ok"] is True


@pytest.mark.parametrize("command", ["build", "check"])
def test_every_target_is_accepted_and_listed(command):
    """The CLI's --arch takes every name mamba3_gen.load(arch=...) takes (one table: device.TARGETS), sm_86
    included, and --help lists them all."""
    from mamba3_gen.backends.device import TARGETS
    from mamba3_gen.cache import resolve_arch

    help_text = " ".join(invoke(command, "--help").stdout.split())
    for name in TARGETS:
        assert resolve_arch(name) == name  # load() accepts it
        assert name in help_text
    args = ("--dry-run",) if command == "build" else ("--no-aot", "--json")
    result = invoke(command, SPEC, "--arch", "sm_86", *args)
    assert result.exit_code == 0, result.output
    assert "unknown target" not in result.output


def test_check_prints_derived_quantities():
    result = invoke("check", SPEC, "--no-aot")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "mimo_r4" in out
    assert "trap: logit  *" in out  # defaults are shown and marked (unused fields are not: see below)
    assert "S, rotation angles per token: 32" in out
    assert "chunk rows C·R: 16·4 = 64" in out
    lowered = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip() for ln in out.splitlines()
               if ln.startswith("  weight c_")}
    assert lowered == {"weight c_0(t) (token t-0)": "dt*lam", "weight c_1(t) (token t-1)": "dt*(1 - lam)*exp(adt)"}
    assert "chunk: load_steps -> " in out
    assert "smem estimate" in out and "227.0 KiB" in out and "maxnreg" in out
    # every kernel's tiles, not only the fused forward's: the chunked pair and the rotation pre-pass (complex)
    assert "chunked forward, states kernel: P=" in out and "chunked forward, out kernel: P=" in out
    assert "rotation pre-pass: w=" in out and " T=16" in out
    # what auto picks at run time (MIMO: the chunked forward; tf32 operands: the inline rotation)
    assert "  forward: chunked at every batch" in out and "  rotation: inline" in out and "note:" not in out
    assert "compiled for" not in out and "AOT" not in out


def test_check_names_autos_choice_and_bf16_operands_on_fp32_inputs(tmp_path):
    text = (REPO / "specs" / "siso_trap_complex.yaml").read_text()
    text = text.replace("compute: tf32 ", "compute: bf16 ").replace("input: bf16 ", "input: fp32 ")
    path = tmp_path / "s.yaml"
    path.write_text(text.replace("name: siso_trap_complex ", "name: s_bf16_ops "))
    result = invoke("check", str(path), "--no-aot")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert ("  forward: fused when sequences × heads >= 0.5 × the GPU's SM count, else chunked (chunked below the "
            "GPU's SM count in a differentiated call" in out)
    assert "  rotation: the pre-pass (inline in a differentiated call that keeps its chunk states" in out
    assert "note: bf16 dot operands round the fp32 inputs to bf16" in out
    assert "  backward: tf32 dot operands (the spec's bf16 is the forward's" in out
    assert "sums of dq, dk: atomics in the dq/dk kernel" in out and "use_deterministic_algorithms(True)" in out


def test_check_says_two_lag_rules_sum_dq_dk_per_head():
    result = invoke("check", str(REPO / "specs" / "two_lag_complex.yaml"), "--no-aot")
    assert result.exit_code == 0, result.output
    assert "sums of dq, dk: per head + one more pass" in result.stdout and "atomics" not in result.stdout


def test_check_graph_prints_stages():
    result = invoke("check", SPEC, "--graph", "--no-aot")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for phase in ("prologue:", "chunk:", "epilogue:"):
        assert phase in out
    for stage in ("init_carry", "intra_chunk", "state_update", "final_states"):
        assert f"  {stage} " in out
    assert "loads:" in out and "stores:" in out


def test_check_json():
    result = invoke("check", SPEC, "--json", "--no-aot")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["spec"]["dims"]["mimo_rank"] == 4
    assert obj["derived"]["S_angles"] == 32 and obj["derived"]["chunk_rows"] == 64
    assert obj["lowering"]["weight c_0(t) (token t-0)"] == "dt*lam"
    assert obj["stage_order"]["epilogue"] == ["final_theta", "final_states"]
    assert all(c["smem_estimate"] <= c["smem_limit"] for c in obj["configs"]) and obj["configs"]
    assert all("maxnreg" in c for c in obj["configs"])
    assert set(obj["chunked_configs"]) == {"states", "out", "prep"}
    assert all(c["block_t"] >= 1 and c["block_k"] >= 1 for c in obj["chunked_configs"]["prep"])
    assert obj["aot"] is None
    assert "discretization.lambda_value" in obj["defaults"]


def test_check_aot_unavailable(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_aot(name, *args, **kwargs):
        if name == "mamba3_gen.backends.triton.aot":
            raise ImportError("no module named aot (test)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_aot)
    result = invoke("check", SPEC)
    assert result.exit_code == 0, result.output
    assert "AOT report unavailable: no module named aot (test)" in result.stdout


def test_schema(tmp_path):
    result = invoke("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert "properties" in schema and "dims" in schema["properties"]
    out = tmp_path / "schema.json"
    result = invoke("schema", "--out", out)
    assert result.exit_code == 0
    assert json.loads(out.read_text()) == schema


def test_test_command_runs_pytest_with_the_spec(tmp_path, monkeypatch):
    # A stand-in repository whose tests/test_forward.py checks the environment the command promises.
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_forward.py").write_text(textwrap.dedent(f"""\
        import os
        import pytest

        def test_env():
            assert os.environ["MAMBA3_GEN_SPEC"] == {str(SPEC)!r}
            assert os.environ["MAMBA3_GEN_EXAMPLES"] == "3"
            assert os.environ["TRITON_INTERPRET"] == "1"

        @pytest.mark.gpu
        def test_on_gpu():
            pass

        def test_skipped():
            pytest.skip("the stand-in's reason for skipping")
    """))
    (tmp_path / "tests" / "test_step.py").write_text("def test_step():\n    pass\n")
    # of test_backward.py only the spec's gradient property test runs
    (tmp_path / "tests" / "test_backward.py").write_text(
        "def test_gradients_match_float64_autograd():\n    pass\n\n\ndef test_other():\n    raise AssertionError\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    monkeypatch.setattr(cli, "_repo_root", lambda: tmp_path)
    result = invoke("test", SPEC, "--examples", "3")
    assert result.exit_code == 0, result.output
    assert "3 passed, 1 skipped, 1 deselected" in result.stdout
    # the summary says why each test was skipped (issue 9: a bare "25 skipped" hid it)
    assert "SKIPPED [1] tests/test_forward.py:" in result.stdout
    assert "the stand-in's reason for skipping" in result.stdout


def test_test_command_without_pytest_says_how_to_install_it(monkeypatch):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "pytest" else real(name, *a))
    result = invoke("test", SPEC)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.stderr.strip() == (
        f"mamba3-gen test needs pytest, which is not installed in this Python ({cli.sys.executable}); install the "
        'test extra: `pip install -e ".[test]"` in the mamba3-gen checkout (or `pip install pytest hypothesis`)')


# ------------------------------------------------------------------------------------------ build: one spec, one folder


def _renamed_spec(tmp_path, name: str = "mimo_r4", rank: int = 2) -> Path:
    """specs/mimo_r4.yaml with another MIMO rank (and maybe another name), in tmp_path."""
    path = tmp_path / f"{name}_{rank}.yaml"
    text = SPEC.read_text().replace("mimo_rank: 4", f"mimo_rank: {rank}").replace("name: mimo_r4", f"name: {name}")
    path.write_text(text)
    return path


def test_build_refuses_two_specs_with_one_name(tmp_path):
    other = _renamed_spec(tmp_path)
    good = _renamed_spec(tmp_path, name="fine")
    out = tmp_path / "gen"
    result = invoke("build", SPEC, other, good, "--out", out)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    line = cli._yaml_line(str(SPEC), "name")
    assert (f"{SPEC}:{line}: name: 'mimo_r4' is also the name of {other}; both would be written to "
            f"{cli._shown(out / 'mimo_r4')}/; try giving each spec its own name") in result.stderr.splitlines()
    assert "2 of 3 specs failed" in result.stderr
    assert not (out / "mimo_r4").exists()  # neither of the two won
    assert (out / "fine" / "fwd.py").is_file()  # the others are still built


def test_build_one_file_given_twice_builds_it_once(tmp_path, monkeypatch):
    """The same spec twice (also as another path to the same file) is built once, with a note; not refused as
    'also the name of itself'."""
    monkeypatch.chdir(SPEC.parent)
    out = tmp_path / "gen"
    result = invoke("build", SPEC, SPEC, f"./{SPEC.name}", "--out", out)
    assert result.exit_code == 0, result.output
    assert "building 1 spec for" in result.stdout and "[1/1]" in result.stdout
    assert "also the name of" not in result.output
    assert result.stderr.splitlines() == [f"note: {SPEC} was given more than once; building it once",
                                          f"note: ./{SPEC.name} was given more than once (as {SPEC}); building it once"]
    assert (out / "mimo_r4" / "fwd.py").is_file()


def test_build_refuses_another_specs_package_unless_forced(tmp_path):
    out = tmp_path / "gen"
    assert invoke("build", SPEC, "--out", out).exit_code == 0
    before = (out / "mimo_r4" / "fwd.py").read_bytes()
    other = _renamed_spec(tmp_path)
    result = invoke("build", other, "--out", out)
    assert result.exit_code == 2
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith(str(other))]
    assert line == (f"{other}:{cli._yaml_line(str(other), 'name')}: name: {out / 'mimo_r4'}: holds the package of "
                    "another spec named 'mimo_r4' (dims.mimo_rank: 4 -> 2); try giving this spec another name, "
                    "another output folder, or --force (force=True) to replace it (e.g. after editing the spec)")
    assert (out / "mimo_r4" / "fwd.py").read_bytes() == before  # untouched

    forced = invoke("build", other, "--out", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "mimo_r4" / "spec.json").read_text())["dims"]["mimo_rank"] == 2


def test_build_keeps_going_past_a_failed_write(tmp_path, monkeypatch):
    import mamba3_gen.files as files

    real = files.atomic_write
    out = tmp_path / "gen"

    def fail_for_mimo_r4(path, data):
        if Path(path).parent.name == "mimo_r4":
            raise files.FileSystemError(path, "write", "Read-only file system", "a writable folder")
        real(path, data)

    monkeypatch.setattr(files, "atomic_write", fail_for_mimo_r4)
    fine = _renamed_spec(tmp_path, name="fine")
    result = invoke("build", SPEC, fine, "--out", out)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert f"{out / 'mimo_r4' / '__init__.py'}: cannot write: Read-only file system; try a writable folder" \
        in result.stderr.splitlines()
    assert "1 of 2 specs failed" in result.stderr
    assert (out / "fine" / "fwd.py").is_file()


def test_build_without_out_writes_into_the_checkouts_generated(monkeypatch):
    from mamba3_gen import paths

    assert paths.in_checkout() and paths.default_out_dir() == REPO / "generated"
    result = invoke("build", SPEC, "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"into {cli._shown(REPO / 'generated')}/" in result.stdout


def test_default_out_dir_outside_a_checkout_is_the_working_directory(tmp_path, monkeypatch):
    from mamba3_gen import paths

    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "site-packages")  # as in an installed wheel
    monkeypatch.chdir(tmp_path)
    assert not paths.in_checkout()
    assert paths.default_out_dir() == tmp_path / "generated"


# --------------------------------------------------------------------------------------------------------- cache


def test_cache_path_ls_clear(tmp_path, monkeypatch):
    from mamba3_gen import cache
    from mamba3_gen.spec.loader import load_spec

    root = tmp_path / "cache"
    monkeypatch.setenv("MAMBA3_GEN_CACHE_DIR", str(root))
    assert invoke("cache", "path").stdout.strip() == str(root)
    empty = invoke("cache", "ls")
    assert empty.exit_code == 0 and empty.stdout.strip() == f"{root}: 0 builds"

    folders = {}
    for path in (SPEC, _renamed_spec(tmp_path, name="other")):
        spec = load_spec(path)
        folders[spec.name] = cache.ensure_entry(spec, "sm_90a", cache.fingerprint(spec, "sm_90a"))
    listed = invoke("cache", "ls")
    assert listed.exit_code == 0, listed.output
    rows = [ln.split() for ln in listed.stdout.splitlines()[1:]]
    assert [(r[0], r[1], r[2], r[-1]) for r in rows] == [
        (folders["mimo_r4"].name, "mimo_r4", "sm_90a", "complete"), (folders["other"].name, "other", "sm_90a", "complete")]

    cleared = invoke("cache", "clear", "other", "nothing_like_it")
    assert cleared.exit_code == 0, cleared.output
    assert cleared.stdout.startswith(f"removed 1 build from {root}")
    assert "note: no cached build of spec 'nothing_like_it'" in cleared.stderr
    assert not folders["other"].exists() and folders["mimo_r4"].is_dir()
    assert invoke("cache", "clear").stdout.startswith(f"removed 1 build from {root}")
    assert not folders["mimo_r4"].exists()


def test_bench_forward_and_rotate_choices_are_checked():
    result = invoke("bench", SPEC, "--forward", "sideways", "--rotate", "up")
    assert result.exit_code == 2
    assert "--forward: 'sideways' is not one of auto, fused, chunked; try --forward auto" in result.stderr
    assert "--rotate: 'up' is not one of auto, prepass, inline; try --rotate auto" in result.stderr


def test_bench_without_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the no-GPU message is not shown")
    result = invoke("bench", SPEC)
    assert result.exit_code == 1
    assert "needs a CUDA GPU" in result.stderr
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------------------------- issue 10, item 12
SHIPPED_SPECS = sorted((REPO / "specs").glob("*.yaml"))
_POINTERS = ["q_ptr", "k_ptr", "v_ptr", "adt_ptr", "dt_ptr", "trap_ptr", "q_bias_ptr", "k_bias_ptr", "angles_ptr",
             "d_ptr", "z_ptr", "mimo_v_ptr", "mimo_z_ptr", "mimo_o_ptr", "out_ptr", "init_angle_ptr", "init_ssm_ptr",
             "init_k_ptr", "init_v_ptr", "final_angle_ptr", "final_ssm_ptr", "final_k_ptr", "final_v_ptr"]


def _kernel_tensors(spec) -> set[str]:
    """The tensors the op hands the forward kernel for this spec, from the AOT signature (None pointers are
    constexpr there): an independent account of what the kernel can load or store."""
    from mamba3_gen.backends.triton.aot import kernel_signature

    signature, _, _ = kernel_signature(spec, _POINTERS, 64)
    names = {n[:-len("_ptr")] for n, ty in signature.items() if ty != "constexpr"}
    # and, when the backward keeps them (constexpr STORE_CHUNKS; the AOT report compiles without), the per-chunk
    # states: the entering state always, Θ for a complex state, the carried tokens with two or more lags
    kept = {"chunk_ssm"} | ({"chunk_angle"} if spec.is_complex else set()) | \
        ({"chunk_k", "chunk_v"} if spec.lags > 1 else set())
    return {"D" if n == "d" else n for n in names} | kept


@pytest.mark.parametrize("spec_path", SHIPPED_SPECS, ids=[p.stem for p in SHIPPED_SPECS])
def test_check_graph_lists_only_the_specs_tensors(spec_path):
    from mamba3_gen.spec.loader import load_spec

    spec = load_spec(spec_path)
    result = invoke("check", spec_path, "--json", "--no-aot")
    assert result.exit_code == 0, result.output
    graph = json.loads(result.stdout)["graph"]
    moved = set(graph["loads"]) | set(graph["stores"])
    assert moved == _kernel_tensors(spec), f"{spec_path.stem}: listed {sorted(moved)}"
    text = invoke("check", spec_path, "--graph", "--no-aot").stdout
    listed = {t for line in text.splitlines() if line.strip().startswith(("loads:", "stores:"))
              for t in line.split(":", 1)[1].replace(",", " ").split()}
    assert listed == moved


def test_check_graph_euler_real_has_no_trap_angles_or_mimo():
    out = invoke("check", REPO / "specs" / "siso_euler_real.yaml", "--graph", "--no-aot").stdout
    loads = next(line for line in out.splitlines() if line.strip().startswith("loads:"))
    for absent in ("trap", "angles", "init_angle", "init_k", "init_v", "mimo_v", "mimo_z", "mimo_o"):
        assert absent not in loads.replace(",", " ").split(), loads
    assert "init_ssm" in loads  # the spec has initial states: the real state's H is loaded


@pytest.mark.parametrize("name,loads_last_token", [("siso_euler_real", False), ("siso_trap_complex", True),
                                                     ("two_lag_complex", False)])
def test_final_states_loads_the_last_token_only_with_one_lag(name, loads_last_token):
    """The final_states stage reads the last token's k and v from memory only for a rule with exactly one lag (no lag:
    nothing carried; two or more: the carried tokens are in registers); `check --graph` shows what it does."""
    out = invoke("check", REPO / "specs" / f"{name}.yaml", "--graph", "--no-aot").stdout
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("final_states "))
    assert ("loads k, k_bias, v" in line) == loads_last_token, line


def test_check_hides_fields_the_spec_does_not_use():
    out = invoke("check", REPO / "specs" / "siso_euler_real.yaml", "--no-aot").stdout
    resolved = out.split("derived:")[0]
    for key in ("lambda:", "lambda_value:", "log_decay:", "weights:", "rope_fraction:", "rotation:", "trap:"):
        assert f" {key}" not in resolved, key
    assert "(not used by this spec, not shown: discretization.lambda, discretization.lambda_value" in resolved
    out = invoke("check", SPEC, "--no-aot").stdout.split("derived:")[0]  # a trapezoidal rule with λ data
    assert "    lambda: data" in out and "lambda_value:" not in out and "    trap: logit" in out
    obj = json.loads(invoke("check", SPEC, "--json", "--no-aot").stdout)
    assert obj["unused_fields"] == ["discretization.lambda_value", "discretization.log_decay", "discretization.weights"]


def test_check_json_tells_the_backward():
    """`check --json` carries what the text output says of the backward: its dot operands, MAMBA3_GEN_BWD's choices
    and default, the GQA/bias reduction (atomics for J ≤ 1, per head for J ≥ 2)."""
    obj = json.loads(invoke("check", SPEC, "--json", "--no-aot").stdout)["backward"]
    assert obj == {"refused": None, "dot_dtype": "tf32", "gqa_bias_sums": "atomics",
                   "structure": {"variable": "MAMBA3_GEN_BWD", "auto": "chunked", "choices": ["chunked", "fused"]}}
    two_lag = json.loads(invoke("check", REPO / "specs" / "two_lag_complex.yaml", "--json", "--no-aot").stdout)
    assert two_lag["backward"]["gqa_bias_sums"] == "per_head"
