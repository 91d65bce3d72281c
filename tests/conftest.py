"""Shared test setup: offline always, fixture paths, small thread counts."""

import os
from pathlib import Path

# No test may reach a model hub: transformers and huggingface_hub read these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared").resolve()
FIXTURE = SHARED / "fixtures" / "official-tiny-llama"
TOTALSEG = SHARED / "data" / "totalseg"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not FIXTURE.is_dir():
        pytest.fail(f"{FIXTURE} is missing: the shared fixtures must sit beside the checkout (../shared)")
    return FIXTURE


@pytest.fixture(scope="session")
def reference(fixture_dir):
    import numpy as np

    return dict(np.load(fixture_dir / "reference.npz"))
