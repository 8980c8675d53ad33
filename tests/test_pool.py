"""Many servers: least outstanding work first, a failing server taken out and tried later."""
import json

from conftest import read_rows, write_jsonl
from fake_openai import FakeOpenAI

from gen.engines.pool import Server, ServerPool
from gen.run import EXIT_OK, main


def test_least_outstanding_first_then_fewest_requests():
    pool = ServerPool([Server("a", None), Server("b", None)])
    first = pool.pick(); pool.started(first)
    second = pool.pick(); pool.started(second)
    assert {first.url, second.url} == {"a", "b"}
    pool.finished(first, ok=True)
    assert pool.pick() is first  # nothing outstanding there now


def test_failing_server_is_taken_out_for_the_cooldown_then_probed():
    now = [0.0]
    a, b = Server("a", None), Server("b", None)
    pool = ServerPool([a, b], failures_to_eject=3, cooldown=30, clock=lambda: now[0])
    for _ in range(3):
        pool.started(a); pool.finished(a, ok=False)
    assert a.taken_out == 1
    assert all(pool.pick() is b for _ in range(5))
    now[0] = 31.0
    pool.started(b)  # b busy, a back in the pool
    assert pool.pick() is a


def test_a_lone_server_is_never_taken_out():
    a = Server("a", None)
    pool = ServerPool([a])
    for _ in range(10):
        pool.started(a); pool.finished(a, ok=False)
    assert a.taken_out == 0 and pool.pick() is a


def test_run_spreads_over_servers_and_finishes_on_the_healthy_one(tmp_path, sample_captions):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:30])
    # 50 ms a request: at 10 ms the whole run took ~0.1 s, and one stall of the fake's threads
    # on a busy box could hand nearly every caption to the other server.
    with FakeOpenAI(latency=0.05) as good, FakeOpenAI(faults={"503": 1.0}) as bad, \
         FakeOpenAI(latency=0.05) as good2:
        code = main(["--captions", str(path), "--out", str(tmp_path / "out"), "--model", "fake-model",
                     "--base-url", good.base_url, "--base-url", bad.base_url, "--base-url", good2.base_url,
                     "--no-progress", "--retry-wait", "0.01", "--concurrency", "8"])
        assert code == EXIT_OK
        assert len(good.requests) + len(good2.requests) == 30
        assert min(len(good.requests), len(good2.requests)) >= 5  # both healthy ones used
        assert 3 <= len(bad.requests) < 15  # taken out after 3 failures in a row (a few in flight)
    servers = json.loads((tmp_path / "out" / "manifest.json").read_text())["engine"]["servers"]
    assert [s["taken_out"] >= 1 for s in servers] == [False, True, False]
    assert len({r["caption_id"] for r in read_rows(tmp_path / "out" / "queries.parquet")}) == 30
