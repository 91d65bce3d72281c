"""The benchmark scripts run as `python benchmarks/NAME.py`, which puts benchmarks/ first on sys.path: a script
named like an installed package shadows it for every import in that process (benchmarks/kernels.py once broke
`import peft` -> transformers -> the PyPI package `kernels`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_no_benchmark_script_shadows_an_installed_module():
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert "runtime" in scripts  # the folder was found
    saved = list(sys.path)
    try:
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCHMARKS]
        shadowed = [s for s in scripts if s not in sys.modules and importlib.util.find_spec(s) is not None]
    finally:
        sys.path[:] = saved
    assert not shadowed, f"benchmarks/{shadowed[0]}.py shadows an installed module of that name; rename the script"
