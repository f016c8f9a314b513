import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors on a shared 2-core CPU: extra intra-op threads only contend. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")`` or as a test argument."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
