"""Settings from a TOML file, the environment and flags, in that order; and --dry-run."""
import json

import pytest
from conftest import write_jsonl
from fake_openai import FakeOpenAI

from gen.cli import ConfigError, load_config
from gen.run import EXIT_OK, EXIT_USAGE, main


def test_file_then_environment_then_flags(tmp_path):
    job = tmp_path / "jobs" / "nightly.toml"
    job.parent.mkdir()
    job.write_text('captions = "data/caps.jsonl"\nmodel = "from-file"\nconcurrency = 8\n'
                   'base_urls = ["http://127.0.0.1:1/v1"]\n[sampling]\ntemperature = 0.5\nseed = 3\n')
    c = load_config(["--config", str(job)], env={})
    assert c.captions == tmp_path / "jobs" / "data" / "caps.jsonl"  # relative to the file
    assert (c.model, c.concurrency, c.engine) == ("from-file", 8, "openai")
    assert (c.sampling.temperature, c.sampling.seed, c.sampling.top_p) == (0.5, 3, 0.9)
    env = {"CAPGEN_MODEL": "from-env", "CAPGEN_TEMPERATURE": "0.1",
           "CAPGEN_BASE_URLS": "http://a/v1, http://b/v1"}
    c = load_config(["--config", str(job)], env=env)
    assert (c.model, c.sampling.temperature, c.base_urls) == ("from-env", 0.1, ["http://a/v1", "http://b/v1"])
    c = load_config(["--config", str(job), "--model", "from-flag", "--seed", "9"], env=env)
    assert (c.model, c.sampling.seed, c.sampling.temperature) == ("from-flag", 9, 0.1)


def test_defaults_without_file():
    c = load_config(["--captions", "x.jsonl"], env={})
    assert c.engine == "vllm" and c.model.startswith("local:") and c.progress
    assert load_config(["--captions", "x.jsonl", "--log-format", "json"], env={}).progress is False


@pytest.mark.parametrize("text,match", [
    ('captions = "x"\nconcurency = 4\n', "concurency"),  # a typo is named, not ignored
    ('captions = "x"\nconcurrency = "many"\n', "concurrency"),
    ('captions = \n', "nightly.toml"),
])
def test_bad_config_is_a_clear_usage_error(tmp_path, text, match):
    job = tmp_path / "nightly.toml"
    job.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(["--config", str(job)], env={})
    assert main(["--config", str(job)]) == EXIT_USAGE


def test_vllm_args_from_file_and_flags(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('captions = "c.jsonl"\n[vllm_args]\ntensor_parallel_size = 2\nquantization = "awq"\n')
    c = load_config(["--config", str(job), "--vllm-arg", "gpu_memory_utilization=0.8",
                     "--vllm-arg", "quantization=fp8"], env={})
    assert c.vllm_args == {"tensor_parallel_size": 2, "quantization": "fp8", "gpu_memory_utilization": 0.8}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(["--captions", "c.jsonl", "--vllm-arg", "no-equals-sign"], env={})


def test_no_captions_anywhere():
    with pytest.raises(ConfigError, match="no captions"):
        load_config([], env={})


def test_dry_run_counts_exactly_and_calls_nothing(tmp_path, sample_captions, capsys):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:10] + [{"id": "bad"}])
    out = tmp_path / "out"
    args = ["--captions", str(path), "--out", str(out), "--model", "fake-model", "--no-progress"]
    with FakeOpenAI() as fake:
        assert main([*args, "--base-url", fake.base_url, "--dry-run"]) == EXIT_OK
        first = json.loads(capsys.readouterr().out)
        assert fake.requests == [] and not out.exists()  # nothing called, nothing written
        assert (first["captions"], first["input_rejects"], first["to_request"]) == (10, 1, 10)
        assert first["completion_estimate_from"] == "max_tokens" and first["prompt_tokens_estimate"] > 0
        assert first["completion_tokens_estimate"] == 10 * 1024  # the upper bound
        write_jsonl(path, sample_captions[:6])
        assert main([*args, "--base-url", fake.base_url]) == EXIT_OK
        capsys.readouterr()
        write_jsonl(path, sample_captions[:10])
        assert main([*args, "--base-url", fake.base_url, "--dry-run"]) == EXIT_OK
        second = json.loads(capsys.readouterr().out)
        assert (second["cached"], second["to_request"]) == (6, 4)
        assert second["completion_estimate_from"] == "history"  # now from the store's history
        assert 0 < second["completion_tokens_estimate"] < 4 * 1024
        assert len(fake.requests) == 6


def test_seed_none_sends_no_seed(tmp_path):
    """vLLM's CPU server crashes on a seeded request prefilled in chunks: a way to send none."""
    from gen.engines.openai import OpenAIEngine
    from schemas import answer_json_schema
    assert load_config(["--captions", "x.jsonl", "--seed", "none"], env={}).sampling.seed is None
    job = tmp_path / "job.toml"
    job.write_text('captions = "x.jsonl"\n[sampling]\nseed = "none"\n')
    c = load_config(["--config", str(job)], env={})
    assert c.sampling.seed is None
    body = OpenAIEngine(base_urls=["http://127.0.0.1:9/v1"], model="m", schema=answer_json_schema(),
                        sampling=c.sampling)._options()
    assert "seed" not in body
    assert load_config(["--captions", "x.jsonl", "--seed", "7"], env={}).sampling.seed == 7
    with pytest.raises(ConfigError, match="seven"):
        load_config(["--captions", "x.jsonl", "--seed", "seven"], env={})


def test_dry_run_plan_across_chunks_ignores_other_runs_keys(tmp_path):
    """The plan asks the store a chunk at a time: repeats across chunks, answers stored by
    this fingerprint and keys of other runs sharing the store must all count right."""
    import sqlite3

    from gen.config import answer_key
    from gen.plan import plan
    from gen.generate.prompts import PromptSet
    from gen.store import _SCHEMA
    from schemas import Caption, Reject
    config = load_config(["--captions", "x.jsonl", "--out", str(tmp_path / "out")], env={})
    texts = [f"第{i}张图片里有一只猫" for i in range(700)]
    records = [Caption(id=f"c{i}", text=t) for i, t in enumerate(texts + texts[:300])]  # 300 repeats after 512
    records.insert(5, Reject(stage="input", reason="text: empty", file="x.jsonl", line=6, raw="{}"))
    config.cache_path.parent.mkdir(parents=True)
    db = sqlite3.connect(config.cache_path)
    db.execute(_SCHEMA)
    stored = [answer_key("fp", t) for t in texts[:100]] + [answer_key("other-fp", t) for t in texts]
    db.executemany("INSERT INTO answers VALUES (?, 'ok', '{}', '', NULL, 1, 10, 5, 0)", [(k,) for k in stored])
    db.commit()
    db.close()
    result = plan(records, config, PromptSet(None), "fp")
    assert (result["captions"], result["input_rejects"]) == (1000, 1)
    assert (result["cached"], result["to_request"]) == (400, 600)  # 100 stored + 300 repeats
