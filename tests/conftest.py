"""Shared test setup: golden fixtures live in ../shared/fixtures (beside the checkout)."""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "opensora_v1"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Path to ../shared/fixtures/opensora_v1; fails loudly (never skips) when absent."""
    if not FIXTURES.is_dir():
        pytest.fail(
            f"golden fixtures not found at {FIXTURES}: the parity tests need ../shared/fixtures "
            "beside the checkout (CI provides it)."
        )
    return FIXTURES


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests on one torch thread: tiny models gain nothing from threads, and on a shared
    2-core CI machine threads make them many times slower. Use with pytest.mark.usefixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
