"""Test set-up: Triton kernels run in the interpreter when no GPU is present (CI), so CPU runs test
the same kernel code on tiny shapes; tests marked ``gpu`` are skipped there."""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test (vary all of them with NSA_TEST_SEED): fresh random inputs, replayable."""
    seed = zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("NSA_TEST_SEED", "0"))
    torch.manual_seed(seed)
    yield


@pytest.fixture(autouse=True)
def _fresh_compile_state():
    """Every test compiles from scratch: dynamo's recompile limit counts compilations of a code object (e.g.
    the model's forward) across the whole process, so compiling tests would otherwise fail by their order."""
    torch._dynamo.reset()
    yield
