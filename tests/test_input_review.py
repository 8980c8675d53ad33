"""Input that used to stop a run with a traceback or reach the shards: hostile caption lines,
job files of the wrong shape, a config read from a pipe, a missing evaluation file, a stop
signal during start-up, and a judge beside a run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, write_jsonl
from fake_openai import FakeOpenAI

from gen.run import EXIT_LOCKED, EXIT_OK, EXIT_STOPPED, EXIT_USAGE, main

PY = sys.executable


def run(captions: Path, out: Path, url: str, *args: str) -> int:
    return main(["--captions", str(captions), "--out", str(out), "--base-url", url, "--model", "fake-model",
                 "--no-progress", "--timeout", "5", "--retry-wait", "0.01", *args])


def rejects(out: Path) -> dict[int, str]:
    lines = (out / "rejects.jsonl").read_text(encoding="utf-8").split("\n")   # not splitlines: U+0085
    return {r["line"]: r["reason"] for r in map(json.loads, filter(None, lines))}


# --------------------------------------------------------------------------- caption lines

def test_a_lone_surrogate_anywhere_in_a_lines_extra_fields_is_a_reject_and_the_run_goes_on(
        tmp_path, sample_captions):
    good = sample_captions[:3]
    lines = [json.dumps(c, ensure_ascii=False) for c in good] + [
        '{"id":"x1","text":"图片中有一只黑猫坐在窗台上晒太阳","meta":"\\ud800"}',
        '{"id":"x2","text":"图片中有一只黑猫坐在窗台上晒太阳","\\ud800": 1}',
        '{"id":"x3","text":"图片中有一只黑猫坐在窗台上晒太阳","meta":{"tags":["ok","\\udfff"]}}',
        '{"id":"x4","text":"图片中有一只黑猫坐在窗台上晒太阳","meta":[{"\\udc80x": 2}]}',
    ]
    captions = tmp_path / "caps.jsonl"
    captions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert run(captions, out, fake.base_url) == EXIT_OK
        assert len(fake.requests) == len(good)   # nothing paid for a line that cannot be kept
    found = rejects(out)
    assert sorted(found) == [4, 5, 6, 7]
    assert all("field 'extra'" in r and "lone surrogate" in r for r in found.values())
    assert "'meta'" in found[4] and "key '\\ud800'" in found[5]
    assert "'meta'['tags'][1]" in found[6] and "key 'meta'[0]['\\udc80x']" in found[7]
    ids = [r["id"] for r in pq.read_table(out / "captions.parquet").to_pylist()]
    assert sorted(ids) == sorted(c["id"] for c in good)


@pytest.mark.parametrize("bad_id, char", [
    ("cr.0\u202eevil", "U+202E"),   # right-to-left override
    ("cr.1\x85x", "U+0085"),        # C1 control (NEL)
    ("cr.2\u200bx", "U+200B"),      # zero-width space
    ("cr.3\u2066x\u2069", "U+2066"),  # bidi isolate
    ("cr.4\ufeffx", "U+FEFF"),      # BOM inside
    ("cr.5\tx", "U+0009"),
])
def test_a_control_or_format_character_in_an_id_is_a_reject_naming_line_and_field(
        tmp_path, sample_captions, bad_id, char):
    rows = [dict(c) for c in sample_captions[:2]] + [{"id": bad_id, "text": "图片中有一只黑猫坐在窗台上晒太阳"}]
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert run(write_jsonl(tmp_path / "caps.jsonl", rows), out, fake.base_url) == EXIT_OK
    found = rejects(out)
    assert list(found) == [3]
    assert "field 'id'" in found[3] and char in found[3]
    latest = out / "shards" / "latest"
    written = [*latest.rglob("*.parquet"), out / "queries.parquet", out / "captions.parquet"]
    assert len(written) > 2
    for p in written:
        assert all(bad_id not in json.dumps(r, ensure_ascii=False) for r in pq.read_table(p).to_pylist()), p
    for p in latest.rglob("*.jsonl"):   # beir/corpus.jsonl, qrels
        assert bad_id not in p.read_text(encoding="utf-8"), p


# --------------------------------------------------------------------------- job files

def json_lines(text: str) -> list[dict]:
    """Every line of a --log-format json run, parsed (a traceback fails the test here)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def dry_run(tmp_path: Path, job: str, env: dict | None = None) -> tuple[int, list[dict]]:
    (tmp_path / "caps.jsonl").write_text('{"id": "a", "text": "图片中有一只猫"}\n', encoding="utf-8")
    (tmp_path / "job.toml").write_text(job, encoding="utf-8")
    proc = subprocess.run([PY, "-m", "gen.run", "--config", str(tmp_path / "job.toml"), "--log-format", "json",
                           "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    return proc.returncode, json_lines(proc.stdout + proc.stderr)


@pytest.mark.parametrize("job, env, named", [
    ('captions = "caps.jsonl"\ncuration = "x"\n', {}, "curation in"),
    ('captions = "caps.jsonl"\n[curation]\ndecontaminate_against = [5]\n', {}, "curation.decontaminate_against in"),
    ('captions = "ca\\u0000ps.jsonl"\n', {}, "captions in"),
    ('captions = "caps.jsonl"\nsampling = 3\n', {"CAPGEN_TEMPERATURE": "0.5"}, "sampling in"),
    ('captions = "caps.jsonl"\n[[sampling]]\ntemperature = 1\n', {"CAPGEN_TEMPERATURE": "0.5"}, "sampling in"),
    ('captions = "caps.jsonl"\n[[curation]]\nnegatives = 1\n', {}, "curation in"),
    ('captions = "caps.jsonl"\nvllm_args = 3\n', {}, "vllm_args in"),
    ('captions = "caps.jsonl"\n[base_urls]\nx = 1\n', {}, "base_urls in"),
    ('captions = "caps.jsonl"\n[curation]\ndecontaminate_against = ["e\\u0000val"]\n', {},
     "curation.decontaminate_against in"),
    ('captions = "caps.jsonl"\ntimeout = 1979-05-27T07:32:00\n', {}, "timeout in"),
    ('captions = 1979-05-27\n', {}, "captions in"),
    ('captions = "caps.jsonl"\n[sampling.extra.deeper]\nx = 1\n', {}, "sampling.extra in"),
])
def test_a_job_file_of_the_wrong_shape_is_a_usage_error_naming_the_key(tmp_path, job, env, named):
    code, events = dry_run(tmp_path, job, env)
    assert code == EXIT_USAGE
    errors = [e for e in events if e.get("event") == "error"]
    assert len(errors) == 1 and errors[0]["kind"] == "usage" and named in errors[0]["message"], errors
    assert events[-1]["event"] == "finished" and events[-1]["exit_status"] == EXIT_USAGE


def test_a_job_file_not_in_utf8_is_a_usage_error_naming_it(tmp_path):
    (tmp_path / "job.toml").write_bytes(b'captions = "caps\xff.jsonl"\n')
    proc = subprocess.run([PY, "-m", "gen.run", "--config", str(tmp_path / "job.toml"), "--log-format", "json",
                           "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    events = json_lines(proc.stdout + proc.stderr)
    assert proc.returncode == EXIT_USAGE and str(tmp_path / "job.toml") in events[0]["message"]
    assert events[-1]["event"] == "finished"


def test_a_job_file_from_a_pipe_is_read_once(tmp_path, sample_captions):
    captions = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:2])
    read, write = os.pipe()
    os.write(write, f'captions = "{captions}"\nlog_format = "text"\n'.encode())
    os.close(write)
    try:
        with FakeOpenAI() as fake:
            code = main(["--config", f"/dev/fd/{read}", "--base-url", fake.base_url, "--model", "fake-model",
                         "--dry-run"])
    finally:
        os.close(read)
    assert code == EXIT_OK


# --------------------------------------------------------------------------- evaluation sets

@pytest.mark.parametrize("missing", ["nonexistent.jsonl", "."])
def test_a_missing_evaluation_set_is_a_usage_error_before_any_request(tmp_path, sample_captions, missing):
    evals = str(tmp_path / missing)
    proc = subprocess.run([PY, "-m", "gen.curate", "--queries", str(tmp_path), "--decontaminate-against", evals,
                           "--log-format", "json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    events = json_lines(proc.stdout + proc.stderr)
    assert proc.returncode == EXIT_USAGE
    assert "--decontaminate-against" in events[0]["message"] and evals in events[0]["message"]
    assert events[-1]["event"] == "finished"

    captions = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:3])
    with FakeOpenAI() as fake:
        assert run(captions, tmp_path / "out", fake.base_url, "--decontaminate-against", evals) == EXIT_USAGE
        assert fake.requests == []


# --------------------------------------------------------------------------- stop signals

def _catches_sigterm(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc to see the handlers installed")
def test_a_stop_signal_at_any_moment_of_start_up_ends_with_the_stop_line_and_143(tmp_path, sample_captions):
    """From the moment capgen's handlers are in place (before: the signal's default action,
    which a shell reports as 143 too), through settings, imports and the start event."""
    captions = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:4])
    with FakeOpenAI(latency=10) as fake:   # a run that would still be asking when the signal comes
        for i, delay in enumerate((0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8)):
            proc = subprocess.Popen([PY, "-m", "gen.run", "--captions", str(captions), "--out", str(tmp_path / f"o{i}"),
                                     "--base-url", fake.base_url, "--model", "fake-model", "--log-format", "json"],
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 30
            while not _catches_sigterm(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(delay)
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=60)
            assert proc.returncode == EXIT_STOPPED, (delay, stderr[-2000:])
            events = json_lines(stdout + stderr)   # no traceback: every line is JSON
            assert any(e.get("event") == "stopped" for e in events), (delay, events)
            assert events[-1]["event"] == "finished" and events[-1]["exit_status"] == EXIT_STOPPED


# --------------------------------------------------------------------------- judge and pool

def test_the_judge_takes_the_run_directorys_lock(tmp_path, sample_captions):
    import fcntl
    out = tmp_path / "out"
    common = ["--captions", str(write_jsonl(tmp_path / "caps.jsonl", sample_captions[:2])), "--out", str(out),
              "--model", "fake-model", "--no-progress"]
    from gen.judge import main as judge_main
    with FakeOpenAI() as fake:
        assert main([*common, "--base-url", fake.base_url, "--no-curate"]) == EXIT_OK
        with open(out / ".lock", "a+") as held:   # what a gen.run beside it holds
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            before = len(fake.requests)
            assert judge_main([*common, "--base-url", fake.base_url]) == EXIT_LOCKED
            assert len(fake.requests) == before and not (out / "judgements.parquet").exists()


def test_with_no_peer_answer_yet_a_servers_first_invalid_answers_make_it_no_suspect(tmp_path):
    from gen.engines.pool import Server, ServerPool
    a, b = Server("a", None), Server("b", None)
    pool = ServerPool([a, b])
    assert pool.checked(a, valid=False) is False   # nothing to compare with
    assert pool.checked(a, valid=False) is False
    assert pool.checked(a, valid=False) is True    # a fast broken server, caught before its peers answer
    # A hard caption (invalid everywhere) costs its request and one repair round, on a rerun's
    # first caption too: not a third request that no server deserved.
    rows = [{"id": "hard", "text": "图片中有一只黑猫坐在窗台上晒太阳"}]
    with FakeOpenAI(answer=lambda caption, body: "这不是JSON") as one, \
            FakeOpenAI(answer=lambda caption, body: "这不是JSON") as two:
        code = main(["--captions", str(write_jsonl(tmp_path / "caps.jsonl", rows)), "--out", str(tmp_path / "out"),
                     "--base-url", one.base_url, "--base-url", two.base_url, "--model", "fake-model",
                     "--no-progress", "--repair-rounds", "1", "--no-curate"])
        assert len(one.requests) + len(two.requests) == 2
    assert code == EXIT_OK
    assert [r["caption_id"] for r in read_jsonl_lines(tmp_path / "out" / "rejects.jsonl")] == ["hard"]


def read_jsonl_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
