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


def run_without_modules(blocked: tuple[str, ...], body: str, timeout: float = 120) -> None:
    """Run the Python code `body` in a fresh interpreter in which the modules `blocked` cannot be imported (each
    import of them raises ImportError), and fail the test with its stderr unless it exits cleanly."""
    import subprocess
    import sys

    preamble = f"import sys\nfor name in {tuple(blocked)!r}:\n    sys.modules[name] = None\n"
    done = subprocess.run([sys.executable, "-c", preamble + body], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
