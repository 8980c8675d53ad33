"""The bundled 0.5B model through vLLM's CPU build, inside a local Ray instance (one actor):
`--executor ray --engine vllm` end to end, a driver killed with SIGKILL, and the rerun.

Slow (minutes on a CPU: the engine starts twice): marked `slow`. Actors holding a stand-in
engine (faults, lost actors, refusals) are in tests/test_ray_executor.py.
"""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import ROOT, read_jsonl, read_rows, write_jsonl

from gen import localmodel

pytestmark = pytest.mark.slow
N = 4


@pytest.fixture(scope="module")
def model_dir():
    pytest.importorskip("ray")
    try:
        import vllm  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("vLLM is not installed (pip install -e '.[cpu]')")
    return localmodel.ensure()


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))   # the actors import this checkout's gen
    # Ray starts its workers at niceness 15: on a machine shared with other work (CI runners,
    # a developer's box) the engine would get almost no CPU. Its memory monitor kills the
    # worker using the most memory once the node passes 95%, other processes' memory counted.
    env.setdefault("RAY_worker_niceness", "0")
    env.setdefault("RAY_memory_monitor_refresh_ms", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")   # GiB; four captions need little
    return env


def _stored(store) -> int:
    if not store.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT count(*) FROM answers").fetchone()[0]
    except sqlite3.OperationalError:   # the table is not created yet
        return 0


def _engines_of(pid: int) -> list:
    import psutil
    try:
        return [p for p in psutil.Process(pid).children(recursive=True)
                if p.name().startswith("VLLM") or "Replica" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def test_vllm_engine_in_ray_answers_and_a_killed_driver_resumes(model_dir, tmp_path, sample_captions):
    import psutil
    captions = sample_captions[:N]
    caps = write_jsonl(tmp_path / "caps.jsonl", captions)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gen.run", "--no-progress", "--no-curate", "--captions", str(caps),
           "--out", str(out), "--executor", "ray", "--engine", "vllm", "--ray-actors", "1",
           "--concurrency", "2", "--log-format", "json"]
    # Batches of one caption (concurrency 2, two batches an actor), recorded one by one:
    # killed once the store holds the first.
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline, engines = time.monotonic() + 1200, []
        while first.poll() is None and _stored(out / "cache.sqlite") == 0 and time.monotonic() < deadline:
            engines = _engines_of(first.pid) or engines
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait()
    log_text = (tmp_path / "first.log").read_text()
    kept = _stored(out / "cache.sqlite")
    assert first.returncode == -signal.SIGKILL, log_text[-3000:]
    assert 1 <= kept < N, log_text[-3000:]
    # The local Ray instance the driver started, and the engine in it, end with the driver.
    assert engines
    gone, alive = psutil.wait_procs(engines, timeout=120)
    assert not alive, [p.pid for p in alive]

    second = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1500)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    # the rerun asked only for what the killed run had not stored
    assert manifest["counts"]["cached"] == kept and manifest["counts"]["requested"] == N - kept
    assert manifest["engine"]["engine"] == "vllm" and manifest["engine"]["executor"] == "ray"
    assert manifest["usage"]["completion_tokens"] > 0
    # every caption once: with queries, or rejected with its reason
    done = {r["caption_id"] for r in read_rows(out / "queries.parquet")}
    rejected = {r["caption_id"] for r in read_jsonl(out / "rejects.jsonl") if r["stage"] != "query"}
    assert done | rejected == {c["id"] for c in captions} and not done & rejected
    assert len(done) >= N // 2
    assert sorted(r["id"] for r in read_rows(out / "captions.parquet")) == sorted(c["id"] for c in captions)
    # the engine's own output came to the driver and from there to engine.log
    assert "Replica" in (out / "engine.log").read_text()
