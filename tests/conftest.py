"""Test set-up. Without a GPU the Triton kernels run under the interpreter, which must be switched
on before triton is first imported, so it happens here, before any test module loads."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fusedtech  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def cpu_backends():
    """Backends that run on CPU tensors here: the reference, the C++ kernels, Triton interpreted."""
    return fusedtech.available_backends("cpu")


def all_device_backends():
    """(device, backend) pairs that can run here."""
    pairs = [("cpu", b) for b in fusedtech.available_backends("cpu")]
    if HAS_CUDA:
        pairs += [("cuda", b) for b in fusedtech.available_backends("cuda")]
    return pairs


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo_caches():
    """Each test file starts with empty torch.compile caches. Compiling a module goes through one code
    object of torch._dynamo (external_utils' wrapper), whose cache takes 8 entries: a whole suite run
    in one process filled it, and a later file's fullgraph compile failed on the recompile limit."""
    torch._dynamo.reset()
    yield
