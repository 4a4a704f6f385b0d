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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
