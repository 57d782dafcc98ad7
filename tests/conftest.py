"""Fixtures shared by several test modules (pytest finds them here)."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module whose problems are tiny: it avoids thread-pool overhead
    (10x on a busy 2-core machine). A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
