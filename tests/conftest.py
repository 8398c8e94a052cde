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
from hypothesis import HealthCheck, settings  # noqa: E402

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
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session")
def interp_kernels(tmp_path_factory):
    from tests.helpers import KernelCache

    return KernelCache(tmp_path_factory.mktemp("kernels_interpreter"), "interpreter")


@pytest.fixture(scope="session")
def gpu_kernels(tmp_path_factory):
    from tests.helpers import KernelCache
    from tests.strategies import gpu_arch

    return KernelCache(tmp_path_factory.mktemp("kernels_gpu"), gpu_arch())
