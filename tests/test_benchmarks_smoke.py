"""The benchmarks' fast modes, so they cannot rot. They assert accounting, never timings."""
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script", ["gen_bench.py", "curate_bench.py"])
def test_benchmark_small_mode_runs(script):
    r = subprocess.run([sys.executable, f"benchmarks/{script}", "--small"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
