"""--executor ray on a local Ray instance (CPU): actors calling the fake server, and actors
holding an engine (the stand-in of tests/standin_engine.py; the real vLLM one is in
tests/test_ray_vllm.py): same outputs as a local run, same resume, lost actors, clear refusals."""
import json
import os
import time
from collections import Counter

import pytest
from conftest import ROOT, read_rows, write_jsonl
from fake_openai import FakeOpenAI, _caption_of
from standin_engine import builder

import gen.generate.ray_executor
import gen.run
from gen.run import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main

pytestmark = pytest.mark.slow


def test_ray_run_equals_local_run_and_resumes(ray_local, tmp_path, sample_captions):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:30])
    common = ["--captions", str(path), "--model", "fake-model", "--no-progress", "--retry-wait", "0.01",
              "--concurrency", "4"]
    with FakeOpenAI() as fake:
        assert main([*common, "--base-url", fake.base_url, "--out", str(tmp_path / "local")]) == EXIT_OK
    local = sorted(tuple(r.values()) for r in read_rows(tmp_path / "local" / "queries.parquet"))

    # 20% server errors on the ray side too: retried inside the actors
    with FakeOpenAI(faults={"503": 0.2}, seed=1) as fake:
        ray_args = [*common, "--base-url", fake.base_url, "--out", str(tmp_path / "ray"),
                    "--executor", "ray", "--ray-actors", "2"]
        subset = write_jsonl(tmp_path / "first.jsonl", sample_captions[:12])
        assert main([*ray_args[:1], str(subset), *ray_args[2:]]) == EXIT_OK
        first_run = len(fake.requests)
        assert main(ray_args) == EXIT_OK
        asked_later = {_caption_of(r) for r in fake.requests[first_run:]}
    # resume: the 12 captions answered by the first run were not asked again
    assert asked_later == {c["text"] for c in sample_captions[12:30]}
    got = sorted(tuple(r.values()) for r in read_rows(tmp_path / "ray" / "queries.parquet"))
    assert got == local
    m = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert m["counts"]["cached"] == 12 and m["counts"]["requested"] == 18


def test_ray_with_openai_and_no_server_is_a_usage_error(tmp_path, sample_captions):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:2])
    assert main(["--captions", str(path), "--out", str(tmp_path / "o"), "--executor", "ray", "--engine", "openai",
                 "--model", "some-model", "--no-progress"]) == EXIT_USAGE


def _engine_run(tmp_path, captions, out, *extra):
    return main(["--captions", str(captions), "--out", str(out), "--engine", "vllm", "--model", str(tmp_path),
                 "--no-progress", "--no-curate", "--concurrency", "4", *extra])


def _asked(path) -> Counter:
    return Counter(path.read_text(encoding="utf-8").splitlines()) if path.exists() else Counter()


def test_engines_in_actors_answer_as_the_local_run_and_resume(ray_local, tmp_path, sample_captions, monkeypatch):
    """--engine vllm --executor ray: each actor builds the engine gen.engines would (here the
    stand-in), answers as the local run does, and a rerun asks only for what is new."""
    asked = tmp_path / "asked.txt"
    monkeypatch.setattr(gen.run, "build_engine", builder(tmp_path / "local-asked.txt"))
    monkeypatch.setattr(gen.generate.ray_executor, "build_engine", builder(asked))
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:10])
    assert _engine_run(tmp_path, path, tmp_path / "local") == EXIT_OK
    first = write_jsonl(tmp_path / "first.jsonl", sample_captions[:4])
    assert _engine_run(tmp_path, first, tmp_path / "ray", "--executor", "ray", "--ray-actors", "2") == EXIT_OK
    assert set(_asked(asked)) == {c["text"] for c in sample_captions[:4]}
    asked.unlink()
    asked.with_suffix(".pids").unlink()
    assert _engine_run(tmp_path, path, tmp_path / "ray", "--executor", "ray", "--ray-actors", "2") == EXIT_OK
    assert set(_asked(asked)) == {c["text"] for c in sample_captions[4:10]}
    # 6 captions in batches of 4: one batch each, not both to the first actor
    assert len(set(asked.with_suffix(".pids").read_text().split())) == 2
    local = sorted(tuple(r.values()) for r in read_rows(tmp_path / "local" / "queries.parquet"))
    assert sorted(tuple(r.values()) for r in read_rows(tmp_path / "ray" / "queries.parquet")) == local
    m = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert m["counts"]["cached"] == 4 and m["counts"]["requested"] == 6
    assert m["engine"]["engine"] == "stand-in" and m["engine"]["executor"] == "ray"


def test_an_actor_lost_mid_batch_has_its_captions_asked_on_another(ray_local, tmp_path, sample_captions,
                                                                   monkeypatch):
    captions = sample_captions[:8]
    victim = captions[5]["text"]
    asked = tmp_path / "asked.txt"
    monkeypatch.setattr(gen.generate.ray_executor, "build_engine", builder(asked, die_on=victim, die_times=1))
    path = write_jsonl(tmp_path / "caps.jsonl", captions)
    assert _engine_run(tmp_path, path, tmp_path / "o", "--executor", "ray", "--ray-actors", "2") == EXIT_OK
    assert len(asked.with_suffix(".deaths").read_text().splitlines()) == 1   # an actor did die
    assert _asked(asked)[victim] == 2      # on the actor that died, then on the other
    rows = read_rows(tmp_path / "o" / "captions.parquet")
    assert sorted(r["id"] for r in rows) == sorted(c["id"] for c in captions)  # each once


def test_every_actor_lost_fails_the_run_and_the_rerun_asks_only_the_rest(ray_local, tmp_path, sample_captions,
                                                                        monkeypatch, capsys):
    from gen.store import AnswerStore
    captions = sample_captions[:8]
    victim = captions[6]["text"]
    asked = tmp_path / "asked.txt"
    monkeypatch.setattr(gen.generate.ray_executor, "build_engine", builder(asked, die_on=victim, die_times=99))
    path = write_jsonl(tmp_path / "caps.jsonl", captions)
    args = ["--executor", "ray", "--ray-actors", "2"]
    assert _engine_run(tmp_path, path, tmp_path / "o", *args) == EXIT_FAILED
    assert "every Ray actor died" in capsys.readouterr().err
    store = AnswerStore(tmp_path / "o" / "cache.sqlite")
    kept = len(store)
    store.close()
    assert 0 < kept < len(captions)
    asked.unlink()
    monkeypatch.setattr(gen.generate.ray_executor, "build_engine", builder(asked))
    assert _engine_run(tmp_path, path, tmp_path / "o", *args) == EXIT_OK
    assert sum(_asked(asked).values()) == len(captions) - kept and _asked(asked)[victim] == 1
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["counts"]["cached"] == kept
    rows = read_rows(tmp_path / "o" / "captions.parquet")
    assert sorted(r["id"] for r in rows) == sorted(c["id"] for c in captions)


def test_a_model_path_missing_on_a_node_is_named_with_the_node(ray_local, tmp_path, sample_captions, capsys):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:2])
    code = main(["--captions", str(path), "--out", str(tmp_path / "o"), "--executor", "ray", "--engine", "vllm",
                 "--model", str(tmp_path / "no-such-model"), "--no-progress", "--ray-actors", "1"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    node = ray_local.util.get_node_ip_address()
    assert f"{tmp_path / 'no-such-model'} does not exist on node {node}" in err and "--model" in err


def test_gpus_asked_of_a_cluster_without_any_is_refused_at_once(ray_local, tmp_path, sample_captions, capsys):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:2])
    started = time.monotonic()
    code = main(["--captions", str(path), "--out", str(tmp_path / "o"), "--executor", "ray", "--engine", "vllm",
                 "--model", str(tmp_path), "--no-progress", "--ray-gpus-per-actor", "1"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert time.monotonic() - started < 60   # Ray itself would wait for a GPU forever
    assert "--ray-gpus-per-actor 1: the Ray cluster has no GPU" in err and "0 GPU" in err


def test_sigterm_stops_a_ray_run_waiting_on_its_actors(tmp_path, sample_captions):
    """ray.wait blocks where Python's signal handlers cannot run: the driver must wake to see
    a stop signal, and end its actors, while the actors' requests are still unanswered."""
    import signal
    import subprocess
    import sys
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:4])
    with FakeOpenAI(latency=60) as fake:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gen.run", "--captions", str(path), "--out", str(tmp_path / "o"),
             "--executor", "ray", "--ray-actors", "1", "--base-url", fake.base_url, "--model", "fake-model",
             "--no-progress", "--no-curate"],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while not fake.requests and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fake.requests, proc.communicate()[0][-3000:] if proc.poll() is not None else "no request"
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the run did not stop on SIGTERM")
    assert proc.returncode == 143, output[-3000:]


def test_a_refused_model_stops_a_ray_run_with_exit_1_and_no_traceback(ray_local, tmp_path, sample_captions, capsys):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:30])
    with FakeOpenAI(check_model=True) as fake:
        code = main(["--captions", str(path), "--out", str(tmp_path / "o"), "--executor", "ray",
                     "--ray-actors", "2", "--concurrency", "4", "--base-url", fake.base_url,
                     "--model", "fake-modle", "--no-progress", "--retry-wait", "0.01"])
        assert code == EXIT_FAILED
        assert len(fake.requests) <= 2 * 4 * 2   # per actor: the batches it holds, and no more
    err = capsys.readouterr().err
    assert "Traceback" not in err and "every server refused" in err and "does not exist" in err
    assert not (tmp_path / "o" / "manifest.json").exists()
