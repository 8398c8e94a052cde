"""One exception hierarchy (issue 9, failures 5 and 7): every error mamba3-gen raises for a user's mistake is a
Mamba3GenError (a ValueError), and each says what is wrong and what to try. CPU only; the kernels are not launched:
every check here fires before a launch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mamba3_gen
from mamba3_gen import BuildError, DeviceError, FileSystemError, InputError, Mamba3GenError, SpecError
from mamba3_gen.spec.sources import resolve_spec
from tests.tiny import SHAPE, TINY


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder of this test's own."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MAMBA3_GEN_CACHE_DIR", str(root))
    return root


@pytest.fixture
def tiny(cache):
    """The tiny spec's module, built for the interpreter."""
    return mamba3_gen.load(TINY, arch="interpreter")


def tiny_inputs() -> dict:
    from mamba3_gen.reference import make_inputs

    spec, _ = resolve_spec(TINY)
    return make_inputs(spec, *SHAPE)


# ----------------------------------------------------------------------------------------------------- hierarchy


def test_one_base_class_for_every_error():
    assert issubclass(Mamba3GenError, ValueError)
    for cls in (SpecError, BuildError, FileSystemError, InputError):
        assert issubclass(cls, Mamba3GenError), cls
    assert issubclass(DeviceError, InputError)
    # the old import paths name the same classes
    from mamba3_gen.backends.triton.build import BuildError as build_error
    from mamba3_gen.spec.loader import SpecError as spec_error

    assert build_error is BuildError and spec_error is SpecError


# ------------------------------------------------------------------------------------------------------- specs


def test_spec_error_from_yaml_text(cache):
    with pytest.raises(SpecError) as info:
        mamba3_gen.load("name: bad\ndims:\n  mimo_rank: 9\n")
    assert info.value.problems == ["<string>:3: dims.mimo_rank: 9 is too large (must be <= 8); try mimo_rank: 8"]


def test_spec_error_from_a_dict_names_the_field_without_a_line(cache):
    with pytest.raises(SpecError) as info:
        mamba3_gen.load({"name": "bad", "dims": {"mimo_rank": 9}})
    assert info.value.problems == ["<dict>: dims.mimo_rank: 9 is too large (must be <= 8); try mimo_rank: 8"]


def test_spec_error_from_a_missing_file(cache, tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        mamba3_gen.load(missing)
    assert str(info.value) == f"{missing}:1: file: no such file; try a path to an existing spec, e.g. specs/mimo_r4.yaml"


def test_spec_error_for_something_that_is_no_spec(cache):
    with pytest.raises(SpecError) as info:
        mamba3_gen.load(42)
    assert str(info.value) == ("<spec>: spec: expected a path, YAML text, a dict or a Spec, got int; "
                               "try mamba3_gen.load('specs/mimo_r4.yaml')")


# ------------------------------------------------------------------------------------------------------ builds


def test_build_error_for_a_spec_that_does_not_lower(cache):
    # C·R = 16·3 = 48 rows is no power of two: valid as a spec, not buildable
    with pytest.raises(BuildError) as info:
        mamba3_gen.load({"name": "r3", "dims": {"mimo_rank": 3, "chunk_size": 16}}, arch="sm_90a")
    msg = str(info.value)
    assert msg.startswith("dims.mimo_rank: ") and "; try " in msg


def test_build_error_for_an_unknown_arch(cache):
    with pytest.raises(BuildError) as info:
        mamba3_gen.load(TINY, arch="sm_70")
    assert str(info.value) == ("arch: unknown target 'sm_70'; try one of: sm_90a, sm_80, sm_86, sm_89, sm_120, "
                               "interpreter")


def test_build_error_for_another_specs_package_in_out_dir(tmp_path, cache):
    mamba3_gen.load(TINY, arch="interpreter", out_dir=tmp_path / "gen")
    other = TINY.replace("headdim: 4", "headdim: 8")
    with pytest.raises(BuildError) as info:
        mamba3_gen.load(other, arch="interpreter", out_dir=tmp_path / "gen")
    assert str(info.value) == (
        f"{tmp_path / 'gen' / 'tiny'}: holds the package of another spec named 'tiny' (dims.headdim: 4 -> 8); try "
        "giving this spec another name, another output folder, or --force (force=True) to replace it (e.g. after "
        "editing the spec)")
    module = mamba3_gen.load(other, arch="interpreter", out_dir=tmp_path / "gen", force=True)
    assert module.META["P"] == 8


# -------------------------------------------------------------------------------------------------- file system


def test_cache_under_a_file_is_a_file_system_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("MAMBA3_GEN_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(FileSystemError) as info:
        mamba3_gen.load(TINY, arch="interpreter")
    err = info.value
    assert err.path.startswith(str(blocker / "cache"))
    assert str(err) == (f"{err.path}: cannot create the folder: Not a directory; try setting MAMBA3_GEN_CACHE_DIR to a "
                        "writable folder")


def test_unwritable_out_dir_is_a_file_system_error(tmp_path, cache, monkeypatch):
    # root ignores file modes, so the refusal is simulated where the OS would raise it
    import mamba3_gen.files as files

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    with pytest.raises(FileSystemError) as info:
        mamba3_gen.load(TINY, arch="interpreter", out_dir=tmp_path / "gen")
    assert str(info.value) == (f"{tmp_path / 'gen' / '__init__.py'}: cannot write: Permission denied; try a writable "
                               "folder (check its permissions and free space)")


def test_out_dir_that_is_a_file(tmp_path, cache):
    out = tmp_path / "out"
    out.write_text("")
    with pytest.raises(FileSystemError) as info:
        mamba3_gen.load(TINY, arch="interpreter", out_dir=out)
    assert str(info.value) == f"{out}: cannot write into it: it is a file, not a folder; try another output folder"


# ------------------------------------------------------------------------------------------------------ inputs


def test_input_error_names_the_tensor_and_the_shape(tiny):
    kw = tiny_inputs()
    kw["q"] = kw["q"][:, :, :, :4]
    with pytest.raises(InputError) as info:
        tiny.mamba3_forward(**kw)
    assert str(info.value) == "q has shape (1, 9, 1, 4); expected (1, 9, 1, 8)"


def test_input_error_from_the_forward_itself(tiny):
    kw = tiny_inputs()
    kw["v"] = kw["v"][0]
    with pytest.raises(InputError) as info:
        tiny.mamba3_forward(**kw)
    assert str(info.value) == "v must be a torch.Tensor of shape (B, L, H, P=4); got shape (9, 2, 4)"


def test_cpu_tensors_without_the_interpreter(tiny, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(DeviceError) as info:
        tiny.mamba3_forward(**tiny_inputs())
    msg = str(info.value)
    assert msg.startswith("v is on the CPU, but Triton runs kernels on the CPU only in its interpreter, and "
                          "TRITON_INTERPRET=1 is not set; try starting Python with it")
    assert "move the tensors to a CUDA GPU with .cuda()" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: the CuTe backend would run")
def test_cute_backend_without_cuda(tiny):
    v = torch.zeros(1, SHAPE[2], tiny.META["P"])  # one token: (B, H, P)
    with pytest.raises(DeviceError) as info:
        tiny.mamba3_step(None, None, v, None, None, state=None, backend="cute")
    assert str(info.value) == (
        "backend='cute' runs the CuTe DSL kernel, which needs a CUDA GPU, but v is on cpu; try backend='triton' "
        "(which also runs on the CPU under TRITON_INTERPRET=1), or move the tensors to a CUDA GPU with .cuda()")


def test_no_gpu_and_no_interpreter_warns_at_load(cache, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: load picks its arch and has nothing to warn about")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET=1 is not set"):
        module = mamba3_gen.load(TINY)
    assert module.META["arch"] == "interpreter"


def test_every_error_is_caught_by_the_base_class(cache):
    caught = []
    for source, arch in ((42, None), (TINY, "sm_70"), ({"name": "r3", "dims": {"mimo_rank": 3}}, "sm_90a")):
        try:
            mamba3_gen.load(source, arch=arch)
        except Mamba3GenError as e:
            caught.append(type(e).__name__)
    assert caught == ["SpecError", "BuildError", "BuildError"]
