"""Errors that mean stop: a refused key or model, no server at all, a base URL that would send
the key somewhere unintended. Each ends the run at once with exit 1 (or 2 for settings),
publishes nothing and keeps what was stored; an outage that passes does not stop the run."""
import re
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, write_jsonl
from fake_openai import FakeOpenAI

from gen.run import EXIT_FAILED, EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, main


def run(captions: Path, out: Path, *urls: str, args=("--retry-wait", "0.01"), model="fake-model") -> int:
    flags = [a for url in urls for a in ("--base-url", url)]
    return main(["--captions", str(captions), "--out", str(out), *flags, "--model", model,
                 "--no-progress", "--timeout", "5", "--concurrency", "4", *args])


def many(sample_captions, n: int) -> list[dict]:
    """n distinct captions, real ones first, then real ones under a numbered prefix."""
    rows = [dict(c) for c in sample_captions]
    for i in range(n - len(rows)):
        c = sample_captions[i % len(sample_captions)]
        rows.append({"id": f"syn.{i}", "text": f"第{i}张照片：{c['text']}"})
    return rows[:n]


def closed_port() -> int:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def errors(text: str) -> list[str]:
    """The error lines, less the `finished` event every run ends on (its level follows the exit)."""
    return [line for line in text.splitlines()
            if line.startswith("ERROR") and not re.match(r"ERROR gen\.\w+ finished: ", line)]


def snapshot(out: Path) -> dict[str, bytes]:
    """Every output file but the store, and where shards/latest points."""
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and not p.name.startswith("cache.sqlite") and p.name != ".lock"}
    files["latest ->"] = os.readlink(out / "shards" / "latest").encode()
    return files


# --------------------------------------------------------------------------- refusals

def test_a_key_revoked_mid_run_stops_at_once_publishes_nothing_and_the_rerun_resumes(
        tmp_path, sample_captions, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdef")
    out, rows = tmp_path / "out", many(sample_captions, 200)
    first = write_jsonl(tmp_path / "first.jsonl", rows[:20])
    everything = write_jsonl(tmp_path / "all.jsonl", rows)
    with FakeOpenAI() as fake:
        assert run(first, out, fake.base_url) == EXIT_OK
    before = snapshot(out)
    capsys.readouterr()

    with FakeOpenAI(faults=lambda i, caption: "401" if i >= 50 else None) as fake:
        started = time.monotonic()
        assert run(everything, out, fake.base_url) == EXIT_FAILED
        took = time.monotonic() - started
        # 50 answered, then the requests in flight (concurrency 4) at most: not the other 130
        assert 51 <= len(fake.requests) <= 54
    err = capsys.readouterr().err
    assert [e for e in errors(err)] == [next(e for e in errors(err) if "401" in e)]
    assert fake.base_url in err and "$OPENAI_API_KEY" in err and "sk-test-0123456789abcdef" not in err
    assert took < 15
    assert snapshot(out) == before   # no shard version, shards/latest, outputs: all as they were

    with FakeOpenAI() as fake:
        assert run(everything, out, fake.base_url) == EXIT_OK
        # the 50 answered before the revocation were kept (but for a reply the stop overtook)
        assert 200 - 20 - 50 <= len(fake.requests) <= 200 - 20 - 50 + 3
    assert os.readlink(out / "shards" / "latest") != before["latest ->"].decode()


@pytest.mark.parametrize("refusal", ["model", "403", "insufficient_quota"])
def test_a_refusal_on_every_request_stops_the_run_after_the_first_ones(
        refusal, tmp_path, sample_captions, capsys):
    captions = write_jsonl(tmp_path / "caps.jsonl", many(sample_captions, 100))
    fake_args = {"check_model": True} if refusal == "model" else {"faults": {refusal: 1.0}}
    with FakeOpenAI(**fake_args) as fake:
        code = run(captions, tmp_path / "out", fake.base_url,
                   model="fake-modle" if refusal == "model" else "fake-model")
        assert code == EXIT_FAILED
        assert len(fake.requests) <= 4   # those in flight when the first refusal came
    err = capsys.readouterr().err
    hint = {"model": "does not exist", "403": "not allowed", "insufficient_quota": "quota"}[refusal]
    assert len(errors(err)) == 1 and hint in errors(err)[0] and fake.base_url in errors(err)[0]
    assert not (tmp_path / "out" / "shards").exists() and not (tmp_path / "out" / "manifest.json").exists()


def test_a_server_refusing_the_key_is_taken_out_and_the_others_finish_the_run(
        tmp_path, sample_captions, capsys):
    captions = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:30])
    with FakeOpenAI() as good, FakeOpenAI(faults={"401": 1.0}) as bad:
        assert run(captions, tmp_path / "out", bad.base_url, good.base_url,
                   args=("--retry-wait", "0.01", "--no-curate")) == EXIT_OK
        assert len(good.requests) == 30 and len(bad.requests) <= 4
    err = capsys.readouterr().err
    assert errors(err) == [next(e for e in errors(err) if bad.base_url in e and "401" in e)]
    assert "1 of 2 servers left" in err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["failed"] == 0 and manifest["counts"]["captions_with_queries"] == 30
    servers = {s["url"]: s for s in manifest["engine"]["servers"]}
    assert "HTTP 401" in servers[bad.base_url]["refused"] and "refused" not in servers[good.base_url]


def test_when_every_server_has_refused_the_run_stops_naming_each(tmp_path, sample_captions, capsys):
    captions = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:30])
    with FakeOpenAI(faults={"401": 1.0}) as a, FakeOpenAI(check_model=True) as b:
        assert run(captions, tmp_path / "out", a.base_url, b.base_url, model="typo") == EXIT_FAILED
        # the captions in flight (concurrency 4), each refused once by each server at most
        assert len(a.requests) + len(b.requests) <= 4 * 2
    last = errors(capsys.readouterr().err)[-1]
    assert "every server refused" in last and a.base_url in last and b.base_url in last
    assert "HTTP 401" in last and "HTTP 404" in last


@pytest.mark.parametrize("status, body, refusal, transient", [
    (401, '{"error": {"message": "Incorrect API key"}}', True, False),
    (402, '{"error": {"message": "Insufficient credits"}}', True, False),
    (403, '{"error": {"message": "not allowed"}}', True, False),
    (404, '{"error": {"message": "The model `x` does not exist."}}', True, False),
    (429, '{"error": {"message": "quota", "type": "insufficient_quota", "code": "insufficient_quota"}}', True, False),
    (429, '{"error": {"message": "rate limited", "type": "rate_limit_error"}}', False, True),
    (429, "<html>too many</html>", False, True),
    (400, '{"error": {"message": "messages: too long"}}', False, False),   # this request's own fault
    # content filters: this caption's text refused, not the key (DashScope, Azure, DeepSeek)
    (403, '{"error": {"message": "Input data may contain inappropriate content.", "code": "DataInspectionFailed"}}', False, False),
    (403, '{"error": {"message": "filtered", "code": "content_filter"}}', False, False),
    (400, '{"error": "Content Exists Risk"}', False, False),
    (403, '{"error": {"message": "content_filter", "code": ["odd"]}}', False, False),
    (403, '[1, 2]', True, False),
    (503, "", False, True),
])
def test_which_replies_no_retry_can_change(status, body, refusal, transient):
    from gen.engines.retry import StatusError, is_refusal, is_transient
    exc = StatusError(status, {}, body)
    assert (is_refusal(exc), is_transient(exc)) == (refusal, transient)


def test_a_content_filters_403_fails_that_caption_and_the_run_goes_on(tmp_path, sample_captions, capsys):
    rows = many(sample_captions, 10)
    flagged = rows[4]["text"]
    captions = write_jsonl(tmp_path / "caps.jsonl", rows)
    with FakeOpenAI(faults=lambda i, caption: "403_content" if caption == flagged else None) as fake:
        code = run(captions, tmp_path / "out", fake.base_url, args=("--retry-wait", "0.01", "--no-curate"))
        refused = fake.faults_drawn.count("403_content")
    assert code == EXIT_INCOMPLETE and refused == 1   # asked once: no retry changes it
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["captions_with_queries"] == 9 and manifest["counts"]["failed"] == 1
    assert errors(capsys.readouterr().err) == []   # no "refused the run" line: the server stays in


# --------------------------------------------------------------------------- no server

def test_no_server_answering_stops_the_run_within_seconds(tmp_path, sample_captions, capsys):
    captions = write_jsonl(tmp_path / "caps.jsonl", many(sample_captions, 50))
    urls = [f"http://127.0.0.1:{closed_port()}/v1" for _ in range(2)]
    started = time.monotonic()
    # the default backoff (1 s, doubling): before any server has answered, the first two (3 s)
    code = run(captions, tmp_path / "out", *urls, args=("--no-curate",))
    took = time.monotonic() - started
    assert code == EXIT_FAILED and took < 10
    (line,) = errors(capsys.readouterr().err)
    assert "no server answers" in line and all(u in line for u in urls) and "connection failed" in line
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_server_that_accepts_and_never_replies_stops_the_run_like_one_that_is_gone(tmp_path, sample_captions, capsys):
    captions = write_jsonl(tmp_path / "caps.jsonl", many(sample_captions, 40))
    with FakeOpenAI(faults=lambda i, caption: "timeout") as fake:   # accepted, not a byte sent back
        started = time.monotonic()
        code = run(captions, tmp_path / "out", fake.base_url,
                   args=("--retry-wait", "0.05", "--timeout", "0.5", "--no-curate"))
        took = time.monotonic() - started
    # Without the circuit: 40 captions x 5 attempts x 0.5 s / 4 at once, then exit 3.
    assert code == EXIT_FAILED and took < 10
    (line,) = errors(capsys.readouterr().err)
    assert "no server answers" in line and fake.base_url in line and "timed out" in line
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_caption_that_always_times_out_still_ends_while_others_are_answered(tmp_path, sample_captions):
    rows = many(sample_captions, 12)
    slow = rows[3]["text"]
    captions = write_jsonl(tmp_path / "caps.jsonl", rows)
    with FakeOpenAI(faults=lambda i, caption: "timeout" if caption == slow else None) as fake:
        code = run(captions, tmp_path / "out", fake.base_url,
                   args=("--retry-wait", "0.05", "--timeout", "0.5", "--no-curate"))
    assert code == EXIT_INCOMPLETE   # the slow one unanswered after its attempts, the rest done
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["captions_with_queries"] == 11


def test_a_server_gone_for_good_mid_run_stops_it_and_the_rerun_resumes(tmp_path, sample_captions, capsys):
    captions = write_jsonl(tmp_path / "caps.jsonl", many(sample_captions, 100))

    def die_at_30(i, caption):
        if i == 30:
            fake.outage(float("inf"))
            return "drop"
        return None

    with FakeOpenAI(faults=die_at_30) as fake:
        started = time.monotonic()
        # --retry-wait 0.05: the backoffs of a request add up to 1.55 s, the outage allowed
        code = run(captions, tmp_path / "out", fake.base_url, args=("--retry-wait", "0.05"))
        took = time.monotonic() - started
        assert code == EXIT_FAILED and took < 10
        answered = sum(t["status"] == 200 for t in fake.timings)   # until the server went
    (line,) = errors(capsys.readouterr().err)
    assert "no server answers" in line and fake.base_url in line
    assert not (tmp_path / "out" / "shards").exists()
    with FakeOpenAI() as fake:
        assert run(captions, tmp_path / "out", fake.base_url) == EXIT_OK
        # only those never answered (but for a reply the stop overtook)
        assert 100 - answered <= len(fake.requests) <= 100 - answered + 3


def test_a_server_back_within_seconds_does_not_stop_the_run(tmp_path, sample_captions, capsys):
    captions = write_jsonl(tmp_path / "caps.jsonl", many(sample_captions, 60))

    def restart_at_20(i, caption):
        if i == 20:
            fake.outage(1.5)
            return "drop"
        return None

    with FakeOpenAI(faults=restart_at_20) as fake:
        # backoffs of 0.2 s doubling: a request's retries span up to 6.2 s, the outage 1.5 s
        code = run(captions, tmp_path / "out", fake.base_url, args=("--retry-wait", "0.2", "--no-curate"))
    assert code == EXIT_OK and errors(capsys.readouterr().err) == []
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["failed"] == 0 and manifest["counts"]["captions_with_queries"] == 60


def test_a_server_still_starting_when_the_run_begins_does_not_stop_it(tmp_path, sample_captions, capsys):
    captions = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:20])
    with FakeOpenAI() as fake:
        back = fake.outage(1.0)
        time.sleep(0.2)   # down now
        code = run(captions, tmp_path / "out", fake.base_url, args=("--no-curate",))  # default backoff
        back.join()
    assert code == EXIT_OK and errors(capsys.readouterr().err) == []
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["failed"] == 0


# --------------------------------------------------------------------------- where the key goes

BAD_URLS = {"": "is empty", "localhost:8000/v1": "http:// or https://", "ftp://h/v1": "http:// or https://",
            "http:///v1": "no host", "http://h:port/v1": "not a URL"}


@pytest.mark.parametrize("url", list(BAD_URLS))
@pytest.mark.parametrize("source", ["flag", "job file", "CAPGEN_BASE_URLS", "OPENAI_BASE_URL"])
def test_an_empty_or_malformed_base_url_is_a_usage_error_naming_the_setting(
        source, url, tmp_path, sample_captions, capsys, monkeypatch):
    captions = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:3])
    with FakeOpenAI() as fallback:
        # Where the key went before: an empty base URL meant $OPENAI_BASE_URL, else api.openai.com.
        monkeypatch.setenv("OPENAI_BASE_URL", fallback.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdef")
        argv = ["--captions", str(captions), "--out", str(tmp_path / "out"), "--model", "fake-model",
                "--no-progress"]
        if source == "flag":
            argv += ["--base-url", url]
        elif source == "job file":
            job = tmp_path / "job.toml"
            job.write_text(f"base_urls = [{json.dumps(url)}]\n", encoding="utf-8")
            argv += ["--config", str(job)]
        elif source == "CAPGEN_BASE_URLS":
            monkeypatch.setenv("CAPGEN_BASE_URLS", url)
        else:
            monkeypatch.setenv("OPENAI_BASE_URL", url)
            argv += ["--engine", "openai"]
        assert main(argv) == EXIT_USAGE
        assert fallback.requests == []
    (line,) = errors(capsys.readouterr().err)
    name = {"flag": "--base-url", "job file": f"base_urls in {tmp_path / 'job.toml'}"}.get(source, source)
    assert name in line
    assert BAD_URLS[url] in line or (source == "CAPGEN_BASE_URLS" and url == "" and "names no server" in line)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["flag", "OPENAI_BASE_URL"])
def test_a_password_in_a_base_url_is_refused_and_never_shown(source, tmp_path, sample_captions, capsys,
                                                            monkeypatch):
    captions = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:3])
    with FakeOpenAI() as fake:
        url = fake.base_url.replace("http://", "http://capgen:hunter2-secret@")
        argv = ["--captions", str(captions), "--out", str(tmp_path / "out"), "--model", "fake-model",
                "--no-progress"]
        if source == "flag":
            argv += ["--base-url", url]
        else:
            monkeypatch.setenv("OPENAI_BASE_URL", url)
            argv += ["--engine", "openai"]
        assert main(argv) == EXIT_USAGE
        assert fake.requests == []
    err = capsys.readouterr().err
    (line,) = errors(err)
    assert "hunter2" not in err and "capgen:" not in err and "Traceback" not in err
    assert "***@127.0.0.1" in line and "user name or password" in line and "--api-key-env" in line


def test_no_base_url_at_all_still_means_the_default_server(monkeypatch):
    from gen.cli import load_config
    monkeypatch.delenv("CAPGEN_BASE_URLS", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    config = load_config(["--captions", "c.jsonl", "--engine", "openai", "--model", "gpt-4o-mini"])
    assert config.base_urls == []   # the engine then asks $OPENAI_BASE_URL or api.openai.com


def test_a_stop_signal_that_native_code_turns_into_its_own_error_still_exits_143(tmp_path, sample_captions, capsys):
    """polars runs some Python callbacks from Rust; a stop signal's Terminated raised in one
    comes back as a pyo3 PanicException (seen: SIGINT during gen.curate's read_parquet)."""
    import signal

    import polars as pl

    from gen.atomic import Terminated
    from gen.run import EXIT_STOPPED, entry

    def work(config):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Terminated as e:   # what the Rust side does with it
            raise pl.exceptions.PanicException(f"called `Result::unwrap()` on an `Err` value: {e!r}") from None
        raise AssertionError("no signal came")

    captions = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:1])
    code = entry(["--captions", str(captions), "--out", str(tmp_path / "out"), "--base-url", "http://127.0.0.1:9/v1",
                  "--model", "fake-model", "--log-format", "json"], work)
    assert code == EXIT_STOPPED
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]   # no traceback
    assert [e["event"] for e in events][-2:] == ["stopped", "finished"]
    assert events[-1]["exit_status"] == EXIT_STOPPED


def test_after_a_stop_a_half_built_objects_finalizer_prints_nothing():
    """A stop signal can land inside a library's constructor (seen: aiohttp's Connection, whose
    __del__ then fails at exit); what that object's finalizer says must not follow the stop
    line, least of all in a JSON log."""
    script = r'''
import asyncio, gc, os, signal, time
from gen.atomic import Terminated, stop_signals

class HalfBuilt:
    def __init__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        self.protocol = None
    def __del__(self):
        self.protocol   # AttributeError: __init__ never got this far

async def never():
    pass

with stop_signals():
    try:
        HalfBuilt()
    except Terminated:
        pass
    never()            # a coroutine the stop left unawaited
    gc.collect()
print("clean")
'''
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "clean\n"
    assert proc.stderr == "", proc.stderr
