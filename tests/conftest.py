"""Hypothesis profiles ("ci": deterministic, modest example counts, when the CI env var is set; "dev" otherwise) and
the session-wide kernel caches. On a machine without CUDA the kernels run in the Triton interpreter: TRITON_INTERPRET
is set here, before any test module imports a generated kernel (triton.jit reads it when a kernel is decorated)."""
import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests never read or fill the user's build cache (mamba3_gen.load, the lock files of builds): one per session.
os.environ["MAMBA3_GEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="mamba3-gen-test-cache-")
atexit.register(shutil.rmtree, os.environ["MAMBA3_GEN_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)
# MAMBA3_GEN_NO_SHRINK=1 reports the first failing example as drawn: shrinking an interpreter example can take longer
# than the whole run (each candidate re-runs kernels on the CPU).
for _name in ("ci", "dev"):
    settings.register_profile(f"{_name}-noshrink", settings.get_profile(_name),
                              phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(("ci" if os.environ.get("CI") else "dev")
                      + ("-noshrink" if os.environ.get("MAMBA3_GEN_NO_SHRINK") == "1" else ""))


_REAL_EMPTY = torch.empty
_REAL_EMPTY_LIKE = torch.empty_like


def _poisoned(t):
    # Floating tensors only: integer buffers (the step's arrival counters) have no NaN, and their host code zeroes
    # what it needs. NaN for every element a kernel should overwrite: one it forgets then fails the comparison.
    if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
        t.fill_(float("nan"))
    return t


def _nan_empty(*args, **kwargs):
    return _poisoned(_REAL_EMPTY(*args, **kwargs))


def _nan_empty_like(*args, **kwargs):
    return _poisoned(_REAL_EMPTY_LIKE(*args, **kwargs))


@pytest.fixture(autouse=True, scope="session")
def nan_poisoned_empty():
    """torch.empty / torch.empty_like return NaN-filled float tensors during the tests (as flash-linear-attention's
    conftest does), so an output element a kernel forgets to write is NaN and fails the test instead of passing with
    whatever the allocator left there. Set MAMBA3_GEN_NO_POISON=1 to turn it off (e.g. to time something)."""
    if os.environ.get("MAMBA3_GEN_NO_POISON") == "1":
        yield False
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", _nan_empty)
        mp.setattr(torch, "empty_like", _nan_empty_like)
        yield True


@pytest.fixture(scope="session")
def interp_kernels(tmp_path_factory):
    from tests.helpers import KernelCache

    return KernelCache(tmp_path_factory.mktemp("kernels_interpreter"), "interpreter")


@pytest.fixture(scope="session")
def gpu_kernels(tmp_path_factory):
    from tests.helpers import KernelCache
    from tests.strategies import gpu_arch

    return KernelCache(tmp_path_factory.mktemp("kernels_gpu"), gpu_arch())


def pytest_collection_modifyitems(config, items):
    """Under MAMBA3_GEN_SPEC (`mamba3-gen test SPEC`), the tests marked not_in_spec_mode are deselected rather than
    listed as skipped one by one: only the property tests of that spec are collected."""
    from tests.strategies import ENV_SPEC, not_in_spec_mode

    if ENV_SPEC is None:
        return
    reason = not_in_spec_mode.kwargs["reason"]
    kept, dropped = [], []
    for item in items:
        out = any(m.kwargs.get("reason") == reason for m in item.iter_markers("skipif"))
        (dropped if out else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
