"""An engine's own output goes to a file; capgen's lines stay on the terminal."""
import json
import subprocess
import sys

from conftest import ROOT

# Noise from every source an engine has: Python warnings, print(), a C-level write to the
# descriptor, and a child process that inherits the descriptors (vLLM's engine core).
NOISY_RUN = r"""
import logging, os, subprocess, sys, warnings
from pathlib import Path
from gen import logs
logs.setup(sys.argv[2])
log = logging.getLogger("gen.test")
log.info("before")
with logs.divert_output(None if sys.argv[3] == "verbose" else Path(sys.argv[1])):
    warnings.warn("a FutureWarning from an engine", FutureWarning)
    logging.getLogger("torch._dynamo").warning("a library's own logger")
    print("print to stdout")
    os.write(2, b"C-level write to fd 2\n")
    subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"])
    log.info("own line while diverted")
log.info("after")
print("stdout is back")
"""


def run_noisy(tmp_path, fmt: str, mode: str = "quiet"):
    path = tmp_path / "engine.log"
    p = subprocess.run([sys.executable, "-c", NOISY_RUN, str(path), fmt, mode], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p, path


def test_engine_output_goes_to_its_file_and_capgens_lines_to_the_terminal(tmp_path):
    p, path = run_noisy(tmp_path, "text")
    assert p.stderr.splitlines() == ["INFO before", "INFO own line while diverted", "INFO after"]
    assert p.stdout == "stdout is back\n"
    diverted = path.read_text()
    for noise in ("FutureWarning", "a library's own logger", "print to stdout", "C-level write", "child out", "child err"):
        assert noise in diverted


def test_json_logs_stay_pure_json_lines(tmp_path):
    p, _ = run_noisy(tmp_path, "json")
    messages = [json.loads(line)["message"] for line in p.stderr.splitlines()]
    assert messages == ["before", "own line while diverted", "after"]


def test_verbose_shows_everything(tmp_path):
    p, path = run_noisy(tmp_path, "text", "verbose")
    assert not path.exists()
    assert "C-level write" in p.stderr and "child err" in p.stderr and "print to stdout" in p.stdout
