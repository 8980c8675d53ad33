"""--executor ray on a local Ray instance (CPU) against the fake server: same outputs, same resume."""
import json

import pytest
from conftest import read_rows, write_jsonl
from fake_openai import FakeOpenAI, _caption_of

from gen.run import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


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


def test_ray_without_a_server_is_a_usage_error(tmp_path, sample_captions):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:2])
    assert main(["--captions", str(path), "--out", str(tmp_path / "o"), "--executor", "ray",
                 "--model", "/nonexistent-model", "--no-progress"]) == EXIT_USAGE


def test_a_refused_model_stops_a_ray_run_with_exit_1_and_no_traceback(ray_local, tmp_path, sample_captions, capsys):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:30])
    with FakeOpenAI(check_model=True) as fake:
        code = main(["--captions", str(path), "--out", str(tmp_path / "o"), "--executor", "ray",
                     "--ray-actors", "2", "--concurrency", "4", "--base-url", fake.base_url,
                     "--model", "fake-modle", "--no-progress", "--retry-wait", "0.01"])
        assert code == EXIT_FAILED
        assert len(fake.requests) <= 2 * 4 * 2   # per actor: the batch in flight, and one more at most
    err = capsys.readouterr().err
    assert "Traceback" not in err and "every server refused" in err and "does not exist" in err
    assert not (tmp_path / "o" / "manifest.json").exists()
