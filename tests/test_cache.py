"""The build cache of mamba3_gen.load (issue 9, failures 2, 3 and 4): fingerprints, the notebook edit-and-reload loop,
specs that share a name, many processes loading at once, and writes that are never seen half done.

Kernels run in the Triton interpreter (tiny shapes, fp32)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import mamba3_gen
from mamba3_gen import cache as cache_mod
from mamba3_gen.backends.triton.build import PACKAGE_FILES
from mamba3_gen.errors import FileSystemError
from mamba3_gen.files import atomic_write, sha256_bytes
from mamba3_gen.spec.loader import spec_hash
from mamba3_gen.spec.sources import resolve_spec
from tests.tiny import TINY, TINY_HALVED, forward_error

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder of this test's own."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MAMBA3_GEN_CACHE_DIR", str(root))
    return root


def entry_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != "locks")


def assert_complete(folder: Path) -> dict:
    """Every file the manifest lists is there with its sha256, and no temporary file is left over."""
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == set(PACKAGE_FILES)
    for name, digest in manifest["files"].items():
        assert sha256_bytes((folder / name).read_bytes()) == digest, f"{folder.name}/{name} is not the file built"
    assert not list(folder.glob(".*.tmp")), "a temporary file was left behind"
    return manifest


# --------------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_covers_spec_templates_versions_and_arch(monkeypatch):
    spec, _ = resolve_spec(TINY)
    base = cache_mod.fingerprint(spec, "interpreter")
    assert base == cache_mod.fingerprint(resolve_spec(TINY)[0], "interpreter")  # deterministic
    inputs = cache_mod.fingerprint_inputs(spec, "interpreter")
    assert inputs["spec"] == spec_hash(spec) and inputs["arch"] == "interpreter"
    assert set(inputs["versions"]) == {"triton", "torch", "nvidia-cutlass-dsl"}

    changed = {
        "spec": cache_mod.fingerprint(resolve_spec(TINY_HALVED)[0], "interpreter"),
        "arch": cache_mod.fingerprint(spec, "sm_90a"),
    }
    monkeypatch.setattr("mamba3_gen.backends.templating.templates_hash", lambda root: "other templates")
    changed["templates"] = cache_mod.fingerprint(spec, "interpreter")
    monkeypatch.undo()
    monkeypatch.setattr(cache_mod, "_version", lambda dist: "0.0" if dist == "triton" else "x")
    changed["versions"] = cache_mod.fingerprint(spec, "interpreter")
    monkeypatch.undo()
    monkeypatch.setattr(cache_mod, "__version__", "9.9.9")
    changed["generator"] = cache_mod.fingerprint(spec, "interpreter")
    for what, fp in changed.items():
        assert fp != base, f"the fingerprint ignores the {what}"
    assert len(set(changed.values())) == len(changed)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MAMBA3_GEN_CACHE_DIR", str(tmp_path / "c"))
    assert mamba3_gen.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MAMBA3_GEN_CACHE_DIR")
    import platformdirs

    assert mamba3_gen.cache_dir() == Path(platformdirs.user_cache_dir("mamba3-gen", appauthor=False))


# ------------------------------------------------------------------------------------------------------- load


def test_load_edit_load_gives_the_new_kernel(cache, tmp_path):
    """The notebook loop: load, edit the spec file, load again: the second module runs the edited spec."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    first = mamba3_gen.load(path, arch="interpreter")
    out_first, err = forward_error(first, TINY)
    assert err < 1e-5

    path.write_text(TINY_HALVED)  # the rotation pairs change: another output
    second = mamba3_gen.load(path, arch="interpreter")
    assert second is not first
    assert second.META["spec_hash"] == spec_hash(resolve_spec(TINY_HALVED)[0]) != first.META["spec_hash"]
    out_second, err = forward_error(second, TINY_HALVED)
    assert err < 1e-5
    assert (out_second - out_first).norm() > 1e-2 * out_first.norm()  # really another kernel

    assert mamba3_gen.load(path, arch="interpreter") is second  # unchanged: the same module, nothing rebuilt
    path.write_text(TINY)
    assert mamba3_gen.load(path, arch="interpreter") is first  # edited back: the first build again
    assert len(entry_folders(cache)) == 2


def test_two_specs_with_one_name_are_two_modules(cache):
    a = mamba3_gen.load(TINY, arch="interpreter")
    b = mamba3_gen.load(TINY_HALVED, arch="interpreter")
    assert a.META["name"] == b.META["name"] == "tiny"
    assert a is not b and a.__name__ != b.__name__
    assert Path(a.__file__).parent != Path(b.__file__).parent
    for module, text in ((a, TINY), (b, TINY_HALVED)):
        assert module.META["spec_hash"] == spec_hash(resolve_spec(text)[0])
        assert json.loads((Path(module.__file__).parent / "spec.json").read_text()) == \
            resolve_spec(text)[0].model_dump(mode="json", by_alias=True)


def test_every_kind_of_spec_source_gives_the_same_module(cache, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    spec, _ = resolve_spec(TINY)
    modules = [mamba3_gen.load(src, arch="interpreter")
               for src in (path, str(path), TINY, spec.model_dump(by_alias=True), spec)]
    assert all(m is modules[0] for m in modules)
    assert len(entry_folders(cache)) == 1


def test_a_damaged_entry_is_rebuilt(cache):
    spec, _ = resolve_spec(TINY)
    fp = cache_mod.fingerprint(spec, "interpreter")
    folder = cache_mod.ensure_entry(spec, "interpreter", fp)
    good = (folder / "fwd.py").read_bytes()
    (folder / "fwd.py").write_bytes(good[: len(good) // 2])  # as a killed writer without atomic writes would leave it
    assert [e.complete for e in cache_mod.entries()] == [False]
    assert cache_mod.ensure_entry(spec, "interpreter", fp) == folder
    assert (folder / "fwd.py").read_bytes() == good
    assert_complete(folder)


def test_cached_bytes_do_not_depend_on_where_the_spec_came_from(cache, tmp_path):
    path = tmp_path / "somewhere" / "tiny.yaml"
    path.parent.mkdir()
    path.write_text(TINY)
    module = mamba3_gen.load(path, arch="interpreter")
    folder = Path(module.__file__).parent
    text = (folder / "fwd.py").read_text()
    assert str(tmp_path) not in text and "<spec>" in text


# ------------------------------------------------------------------------------------------------ atomic writes


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "fwd.py"
    atomic_write(target, "old\n")

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(FileSystemError) as info:
        atomic_write(target, "new\n")
    assert str(info.value) == (f"{target}: cannot write: No space left on device; try a writable folder (check its "
                               "permissions and free space)")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fwd.py"]


# ----------------------------------------------------------------------------------------- many processes at once

_WORKER = textwrap.dedent("""\
    import json, os, sys, time
    import mamba3_gen  # imports first, then all workers start loading together
    go = sys.argv[1]
    while not os.path.exists(go):
        time.sleep(0.01)
    specs = json.loads(sys.argv[2])
    rank = int(sys.argv[3])
    order = specs[rank % len(specs):] + specs[:rank % len(specs)]  # each rank starts with another spec
    hashes = {m.META["name"] + "/" + m.META["spec_hash"]: m.__file__
              for m in (mamba3_gen.load(s, arch="interpreter") for s in order)}
    print(json.dumps(hashes))
""")


def test_eight_processes_load_three_specs_into_one_empty_cache(cache, tmp_path):
    specs = [TINY, TINY_HALVED, TINY.replace("name: tiny", "name: tiny_other").replace("headdim: 4", "headdim: 8")]
    go = tmp_path / "go"
    env = dict(os.environ, MAMBA3_GEN_CACHE_DIR=str(cache), TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(go), json.dumps(specs), str(rank)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for rank in range(8)]
    time.sleep(1.0)  # let the interpreters start; those still importing join the race late, which is fine too
    go.write_text("")
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))

    expected = {resolve_spec(s)[0].name + "/" + spec_hash(resolve_spec(s)[0]) for s in specs}
    assert all(set(r) == expected for r in results)
    assert all(r == results[0] for r in results), "two processes imported different files for one spec"
    folders = entry_folders(cache)
    assert len(folders) == 3
    for folder in folders:
        manifest = assert_complete(folder)
        assert manifest["arch"] == "interpreter"
