"""Session fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (small models run faster so, and the numbers do not depend on
    the machine's core count); restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small trained tiny-preset stage-3 run (see tests/serve_helpers.py), trained once per session."""
    import torch

    from tests.serve_helpers import train_small_run

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_small_run(tmp_path_factory.mktemp("served"))
    finally:
        torch.set_num_threads(n)
