"""Settings are validated once, wherever they come from; templates and captions streams fail
clearly, before any request."""
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT, read_jsonl, read_rows, write_jsonl
from fake_openai import FakeOpenAI
from pydantic import BaseModel, ValidationError

from gen.cli import ConfigError, load_config
from gen.config import RunConfig, Sampling
from gen.curate import CurateConfig
from gen.curate.__main__ import main as curate_main
from gen.judge import JudgePrompts
from gen.judge import main as judge_main
from gen.generate.prompts import PromptError, PromptSet
from gen.run import EXIT_OK, EXIT_USAGE, UsageError, check_input, main
from gen.settings import base_type
from prompts import TEMPLATE_DIR

PY = sys.executable

# --- settings -------------------------------------------------------------------------


@pytest.mark.parametrize("argv,expected", [
    (["--timeout", "inf"], "--timeout: expected a finite number greater than 0, got inf"),
    (["--timeout", "nan"], "--timeout: expected a finite number greater than 0, got nan"),
    (["--temperature", "-3"], "--temperature: expected a finite number from 0 to 2, got -3.0"),
    (["--temperature", "nan"], "--temperature: expected a finite number from 0 to 2, got nan"),
    (["--top-p", "7"], "--top-p: expected a finite number greater than 0 and at most 1, got 7.0"),
    (["--top-p", "0"], "--top-p: expected a finite number greater than 0 and at most 1, got 0.0"),
    (["--max-tokens", "-1"], "--max-tokens: expected an integer at least 1, got -1"),
    (["--concurrency", "0"], "--concurrency: expected an integer at least 1, got 0"),
    (["--repair-rounds", "6"], "--repair-rounds: expected an integer from 0 to 5, got 6"),
    (["--retry-wait=-inf"], "--retry-wait: expected a finite number at least 0, got -inf"),
    (["--max-model-len", "0"], "--max-model-len: expected an integer at least 1, got 0"),
    (["--seed", str(2**64)], "--seed: expected an integer from -9223372036854775808 to 9223372036854775807"),
    # 2 ** 1100 is no float: the backoffs' sum would overflow as the engine is built
    (["--max-attempts", "1100"], "--max-attempts: expected an integer from 1 to 100, got 1100"),
    # 0.5 requests a one-second window: the pacer would admit none, silently, for ever
    (["--rpm", "30", "--rate-window", "1"], "rpm (30) over a rate_window of 1 s allows 0.5 requests a window"),
])
def test_a_bad_flag_is_named_with_its_range_and_exits_2(argv, expected, tmp_path, capsys):
    caps = write_jsonl(tmp_path / "caps.jsonl", [{"id": "a", "text": "一只猫"}])
    with pytest.raises(ConfigError) as e:
        load_config(["--captions", str(caps), *argv], env={})
    assert expected in str(e.value)
    with FakeOpenAI() as fake:   # the whole command: exit 2, a message, no traceback, no request
        argv = ["--captions", str(caps), "--out", str(tmp_path / "out"), "--no-progress", *argv]
        assert main([*argv, "--base-url", fake.base_url, "--model", "m"]) == EXIT_USAGE
        assert fake.requests == []
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("toml,env,expected", [
    ("concurrency = true\n", {}, "concurrency in {job}: expected an integer at least 1, got true"),
    ("timeout = inf\n", {}, "timeout in {job}: expected a finite number greater than 0, got inf"),
    ("[sampling]\ntemperature = nan\n", {}, "sampling.temperature in {job}: expected a finite number from 0 to 2, got nan"),
    ("[sampling]\nmax_tokens = false\n", {}, "sampling.max_tokens in {job}: expected an integer at least 1, got false"),
    ("[sampling]\nseed = true\n", {}, "sampling.seed in {job}: expected an integer"),
    ("[curation]\nworkers = true\n", {}, "curation.workers in {job}: expected an integer at least 1, got true"),
    ("[curation]\nsummary_share = 1.5\n", {}, "curation.summary_share in {job}: expected a finite number from 0 to 1, or none, got 1.5"),
    ('[curation]\ngrounding_types = ["entiy"]\n', {}, "curation.grounding_types in {job}: expected a list, each one of entity, hypernym"),
    ("[curation]\nmin_chars = 9\nmax_chars = 3\n", {}, "curation in {job}: min_chars (9) must not exceed max_chars (3)"),
    ("concurency = 4\n", {}, "concurency in {job}: no such setting (did you mean concurrency?)"),
    ("", {"CAPGEN_TIMEOUT": "inf"}, "CAPGEN_TIMEOUT: expected a finite number greater than 0, got 'inf'"),
    ("", {"CAPGEN_CONCURRENCY": "true"}, "CAPGEN_CONCURRENCY: expected an integer at least 1, got 'true'"),
    ("", {"CAPGEN_TOP_P": "0"}, "CAPGEN_TOP_P: expected a finite number greater than 0 and at most 1, got '0'"),
    # the winning source is named: the environment's bad value over the file's good one
    ("timeout = 5\n", {"CAPGEN_TIMEOUT": "-1"}, "CAPGEN_TIMEOUT: expected a finite number greater than 0, got '-1'"),
])
def test_a_bad_job_file_key_or_variable_is_named_where_it_came_from(toml, env, expected, tmp_path):
    job = tmp_path / "nightly.toml"
    job.write_text('captions = "caps.jsonl"\n' + toml)
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(job)], env=env)
    assert expected.format(job=job) in str(e.value)


def test_good_values_still_parse_from_every_source(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('captions = "c.jsonl"\nconcurrency = 8\ntimeout = 1\n[sampling]\ntemperature = 0\n'
                   'top_p = 1\nseed = "none"\n[curation]\nroundtrip_k = "none"\nsummary_share = 0.3\n')
    c = load_config(["--config", str(job)], env={})
    assert (c.concurrency, c.timeout, c.sampling.temperature, c.sampling.top_p, c.sampling.seed) == (8, 1.0, 0.0, 1.0, None)
    assert (c.curation.roundtrip_k, c.curation.summary_share) == (None, 0.3)
    c = load_config(["--config", str(job), "--timeout", "2.5"],
                    env={"CAPGEN_CONCURRENCY": "16", "CAPGEN_TEMPERATURE": "2", "CAPGEN_STRICT": "true"})
    assert (c.concurrency, c.timeout, c.sampling.temperature, c.strict) == (16, 2.5, 2.0, True)
    # a bad value overridden by a good one is no error: only what wins is validated
    job.write_text('captions = "c.jsonl"\ntimeout = inf\n')
    assert load_config(["--config", str(job), "--timeout", "3"], env={}).timeout == 3.0


def test_an_answer_must_fit_the_vllm_context():
    with pytest.raises(ConfigError, match=r"settings: max_tokens \(4096\) must be less than max_model_len \(4096\)"):
        load_config(["--captions", "c.jsonl", "--max-tokens", "4096"], env={})
    assert load_config(["--captions", "c.jsonl", "--max-tokens", "4096", "--max-model-len", "8192"], env={})
    # a server's context is its own business
    assert load_config(["--captions", "c.jsonl", "--max-tokens", "4096", "--base-url", "http://h/v1"], env={})


def _numeric_fields(model: type[BaseModel]):
    for name, field in model.model_fields.items():
        base, _ = base_type(field.annotation)
        if base in (int, float):
            yield name, base
        elif isinstance(base, type) and issubclass(base, BaseModel):
            for sub, kind in _numeric_fields(base):
                yield f"{name}.{sub}", kind


def _nested(dotted: str, value) -> dict:
    head, _, rest = dotted.partition(".")
    return {head: _nested(rest, value) if rest else value}


NUMERIC = sorted(set(_numeric_fields(RunConfig)))


def test_every_number_setting_is_covered():
    names = {n for n, _ in NUMERIC}
    assert {"concurrency", "timeout", "sampling.temperature", "sampling.seed", "curation.workers",
            "curation.summary_share", "curation.roundtrip_k", "max_model_len"} <= names
    assert len(names) >= 30


@pytest.mark.parametrize("dotted,kind", NUMERIC, ids=[n for n, _ in NUMERIC])
def test_no_number_setting_takes_a_bool_or_a_non_finite_value(dotted, kind):
    bad = [True, False] + ([math.inf, -math.inf, math.nan, "inf", "nan"] if kind is float else [])
    for value in bad:
        with pytest.raises(ValidationError):
            RunConfig.model_validate({"captions": "x", **_nested(dotted, value)})


def test_every_number_setting_has_a_range():
    """A count or a rate with no bound at all is how -1 and 1e12 got through."""
    for model in (RunConfig, Sampling, CurateConfig):
        for name, field in model.model_fields.items():
            if base_type(field.annotation)[0] in (int, float):
                assert any(type(m).__name__ in ("Ge", "Gt") for m in field.metadata), f"{model.__name__}.{name}"


def test_curate_command_names_its_flags_and_ranges(tmp_path, capsys):
    assert curate_main(["--queries", str(tmp_path), "--workers", "true", "--near-dup-threshold", "nan",
                        "--roundtrip-exempt", "hypernim"]) == 2
    err = capsys.readouterr().err
    assert "--workers: expected an integer at least 1, got 'true'" in err
    assert "--near-dup-threshold: expected a finite number greater than 0 and at most 1, got 'nan'" in err
    assert "--roundtrip-exempt: expected a list, each one of entity, hypernym" in err
    assert "Traceback" not in err


def test_judge_command_validates_the_same_settings(tmp_path, capsys):
    assert judge_main(["--captions", "x.jsonl", "--out", str(tmp_path), "--timeout", "inf"]) == EXIT_USAGE
    assert "--timeout: expected a finite number greater than 0, got inf" in capsys.readouterr().err


# --- templates ------------------------------------------------------------------------

BROKEN = {
    "syntax": ("queries.user.j2", "描述：{{ caption.text }}\n{% if caption.text %}\n输出：\n",
               r"queries.user.j2:\d: template syntax error: Unexpected end of template"),
    "undefined": ("queries.user.j2", "描述：\n{{ caption.txt }}\n输出：\n",
                  r"queries.user.j2:2: 'dict object' has no attribute 'txt' \(this template is given caption.id, caption.text\)"),
    "undefined name": ("repair.j2", "错误：\n\n{{ eror }}\n", r"repair.j2:3: 'eror' is undefined \(this template is given error\)"),
    "sandbox": ("queries.system.j2", "说明\n{{ ''.__class__.__mro__ }}\n",
                r"queries.system.j2:2: not allowed in the template sandbox: access to attribute '__class__'"),
    "include": ("queries.system.j2", "说明\n{% include 'parts.j2' %}\n", r"parts.j2:1: 'undefined_name' is undefined"),
    "missing": ("repair.j2", None, r"no template repair.j2 \(a prompts directory needs queries.system.j2"),
    "not utf-8": ("queries.user.j2", "描述：{{ caption.text }}".encode("gbk"), r"queries.user.j2: cannot read the template"),
}


@pytest.mark.parametrize("kind", BROKEN)
def test_a_broken_template_is_named_by_file_and_line_before_any_request(kind, tmp_path, capsys):
    prompts = tmp_path / "prompts"
    shutil.copytree(TEMPLATE_DIR, prompts, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (prompts / "parts.j2").write_text("{{ undefined_name }}\n")
    name, text, expected = BROKEN[kind]
    if text is None:
        (prompts / name).unlink()
    elif isinstance(text, bytes):
        (prompts / name).write_bytes(text)
    else:
        (prompts / name).write_text(text, encoding="utf-8")
    with pytest.raises(PromptError, match=expected):
        PromptSet(prompts)
    caps = write_jsonl(tmp_path / "caps.jsonl", [{"id": "a", "text": "一只猫"}])
    with FakeOpenAI() as fake:
        for extra in ([], ["--dry-run"]):
            assert main(["--captions", str(caps), "--out", str(tmp_path / "out"), "--prompts", str(prompts),
                         "--base-url", fake.base_url, "--model", "m", "--no-progress", *extra]) == EXIT_USAGE
        assert fake.requests == []
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(prompts) in err
    assert not (tmp_path / "out").exists()


def test_a_prompts_directory_that_is_not_there(tmp_path):
    with pytest.raises(PromptError, match="prompts directory not found"):
        PromptSet(tmp_path / "nope")


def test_judge_templates_are_probed_too(tmp_path):
    for name in ("judge.system.j2", "judge.user.j2"):
        shutil.copy(TEMPLATE_DIR / name, tmp_path / name)
    JudgePrompts(tmp_path)
    (tmp_path / "judge.user.j2").write_text("描述：{{ caption }}\n{% for q in querys %}{{ q }}{% endfor %}\n")
    with pytest.raises(PromptError, match=r"judge.user.j2:2: 'querys' is undefined \(this template is given caption, queries\)"):
        JudgePrompts(tmp_path)


# --- captions from a stream -----------------------------------------------------------


def _feed(path, data: bytes) -> threading.Thread:
    def write():
        with open(path, "wb") as f:
            f.write(data)
    t = threading.Thread(target=write, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("packed", [False, True])
def test_captions_from_a_fifo_run_like_a_file(tmp_path, sample_captions, packed):
    rows = sample_captions[:6] + [{"id": "bad"}]
    plain = write_jsonl(tmp_path / "caps.jsonl", rows)
    data = plain.read_bytes()
    fifo = tmp_path / "caps.fifo"
    os.mkfifo(fifo)
    args = ["--model", "m", "--no-progress", "--no-curate"]
    with FakeOpenAI() as fake:
        assert main(["--captions", str(plain), "--out", str(tmp_path / "plain"), "--base-url", fake.base_url, *args]) == EXIT_OK
        writer = _feed(fifo, gzip.compress(data) if packed else data)
        assert main(["--captions", str(fifo), "--out", str(tmp_path / "out"), "--base-url", fake.base_url, *args]) == EXIT_OK
        writer.join(5)
    assert read_rows(tmp_path / "out" / "queries.parquet") == read_rows(tmp_path / "plain" / "queries.parquet")
    rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert [(r["file"], r["line"]) for r in rejects] == [(str(fifo), 7)]   # the name the user gave
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["captions_file"] == str(fifo) and manifest["counts"]["captions"] == 6
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".captions-")) == []


def test_a_stream_needs_out_and_a_directory_is_not_a_file(tmp_path, capsys):
    fifo = tmp_path / "caps.fifo"
    os.mkfifo(fifo)
    assert main(["--captions", str(fifo), "--model", "m", "--base-url", "http://127.0.0.1:9/v1"]) == EXIT_USAGE
    assert "need --out DIR" in capsys.readouterr().err
    with pytest.raises(UsageError, match="need --out DIR"):   # even when a file is redirected to it
        check_input(Path("/dev/stdin"), None)
    assert main(["--captions", str(tmp_path), "--model", "m", "--base-url", "http://127.0.0.1:9/v1"]) == EXIT_USAGE
    assert "is not a file" in capsys.readouterr().err
    assert main(["--captions", str(tmp_path / "nope.jsonl"), "--model", "m", "--base-url", "http://127.0.0.1:9/v1"]) == EXIT_USAGE
    assert "captions file not found" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["-", "/dev/stdin"])
def test_captions_from_standard_input(tmp_path, sample_captions, name):
    data = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:5] + [{"id": "bad"}]).read_bytes()
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with FakeOpenAI() as fake:
        cmd = [PY, "-m", "gen.run", "--captions", name, "--out", str(out), "--base-url", fake.base_url,
               "--model", "fake-model", "--no-progress", "--no-curate"]
        dry = subprocess.run([*cmd, "--dry-run"], input=data, capture_output=True, cwd=ROOT, env=env, timeout=120)
        assert dry.returncode == EXIT_OK, dry.stderr.decode()
        plan = json.loads(dry.stdout)
        assert (plan["captions"], plan["input_rejects"], plan["to_request"]) == (5, 1, 5)
        assert fake.requests == [] and not out.exists()
        done = subprocess.run(cmd, input=data, capture_output=True, cwd=ROOT, env=env, timeout=120)
        assert done.returncode == EXIT_OK, done.stderr.decode()
        assert len(fake.requests) == 5
    assert len({r["caption_id"] for r in read_rows(out / "queries.parquet")}) == 5
    file = "<stdin>" if name == "-" else name
    assert [(r["file"], r["line"]) for r in read_jsonl(out / "rejects.jsonl")] == [(file, 6)]
    assert not [p for p in out.iterdir() if p.name.startswith(".captions-")]
