"""The benchmarks' fast modes, so they cannot rot. They assert accounting, never timings."""
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script,args", [("gen_bench.py", ["--small"]), ("curate_bench.py", ["--small"]),
                                         ("client_cost.py", ["--n", "40", "--concurrency", "8"]),
                                         ("pacing_bench.py", ["--small"])])
def test_benchmark_small_mode_runs(script, args):
    r = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
