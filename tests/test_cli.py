"""The mamba3-gen command line, through typer's CliRunner (in process, no GPU, a few seconds)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mamba3_gen.cli as cli
from mamba3_gen.cli import app
from mamba3_gen.version import __version__

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "specs" / "mimo_r4.yaml"
FILES = ("__init__.py", "fwd.py", "spec.json")

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


@pytest.mark.parametrize("command", [None, "build", "check", "test", "schema", "bench"])
def test_help(command):
    result = invoke(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout
    assert "Traceback" not in result.output


def test_build_dry_run_lists_the_three_files():
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
    assert states == ["unchanged"] * 5  # __init__.py, fwd.py, step.py, spec.json, step_cute.py


def test_build_dry_run_into_new_dir_writes_nothing(tmp_path):
    out = tmp_path / "nowhere"
    result = invoke("build", SPEC, "--out", out, "-n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("would write") == 6  # the package __init__.py and the five files of the spec
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


def test_check_prints_derived_quantities():
    result = invoke("check", SPEC, "--no-aot")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "mimo_r4" in out
    assert "lambda_value: null  *" in out  # defaults are shown and marked
    assert "S, rotation angles per token: 32" in out
    assert "chunk rows C·R: 16·4 = 64" in out
    assert "diagonal weight gamma_t:" in out and "dt*lam" in out
    assert "initial-state correction:" in out
    assert "chunk: load_steps -> " in out
    assert "smem estimate" in out and "227.0 KiB" in out
    assert "compiled for" not in out and "AOT" not in out


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
    assert obj["lowering"]["diagonal weight gamma_t"] == "dt*lam"
    assert obj["stage_order"]["epilogue"] == ["final_states"]
    assert all(c["smem_estimate"] <= c["smem_limit"] for c in obj["configs"]) and obj["configs"]
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
    """))
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    monkeypatch.setattr(cli, "_repo_root", lambda: tmp_path)
    result = invoke("test", SPEC, "--examples", "3")
    assert result.exit_code == 0, result.output
    assert "1 passed, 1 deselected" in result.stdout


def test_bench_without_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the no-GPU message is not shown")
    result = invoke("bench", SPEC)
    assert result.exit_code == 1
    assert "needs a CUDA GPU" in result.stderr
    assert "Traceback" not in result.output
