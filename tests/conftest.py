"""Shared test configuration: GPU tests skip cleanly where there is no CUDA,
and a guard that fails a test on any host-device sync."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Every way a tensor value reaches the host (.item(), bool(), float(), int(),
# tolist, Python `if tensor`) lowers to this op; nonzero and masked_select need
# the output size on the host, which is a sync too.
_SYNCING_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
}


class ForbidHostSync(TorchDispatchMode):
    """Raises on any op that would read a device value back to the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNCING_OPS:
            raise AssertionError(f"host sync: {func} was called")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def forbid_host_sync():
    """`with forbid_host_sync(): ...` fails the test on any host-device sync."""
    return ForbidHostSync


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (run on the lent GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
