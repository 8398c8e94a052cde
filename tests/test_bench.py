"""`mamba3-gen bench`, its library (mamba3_gen/bench.py) and the results pipeline (benchmarks/run_matrix.py,
benchmarks/render_results.py), on the CPU: argument errors, the byte and FLOP floors against benchmarks/NOTES.md,
the check-before-timing logic, the JSON rows, table and plot with an injected timer, and the README's results
section. One end-to-end test needs a CUDA GPU and is skipped without one."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mamba3_gen import bench as lib
from mamba3_gen.cli import app
from mamba3_gen.reference import make_inputs
from mamba3_gen.spec.sources import spec_with_overrides

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is importable from the repository root
    sys.path.insert(0, str(REPO))

from benchmarks import ablate, render_results, run_matrix, sass_lines  # noqa: E402

SPECS = REPO / "specs"
TINY = ("name: tiny_bench\nstate: {rotation: pairwise}\ndims: {d_state: 8, headdim: 4, chunk_size: 4}\n"
        "dtypes: {input: fp32, compute: fp32}\n")  # the interpreter computes bf16 wrongly: fp32 on the CPU
CEILINGS = {"copy_GBps": 1000.0, "bf16_TFLOPs": 100.0}

try:
    runner = CliRunner(mix_stderr=False)
except TypeError:
    runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------------------------- arguments


def test_parse_sizes_and_providers():
    assert lib.parse_sizes("8:4096:32, 1:16384:32") == [(8, 4096, 32), (1, 16384, 32)]
    assert lib.parse_providers("official,generated,official") == ["official", "generated"]
    for bad in ("8:4096", "8:4096:32:1", "0:4096:32", "a:b:c", "8:-1:32", ""):
        with pytest.raises(lib.BenchArgError, match="--sizes"):
            lib.parse_sizes(bad)


def test_bad_sizes_item_exits_2_naming_it():
    result = invoke("bench", SPECS / "mimo_r4.yaml", "--sizes", "8:4096:32,8:x:32")
    assert result.exit_code == 2, result.output
    assert "--sizes: '8:x:32' is not B:L:H" in result.stderr
    assert "Traceback" not in result.output


def test_unknown_provider_exits_2_listing_valid_ones():
    result = invoke("bench", SPECS / "mimo_r4.yaml", "--providers", "generated,tilelang")
    assert result.exit_code == 2, result.output
    assert "unknown provider 'tilelang'" in result.stderr
    for name in lib.PROVIDERS:
        assert name in result.stderr


def test_heads_not_a_multiple_of_ngroups_exits_2():
    result = invoke("bench", SPECS / "mimo_r4.yaml", "--set", "dims.ngroups=4", "--sizes", "8:64:32,2:64:6")
    assert result.exit_code == 2, result.output
    assert "H=6 in 2:64:6 is not a multiple of dims.ngroups=4" in result.stderr
    assert "try H=4" in result.stderr
    assert "8:64:32" not in result.stderr  # the good size is not reported


@pytest.mark.parametrize("args, message", [
    (["--set", "dims.d_state"], "--set: takes SECTION.FIELD=VALUE, got 'dims.d_state'"),
    (["--set", "dims.d_state=abc"], "with --set: dims.d_state: expected a whole number"),
    (["--set", "dims.chunk_size=7"], "7 is not a power of two; try --set dims.chunk_size=8"),  # the option to type
    (["--decode", "--backward"], "--backward: the decode step has no backward"),
    (["--sizes", ""], "--sizes: an empty item in ''; try --sizes 8:4096:32"),
    (["--sizes", "8:4096:32,"], "--sizes: an empty item in '8:4096:32,'"),
    (["--decode", "--sizes", "8:4096"], "try --sizes 1:1:32,256:1:32"),
    (["--providers", ""], "--providers: an empty item in ''"),
    (["--providers", "generated,"], "--providers: an empty item in 'generated,'"),
    (["--name", "../x"], "--name: '../x' is not a plain file name"),
    (["--out", "/proc/nope"], "--out: cannot write /proc/nope"),  # before the GPU check: no run is thrown away
])
def test_bad_options_exit_2(args, message):
    result = invoke("bench", SPECS / "siso_trap_complex.yaml", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_without_gpu_exits_1_after_the_arguments_are_checked(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the no-GPU message is not shown")
    out = tmp_path / "new" / "results"
    result = invoke("bench", SPECS / "siso_trap_complex.yaml", "--sizes", "1:64:4", "--set", "dims.d_state=64",
                    "--out", out)
    assert result.exit_code == 1
    assert "needs a CUDA GPU" in result.stderr
    assert list(tmp_path.iterdir()) == []  # the folders made to check --out are gone again


def test_overrides_change_the_spec_and_name_the_workload():
    spec = spec_with_overrides(SPECS / "siso_trap_complex.yaml", ["dims.d_state=64"])
    assert spec.dims.d_state == 64
    work = lib.Workload(spec, 8, 4096, 32, "fwd", ("dims.d_state=64",))
    assert work.label == "siso_trap_complex d_state=64 fwd B8 L4096 H32"
    assert lib.Workload(spec, 256, 1, 32, "decode").label == "siso_trap_complex decode B256 H32"


# ------------------------------------------------------------------------------------------------- floors

# benchmarks/NOTES.md, first table: B8 L4096 H32 P64 N128, bf16 Q/K/V/Z/out, fp32 A·Δ/Δ/trap/angles (MB, GFLOP)
NOTES_TABLE = {"siso_euler_real": (428, 60), "siso_trap_complex": (566, 60), "mimo_r4": (617, 241),
               "mimo_r2_const_half_fullrope": (713, 120)}


@pytest.mark.parametrize("name", sorted(NOTES_TABLE))
def test_bytes_and_flops_match_the_notes_table(name):
    spec = spec_with_overrides(SPECS / f"{name}.yaml")
    mb, gflop = NOTES_TABLE[name]
    assert round(lib.workload_bytes(spec, 8, 4096, 32) / 1e6) == mb
    assert round(lib.workload_flops(spec, 8, 4096, 32) / 1e9) == gflop


def test_flops_formula_by_hand():
    spec = spec_with_overrides(SPECS / "siso_trap_complex.yaml")  # C64 R1 N128 P64
    rows, n, p = 64, 128, 64
    per_chunk = 2 * rows * rows * n + 2 * rows * rows * p + 4 * rows * n * p
    assert lib.workload_flops(spec, 2, 100, 4) == 2 * 4 * 2 * per_chunk  # ⌈100/64⌉ = 2 chunks
    assert lib.workload_flops(spec, 2, 100, 4, "bwd") == 3 * lib.workload_flops(spec, 2, 100, 4)


def test_input_shapes_match_make_inputs():
    for name in ("siso_trap_complex", "mimo_r4", "siso_euler_real", "two_lag_complex"):
        spec = spec_with_overrides(SPECS / f"{name}.yaml", ["dims.d_state=8", "dims.headdim=4"])
        kw = lib.build_inputs(spec, 2, 5, 4, "fwd", device="cpu")
        shapes = lib.input_shapes(spec, 2, 5, 4)
        assert set(kw) == set(shapes), name
        for key, (shape, dtype) in shapes.items():
            assert tuple(kw[key].shape) == shape and kw[key].dtype == dtype, (name, key)
        assert set(kw) == set(make_inputs(spec, 2, 5, 4))


def test_bwd_and_decode_bytes():
    spec = spec_with_overrides(SPECS / "siso_trap_complex.yaml")
    B, L, H = 2, 64, 4
    fwd = lib.workload_bytes(spec, B, L, H)
    inputs = sum(lib._nbytes(s, d) for s, d in lib.input_shapes(spec, B, L, H).values())
    assert lib.workload_bytes(spec, B, L, H, "bwd") == 2 * fwd + inputs
    # state of one step: Θ (B, H, S=32), H (B, H, P, N), k̂ (B, H, N), v (B, H, P), fp32, read and written once
    state = 4 * (B * H * 32 + B * H * 64 * 128 + B * H * 128 + B * H * 64)
    token = sum(lib._nbytes(s, d) for s, d in lib.input_shapes(spec, B, 1, H).values()) + B * H * 64 * 2
    assert lib.workload_bytes(spec, B, 1, H, "decode") == token + 2 * state


def test_mamba2_inputs_have_one_decay_per_head_and_no_biases():
    spec = spec_with_overrides(SPECS / "siso_euler_real.yaml", ["dims.d_state=8", "dims.headdim=4"])
    assert lib.mamba2_compatible(spec)
    kw = lib.build_inputs(spec, 2, 6, 3, device="cpu")
    a = kw["adt"] / kw["dt"]
    assert torch.allclose(a, a[:1, :, :1].expand_as(a), rtol=1e-6)  # A·Δ / Δ is one A per head
    assert (a < 0).all()
    assert not kw["q_bias"].any() and not kw["k_bias"].any()
    assert not lib.mamba2_compatible(spec_with_overrides(SPECS / "siso_trap_complex.yaml"))


# ------------------------------------------------------------------------------------------------- running


class CountingTimer:
    """A fake timer: runs fn once, records which providers' callables were timed, returns a fixed time."""

    def __init__(self):
        self.timed = []

    def __call__(self, fn, mode):
        out = fn()
        self.timed.append(fn.provider)
        assert out is not None
        return {"ms": 2.0, "loop_ms": 1.0} if mode == "decode" else {"ms": 2.0}


def _provider(name, transform):
    def make(kw):
        def fn():
            return transform(kw["v"])
        fn.provider = name
        return fn
    return lib.Provider(name, make)


def _fake_factory(spec, mode, names):
    good = [_provider("generated", lambda v: v * 2), _provider("official", lambda v: v * 2 * (1 + 1e-3)),
            _provider("wrong", lambda v: v * 2 + 1)]

    def broken(kw):
        raise RuntimeError("no kernel here")
    return good + [lib.Provider("broken", broken)], {"official-cute": "decode only"}


def test_a_run_records_the_forward_choices_it_ran_with(monkeypatch):
    for k in lib.RUN_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MAMBA3_GEN_ROTATE", "prepass")
    assert lib.new_run()["env"] == {"MAMBA3_GEN_ROTATE": "prepass"}


def test_run_checks_before_timing_and_writes_rows(tmp_path, capsys):
    spec = spec_with_overrides(TINY)
    timer = CountingTimer()
    works = [lib.Workload(spec, 1, 8, 2, "fwd"), lib.Workload(spec, 1, 16, 2, "fwd")]
    result = lib.run(works, ["generated"], timer=timer, ceilings=CEILINGS, device="fake", inputs_device="cpu",
                     provider_factory=_fake_factory, log=lambda s: None)
    assert timer.timed == ["generated", "official"] * 2  # the wrong and the broken provider are never timed
    rows = {(r["workload"], r["provider"]): r for r in result.rows}
    assert len(result.rows) == 2 * 5
    run_ids = {r["run"] for r in result.rows}
    assert run_ids == {result.run["id"]}
    ok = rows[(works[0].label, "official")]
    assert ok["check"] == "ok" and ok["rel_err"] == pytest.approx(1e-3, rel=1e-3)
    wrong = rows[(works[0].label, "wrong")]
    assert wrong["check"] == "mismatch" and wrong["ms"] is None and "differs from generated" in wrong["error"]
    assert rows[(works[0].label, "broken")]["check"] == "error"
    assert "no kernel here" in rows[(works[0].label, "broken")]["error"]
    assert rows[(works[0].label, "official-cute")]["check"] == "skipped"
    ref = rows[(works[0].label, "generated")]
    assert ref["check"] == "reference" and ref["first_s"] >= 0
    nbytes = lib.workload_bytes(spec, 1, 8, 2)
    assert ref["bytes"] == nbytes and ref["gbps"] == pytest.approx(nbytes / 2.0 / 1e6)
    assert ref["pct_copy"] == pytest.approx(100 * ref["gbps"] / CEILINGS["copy_GBps"])
    assert ref["tflops"] == pytest.approx(lib.workload_flops(spec, 1, 8, 2) / 2.0 / 1e9)

    path = lib.write_json(tmp_path / "x.json", result)
    doc = json.loads(path.read_text())
    assert doc["runs"][result.run["id"]]["ceilings"] == CEILINGS
    assert doc["runs"][result.run["id"]]["env"] == {k: os.environ[k] for k in lib.RUN_ENV if os.environ.get(k)}
    for row in doc["rows"]:
        for key in ("workload", "provider", "ms", "gbps", "tflops", "device", "run", "check", "error"):
            assert key in row
        assert row["device"] == "fake"

    from rich.console import Console

    console = Console(record=True, width=250)
    console.print(lib.render_table(result.rows, CEILINGS, "fake"))
    text = console.export_text()
    assert "mismatch: out differs from generated" in text
    assert "official 1.00×" in text  # ratio of the other timed provider, on generated's row
    assert "copy 1000 GB/s" in text


def test_unchecked_when_the_reference_fails():
    spec = spec_with_overrides(TINY)

    def factory(spec, mode, names):
        def broken(kw):
            raise RuntimeError("generated failed")
        return [lib.Provider("generated", broken), _provider("official", lambda v: v)], {}
    timer = CountingTimer()
    rows = lib.run([lib.Workload(spec, 1, 4, 2)], ["generated"], timer=timer, ceilings=None, device="fake",
                   inputs_device="cpu", provider_factory=factory, log=lambda s: None).rows
    assert [r["check"] for r in rows] == ["error", "unchecked"]
    assert timer.timed == ["official"]


def test_compare_gradients():
    ref = {"out": torch.ones(4, 4), "q": torch.ones(3), "v": torch.ones(3)}
    assert lib.compare({"out": ref["out"] * 1.01, "q": ref["q"] * 1.04, "v": ref["v"]}, ref)[0]
    ok, err, where = lib.compare({"out": ref["out"], "q": ref["q"] * 1.06, "v": ref["v"]}, ref)
    assert not ok and where == "dq" and err == pytest.approx(0.06)
    assert not lib.compare({"out": ref["out"], "q": ref["q"]}, ref)[0]  # a missing gradient disagrees
    assert not lib.compare(torch.full((2,), float("nan")), torch.ones(2))[0]
    assert not lib.compare(torch.ones(3), torch.ones(2))[0]  # a shape mismatch disagrees
    assert not lib.compare(torch.ones(4) * 1.03, torch.ones(4))[0]  # 3e-2 > the bf16 output tolerance


def test_generated_provider_in_the_interpreter():
    """The real `generated` provider on a tiny fp32 spec in each mode (Triton interpreter on the CPU): its own
    outputs are the reference, the timer is called once per workload, and cute is reported for the CPU."""
    spec = spec_with_overrides(TINY)
    timer = CountingTimer()

    def timed(fn, mode):
        fn.provider = "generated"
        return timer(fn, mode)
    works = [lib.Workload(spec, 1, 9, 2, "fwd"), lib.Workload(spec, 1, 9, 2, "bwd"),
             lib.Workload(spec, 2, 1, 2, "decode")]
    rows = lib.run(works, ["generated", "generated-cute"], timer=timed, ceilings=CEILINGS, device="cpu",
                   inputs_device="cpu", log=lambda s: None).rows
    gen = [r for r in rows if r["provider"] == "generated"]
    assert [r["check"] for r in gen] == ["reference"] * 3 and all(r["ms"] == 2.0 for r in gen)
    assert gen[2]["loop_ms"] == 1.0
    cute = {r["mode"]: r for r in rows if r["provider"] == "generated-cute"}
    assert cute["fwd"]["check"] == "skipped" and "decode only" in cute["fwd"]["error"]
    if not torch.cuda.is_available():
        assert cute["decode"]["check"] == "error" and "CUDA" in cute["decode"]["error"]


def test_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot is the optional extra 'bench' (matplotlib)")
    spec = spec_with_overrides(TINY)
    rows = lib.run([lib.Workload(spec, 1, L, 2) for L in (4, 8)], ["generated"], timer=CountingTimer(),
                   ceilings=CEILINGS, device="fake", inputs_device="cpu", provider_factory=_fake_factory,
                   log=lambda s: None).rows
    path = lib.plot(rows, tmp_path / "p.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    rows = [{"ms": 1.0, "family": "x fwd", "mode": "fwd", "provider": "generated", "B": 1, "L": 4}]
    assert lib.plot(rows, tmp_path / "p.png") is None
    assert not (tmp_path / "p.png").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib is not installed" in err[0]


# ------------------------------------------------------------------------------------------------- matrix, README


def test_matrix_covers_the_issue():
    labels = [w.label for w, _ in run_matrix.workloads()]
    assert "siso_trap_complex d_state=64 fwd B8 L4096 H32" in labels
    assert "siso_euler_real fwd B1 L16384 H32" in labels
    assert "two_lag_complex fwd B8 L4096 H32" in labels
    assert "mimo_r4 decode B256 H32" in labels
    assert [w.label for w, _ in run_matrix.workloads("bwd")] == [
        "siso_trap_complex bwd B8 L4096 H32", "siso_trap_complex bwd B1 L16384 H32", "mimo_r4 bwd B8 L4096 H32",
        "siso_trap_complex compute=bf16 bwd B8 L4096 H32", "siso_trap_complex compute=bf16 bwd B1 L16384 H32",
        "siso_trap_complex d_state=64 bwd B8 L4096 H32"]
    assert [w.label for w, _ in run_matrix.workloads(match="compute=bf16 bwd|d_state=64 bwd")] == [
        "siso_trap_complex compute=bf16 bwd B8 L4096 H32", "siso_trap_complex compute=bf16 bwd B1 L16384 H32",
        "siso_trap_complex d_state=64 bwd B8 L4096 H32"]
    assert all(w.H == 32 and w.spec.dims.headdim == 64 for w, _ in run_matrix.workloads())
    assert {w.spec.name for w, _ in run_matrix.workloads("fwd", ["mimo_r4"])} == {"mimo_r4"}


def _doc():
    row = dict(workload="w fwd B8 L4096 H32", run="r1", pct_copy=10.0, check="ok", error=None)
    return {"runs": {"r1": {"device": "NVIDIA H200", "ceilings": CEILINGS}},
            "rows": [{**row, "provider": "generated", "ms": 2.0, "check": "reference"},
                     {**row, "provider": "official", "ms": 1.0, "pct_copy": 20.0},
                     {**row, "workload": "d decode B1 H32", "provider": "generated-cute", "ms": 0.004},
                     {**row, "workload": "d decode B1 H32", "provider": "official-cute", "ms": None,
                      "check": "skipped"}]}


def test_render_results_round_trip(tmp_path):
    body = render_results.render(_doc())
    assert "| w fwd B8 L4096 H32 | 1 | 2 | 1 | 0.50 | 10.0 |" in body  # workload, run number, ours, official
    assert "| d decode B1 H32 (CuTe) | 1 | 0.004 | skipped | — | 10.0 |" in body
    assert "1. run `" in body and "NVIDIA H200: copy 1000 GB/s, bf16 GEMM 100 TFLOP/s" in body
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Results on H200\n\n{render_results.BEGIN}\nold\n{render_results.END}\n\nafter\n")
    results = tmp_path / "h200.json"
    results.write_text(json.dumps(_doc()))
    assert render_results.main(["--json", str(results), "--readme", str(readme), "--check"]) == 1  # 'old' is stale
    assert render_results.main(["--json", str(results), "--readme", str(readme)]) == 0
    assert render_results.main(["--json", str(results), "--readme", str(readme), "--check"]) == 0
    text = readme.read_text()
    assert render_results.current_section(text) == body.strip()
    assert text.startswith("# x\n") and text.endswith("\nafter\n")
    assert "No committed H200 run" in render_results.render(None)


def test_readme_results_section_is_up_to_date():
    """The README's H200 section is what benchmarks/render_results.py makes of benchmarks/results/h200.json (or the
    no-run-yet text while that file does not exist): regenerate it with that script after a new run."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert "## Results on H200" in text
    expected = render_results.render(render_results.load(REPO / "benchmarks" / "results" / "h200.json"))
    assert render_results.current_section(text) == expected.strip(), \
        "README's H200 results are stale: run python benchmarks/render_results.py"


def test_merge_keeps_every_run(tmp_path):
    a, b = _doc(), _doc()
    b["runs"] = {"r2": b["runs"]["r1"]}
    for r in b["rows"]:
        r["run"] = "r2"
    paths = []
    for i, doc in enumerate((a, b)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(doc))
    merged = run_matrix.merge(paths)
    assert set(merged["runs"]) == {"r1", "r2"} and len(merged["rows"]) == 8
    assert render_results.render(merged).count("| w fwd B8 L4096 H32 |") == 2  # one line per run
    latest = run_matrix.merge(paths, latest=True)  # the second run re-measured every row: only it is left
    assert set(latest["runs"]) == {"r2"} and len(latest["rows"]) == 4
    assert {r["run"] for r in latest["rows"]} == {"r2"}
    assert render_results.render(latest).count("| w fwd B8 L4096 H32 |") == 1


def test_ablate_variants_are_their_own_ops(tmp_path):
    """benchmarks/ablate.py: each variant's module gets its own op name; an edit whose text the generated source no
    longer has is refused (the template moved), as is an unknown key; the shipped variant file applies cleanly."""
    import runpy

    same = ("PREPPED: tl.constexpr = False", "PREPPED: tl.constexpr = False")  # an edit that changes nothing
    paths = ablate.write_variants("siso_trap_complex", {"base": {}, "cut": {"edits": [same]}}, tmp_path)
    hashes = [next(line for line in p.read_text().splitlines() if "'template_hash'" in line) for p in paths]
    assert len(set(hashes)) == 2 and "'base_" in hashes[0] and "'cut_" in hashes[1]
    with pytest.raises(ValueError, match="edit text not found"):
        ablate.variant_source("siso_trap_complex", {"edits": [("no such line", "x")]}, "bad")
    with pytest.raises(ValueError, match="unknown keys"):
        ablate.variant_source("siso_trap_complex", {"edit": []}, "typo")
    shipped = runpy.run_path(str(REPO / "benchmarks" / "variants" / "fused_next.py"))["VARIANTS"]
    for name, variant in shipped.items():
        if not variant.get("sets"):  # (the sets variants build a spec: slow, and covered by the bench tests)
            assert "'template_hash': '" + name in ablate.variant_source("siso_trap_complex", variant, name)


def test_sass_lines_counts_the_main_loop():
    """benchmarks/sass_lines.py: instructions per source line inside the longest backward branch of an nvdisasm -g
    listing (the chunk loop), or in the whole kernel."""
    listing = "\n".join([
        '        //## File "/x/fwd.py", line 10',
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        ".L_x_0:",
        '        //## File "/x/fwd.py", line 12',
        "        /*0010*/                   FADD R2, R2, R3 ;",
        "        /*0020*/               @P1 FMUL R2, R2, R3 ;",
        '        //## File "/x/fwd.py", line 13',
        "        /*0030*/               @P0 BRA `(.L_x_0) ;",
        "        /*0040*/                   EXIT ;",
    ])
    count, ops, n, whole = sass_lines.per_line(listing)
    assert (n, whole) == (3, False) and count == {("fwd.py", 12): 2, ("fwd.py", 13): 1}
    assert ops[("fwd.py", 12)] == {"FADD": 1, "FMUL": 1}
    count, _, n, whole = sass_lines.per_line(listing, loop_only=False)
    assert (n, whole) == (5, True) and sum(count.values()) == 5


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: times the kernels with do_bench")
def test_bench_end_to_end_on_gpu(tmp_path):
    result = invoke("bench", SPECS / "siso_trap_complex.yaml", "--sizes", "1:512:4,2:1024:4", "--out", tmp_path,
                    "--name", "e2e")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "e2e.json").read_text())
    gen = [r for r in doc["rows"] if r["provider"] == "generated"]
    assert len(gen) == 2 and all(r["ms"] > 0 and r["check"] == "reference" for r in gen)
    assert {r["provider"] for r in doc["rows"]} == {"generated", "official"}
    for r in doc["rows"]:
        assert r["check"] in ("reference", "ok", "skipped"), r  # the official kernel agrees, or is absent
    decode = invoke("bench", SPECS / "siso_trap_complex.yaml", "--decode", "--sizes", "4:1:8", "--out", tmp_path,
                    "--name", "dec")
    assert decode.exit_code == 0, decode.output
    rows = json.loads((tmp_path / "dec.json").read_text())["rows"]
    assert {r["provider"]: r["check"] for r in rows}["generated-cute"] == "ok"


# ------------------------------------------------------------------------------------------------- official adapters


def test_official_provider_says_why_none_applies():
    from benchmarks import official

    def spec(name):
        return spec_with_overrides(SPECS / f"{name}.yaml")
    assert "no official kernel computes this spec" in official.provider(spec("two_lag_complex"), "fwd")
    assert "no official kernel computes this spec" in official.provider(spec("zoh_real"), "bwd")
    assert "pairwise SISO only" in official.provider(spec("siso_euler_real"), "decode")
    assert "MIMO decode is the official CuTe step's" in official.provider(spec("mimo_r4"), "decode")
    assert "decode only" in official.provider(spec("siso_trap_complex"), "fwd", cute=True)
    assert "complex state only" in official.provider(spec("siso_euler_real"), "decode", cute=True)


def _recording(monkeypatch, official, result):
    """Make official.load return a fake kernel that records its arguments and returns `result(args, kwargs)`."""
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return result(args, kwargs)
    monkeypatch.setattr(official, "load", lambda module, name: (fake, None))
    return calls


def test_mamba2_adapter_maps_our_arguments(monkeypatch):
    from benchmarks import official

    spec = spec_with_overrides(SPECS / "siso_euler_real.yaml", ["dims.d_state=8", "dims.headdim=4"])
    kw = lib.build_inputs(spec, 2, 6, 3, device="cpu")
    calls = _recording(monkeypatch, official, lambda a, k: a[0] * 1.0)
    out = official.provider(spec, "fwd")(kw)()
    (x, dt, A, Bm, Cm, chunk), extra = calls[0]
    assert x is kw["v"] and Bm is kw["k"] and Cm is kw["q"] and chunk == 256
    assert dt.shape == (2, 6, 3) and torch.equal(dt, kw["dt"].transpose(1, 2))  # (B, L, H) as Mamba-2 takes it
    assert torch.allclose(A[None, :, None] * kw["dt"], kw["adt"], rtol=1e-6)  # the one A per head
    assert extra["D"] is kw["D"] and extra["z"] is kw["z"]
    assert torch.equal(out, kw["v"])


def per_head_k(kw, R, H):
    k = kw["k"][:, None] if R == 1 else kw["k"]
    return k.expand(-1, -1, H, -1)


def test_cute_step_adapter_shapes():
    """The official CuTe step's adapter (untestable without quack and a GPU): Q/K expanded to (B, R, H, N), A from
    A·Δ, λ from the logit, biases and projections rank-major, the cache in the official layout, updated per step."""
    from benchmarks import official

    for name, R in (("siso_trap_complex", 1), ("mimo_r4", 4)):
        spec = spec_with_overrides(SPECS / f"{name}.yaml", ["dims.d_state=8", "dims.headdim=4"])
        B, H = 2, 3
        kw = lib.build_inputs(spec, B, 1, H, "decode", device="cpu")
        seen = {}

        def rotary(q, k, angle_state, angle_proj, dt, bias_q, bias_k, **flags):
            seen.update(q=q, bias_q=bias_q, flags=flags)
            return q + 1, k + 2, angle_state + 3

        def step_fn(ssm, k_state, v_state, A, Bk, C, D, x, dt, trap, xproj, outproj, state_out, out, z, zproj,
                    **launch):
            seen.update(k_state=k_state.clone(), A=A, lam=trap, xproj=xproj, zproj=zproj)
            out.copy_(x)

        start = kw["state"].angle.clone()
        run = official.cute_step_fn(step_fn, rotary, spec, kw)
        y = run()
        second = run()
        assert torch.equal(second, y)
        assert seen["q"].shape == (B, R, H, 8) and seen["bias_q"].shape == (R, H, 8)
        assert seen["flags"]["rotate_pairwise"] == (spec.state.rotation == "pairwise")
        assert seen["k_state"].shape == (B, R, H, 8) and seen["k_state"].dtype == kw["v"].dtype
        assert torch.allclose(seen["A"] * kw["dt"], kw["adt"], rtol=1e-6)
        assert torch.allclose(seen["lam"], torch.sigmoid(kw["trap"]))
        assert seen["xproj"].shape == (R, H, 4) and seen["zproj"].shape == (R, H, 4)
        assert torch.equal(y, kw["v"])
        if R > 1:
            assert torch.equal(seen["xproj"][1], kw["mimo_v"][:, 1])
        assert torch.equal(kw["state"].angle, start)  # the shared start is never written (the adapter clones it)
        assert torch.equal(seen["k_state"], (seen["q"] * 0 + 2 + per_head_k(kw, R, H)).to(kw["v"].dtype))


def test_tilelang_and_siso_adapters(monkeypatch):
    from benchmarks import official

    spec = spec_with_overrides(SPECS / "mimo_r4.yaml", ["dims.d_state=8", "dims.headdim=4"])
    kw = lib.build_inputs(spec, 1, 4, 2, device="cpu")
    calls = _recording(monkeypatch, official, lambda a, k: a[2])
    official.provider(spec, "fwd")(kw)()
    args = calls[0][0]
    assert args[0] is kw["q"] and args[8] is kw["mimo_v"] and args[11] is kw["angles"]
    assert args[14:] == (16, 4, torch.bfloat16)  # chunk size, rotary_dim_divisor (rope fraction 0.5), dtype

    # the backward path: forward + backward(dout) on fresh leaves; the gradients of q, k, v, z come back
    spec = spec_with_overrides(SPECS / "siso_trap_complex.yaml", ["dims.d_state=8", "dims.headdim=4"])
    kw = lib.build_inputs(spec, 1, 4, 2, "bwd", device="cpu")
    calls = _recording(monkeypatch, official, lambda a, k: a[2] * k["Z"] + (a[0].sum() + a[1].sum()))
    got = official.provider(spec, "bwd")(kw)()
    assert calls[0][1]["chunk_size"] == 64 and calls[0][1]["D"] is not None
    assert set(got) == {"out", "q", "k", "v", "z"}
    assert torch.equal(got["v"], (kw["dout"] * kw["z"]).to(got["v"].dtype))
    assert not kw["v"].requires_grad  # the shared inputs stay plain tensors
