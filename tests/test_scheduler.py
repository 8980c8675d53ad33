"""What a scheduler and the people on call see: exit codes, and JSON logs from first line to last."""
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import ROOT, write_jsonl
from fake_openai import FakeOpenAI

from gen.run import EXIT_FAILED, EXIT_INCOMPLETE, EXIT_LOCKED, EXIT_OK, EXIT_USAGE, lock_out_dir, main

LEVELS = {EXIT_OK: "info", EXIT_INCOMPLETE: "warning", EXIT_LOCKED: "warning", EXIT_FAILED: "error",
          EXIT_USAGE: "error"}


def json_lines(err: str) -> list[dict]:
    """Every line of stderr parsed as JSON: one that is not fails the test."""
    lines = [json.loads(line) for line in err.splitlines()]
    assert lines, "nothing logged"
    return lines


def finished(lines: list[dict], code: int) -> dict:
    last = lines[-1]
    assert (last["event"], last["exit_status"], last["level"]) == ("finished", code, LEVELS[code])
    assert [line for line in lines if line.get("event") == "finished"] == [last]
    return last


def args(captions, out, fake, *extra):
    return ["--captions", str(captions), "--out", str(out), "--base-url", fake.base_url, "--model", "fake-model",
            "--retry-wait", "0.01", "--timeout", "2", "--log-format", "json", *extra]


@pytest.fixture
def captions(tmp_path, sample_captions):
    return write_jsonl(tmp_path / "caps.jsonl", sample_captions[:6])


def test_a_run_logs_start_curated_and_finished_as_json_with_the_facts(tmp_path, captions, capsys, monkeypatch):
    secret = "sk-test-SECRET-987654"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert main(args(captions, out, fake)) == EXIT_OK
        first = json_lines(capsys.readouterr().err)
        assert main(args(captions, out, fake)) == EXIT_OK
        again = json_lines(capsys.readouterr().err)
    manifest = json.loads((out / "manifest.json").read_text())
    start = first[0]
    assert start["event"] == "start" and start["fingerprint"] == manifest["fingerprint"]
    assert (start["model"], start["engine"], start["out"]) == ("fake-model", "openai", str(out))
    assert secret not in json.dumps(first)
    (curated,) = [line for line in first if line.get("event") == "curated"]
    assert curated["pairs"] == manifest["curation"]["stats"]["pairs_out"] > 0
    assert curated["shards_version"] == manifest["curation"]["version"] and curated["shards_reused"] is False
    (summary,) = [line for line in first if line.get("event") == "summary"]
    assert summary["summary"]["captions"] == 6 and summary["usage"]["requests"] == 6
    end = finished(first, EXIT_OK)
    assert (end["fingerprint"], end["shards_version"], end["shards_reused"]) == \
        (manifest["fingerprint"], manifest["curation"]["version"], False)
    assert end["duration_s"] > 0 and end["command"] == "gen.run"
    end = finished(again, EXIT_OK)   # unchanged inputs: the same version, reused
    assert (end["shards_version"], end["shards_reused"]) == (manifest["curation"]["version"], True)


def test_base_url_credentials_stay_out_of_the_log(tmp_path, captions, capsys):
    with FakeOpenAI() as fake:
        url = fake.base_url.replace("http://", "http://user:hunter2@") + "?api-key=hunter3"
        code = main(["--captions", str(captions), "--out", str(tmp_path / "out"), "--base-url", url,
                     "--model", "fake-model", "--log-format", "json", "--dry-run"])
    err = capsys.readouterr().err
    assert "hunter2" not in err and "hunter3" not in err
    # credentials in a URL are refused, not used (tests/test_stops.py): the lines say so in JSON
    assert code == EXIT_USAGE and finished(json_lines(err), EXIT_USAGE)


def test_unanswered_captions_end_on_a_warning_not_an_info_line(tmp_path, captions, sample_captions, capsys):
    down = sample_captions[2]["text"]
    with FakeOpenAI(faults=lambda i, caption: "503" if caption == down else None) as fake:
        assert main(args(captions, tmp_path / "out", fake, "--max-attempts", "2")) == EXIT_INCOMPLETE
    end = finished(json_lines(capsys.readouterr().err), EXIT_INCOMPLETE)
    assert end["failed"] == 1 and "rerun" in end["outcome"]


def test_a_held_output_directory_is_its_own_exit_code_with_a_json_warning(tmp_path, captions, capsys):
    held = lock_out_dir(tmp_path / "out")
    try:
        with FakeOpenAI() as fake:
            assert main(args(captions, tmp_path / "out", fake)) == EXIT_LOCKED
            assert fake.requests == []
    finally:
        held.close()
    lines = json_lines(capsys.readouterr().err)
    (locked,) = [line for line in lines if line.get("event") == "locked"]
    assert locked["level"] == "warning" and "in use by a running capgen" in locked["message"]
    finished(lines, EXIT_LOCKED)


@pytest.mark.parametrize("argv,env,job", [
    (["--log-format", "json", "--captions", "c.jsonl", "--concurrency", "many"], {}, None),  # argparse's type check
    (["--captions", "c.jsonl", "--no-such-flag"], {"CAPGEN_LOG_FORMAT": "json"}, None),
    (["--no-such-flag"], {}, 'log_format = "json"\ncaptions = "c.jsonl"\n'),           # the job file says json
    ([], {}, 'log_format = "json"\ncaptions = "c.jsonl"\nconcurency = 4\n'),          # a typo in the file
    ([], {}, 'log_format = "json"\ncaptions = \n'),                                   # not TOML at all
    (["--log-format", "json"], {}, None),                                             # no captions anywhere
])
def test_usage_and_config_errors_are_json_when_json_is_asked_for(tmp_path, capsys, monkeypatch, argv, env, job):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if job is not None:
        (tmp_path / "job.toml").write_text(job)
        argv = ["--config", str(tmp_path / "job.toml"), *argv]
    assert main(argv) == EXIT_USAGE
    lines = json_lines(capsys.readouterr().err)
    (error,) = [line for line in lines if line.get("level") == "error" and line.get("event") == "error"]
    assert error["kind"] == "usage"
    finished(lines, EXIT_USAGE)


def test_text_usage_errors_still_show_the_usage(capsys):
    assert main(["--captions", "c.jsonl", "--concurrency", "many"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m gen.run") and "ERROR python -m gen.run: argument --concurrency" in err


def test_judge_usage_error_of_its_own_flag_is_json(tmp_path, capsys):
    from gen.judge import main as judge_main
    assert judge_main(["--candidates", "-1", "--captions", "c.jsonl", "--log-format", "json"]) == EXIT_USAGE
    lines = json_lines(capsys.readouterr().err)
    assert "--candidates must be 0 or more" in lines[0]["message"]
    assert finished(lines, EXIT_USAGE)["command"] == "gen.judge"


def test_an_unexpected_failure_is_one_json_line_with_its_traceback(tmp_path, captions, capsys, monkeypatch):
    import gen.run

    async def broken(*args):
        raise RuntimeError("a defect")
    monkeypatch.setattr(gen.run, "_run_locked", broken)
    with FakeOpenAI() as fake:
        assert main(args(captions, tmp_path / "out", fake)) == EXIT_FAILED
    lines = json_lines(capsys.readouterr().err)
    (error,) = [line for line in lines if line.get("event") == "error"]
    assert "a defect" in error["message"] and "Traceback" in error["exception"]
    finished(lines, EXIT_FAILED)


def test_cron_sees_json_from_the_process_itself(tmp_path):
    """As cron runs it: a process of its own, argparse reading sys.argv."""
    job = tmp_path / "job.toml"
    job.write_text('log_format = "json"\ncaptions = "c.jsonl"\n')
    done = subprocess.run([sys.executable, "-m", "gen.run", "--config", str(job), "--bogus"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_USAGE
    finished(json_lines(done.stderr), EXIT_USAGE)


# --------------------------------------------------------------------------- --dry-run


def dry(capsys, argv) -> tuple[int, dict, list[dict]]:
    code = main([*argv, "--dry-run", "--log-format", "json"])
    got = capsys.readouterr()
    return code, json.loads(got.out), json_lines(got.err)


def test_dry_run_with_the_server_down_exits_1_and_says_so(tmp_path, captions, capsys):
    with FakeOpenAI() as fake:
        url = fake.base_url
    code, plan, lines = dry(capsys, ["--captions", str(captions), "--out", str(tmp_path / "out"),
                                     "--base-url", url, "--model", "fake-model"])
    assert code == EXIT_FAILED and plan["engine"]["ready"] is False
    (server,) = plan["engine"]["servers"]
    assert (server["url"], server["reachable"]) == (url, False)
    assert any(line.get("event") == "engine_check" for line in lines)
    finished(lines, EXIT_FAILED)


def test_dry_run_asks_each_server_for_its_models_and_nothing_else(tmp_path, captions, capsys):
    with FakeOpenAI() as up, FakeOpenAI(model="other-model") as other:
        base = ["--captions", str(captions), "--out", str(tmp_path / "out"), "--model", "fake-model"]
        code, plan, _ = dry(capsys, [*base, "--base-url", up.base_url, "--base-url", other.base_url])
        assert code == EXIT_OK and plan["engine"]["ready"]   # one server of two serves the model
        assert [s["serves_model"] for s in plan["engine"]["servers"]] == [True, False]
        code, plan, lines = dry(capsys, [*base, "--base-url", other.base_url])
        assert code == EXIT_FAILED and "does not list the model 'fake-model'" in plan["engine"]["servers"][0]["error"]
        assert up.requests == [] and other.requests == []   # no generation paid for
    finished(lines, EXIT_FAILED)


class _Replies(BaseHTTPRequestHandler):
    """GET answers `reply` (status, headers, body); records each Authorization header it got."""
    reply: tuple = (200, {}, b"")
    seen: list = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        type(self).seen.append(self.headers.get("Authorization"))
        status, headers, body = self.reply
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def replies():
    class Handler(_Replies):
        seen = []
    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            # A client that stops reading at its size cap breaks this server's write; the
            # default prints a traceback to stderr, which the test reads as capgen's log.
            pass
    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Handler, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.mark.parametrize("reply,status,ready,why", [
    ((401, {}, b'{"error": {"message": "Incorrect API key"}}'), 401, False, "key was refused"),
    ((200, {}, b"\xff\xfe not json"), 200, True, "not readable"),
    ((200, {}, b"[" * 200_000), 200, True, "not readable"),                 # nesting past the parser's stack
    ((200, {}, b'{"data": "' + b"x" * (2 << 20) + b'"}'), 200, True, "not readable"),   # past the size cap
    ((200, {}, b'{"data": [{"id": ["m"]}, 7]}'), 200, False, "does not list the model"),
    ((500, {}, b"<html>oops</html>"), 500, False, "HTTP 500"),
])
def test_dry_run_takes_any_model_list_reply_without_a_traceback(tmp_path, captions, capsys, replies,
                                                                 reply, status, ready, why):
    handler, url = replies
    handler.reply = reply
    code, plan, _ = dry(capsys, ["--captions", str(captions), "--out", str(tmp_path / "out"), "--model", "m",
                                 "--base-url", url])
    (s,) = plan["engine"]["servers"]
    assert (s["status"], plan["engine"]["ready"], code) == (status, ready, EXIT_OK if ready else EXIT_FAILED)
    assert why in s["error"]


def test_dry_run_follows_no_redirect_with_the_key(tmp_path, captions, capsys, monkeypatch, replies):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-REDIRECTED")
    elsewhere, target = replies

    class Moved(_Replies):
        seen = []
        reply = (302, {"Location": target + "/models"}, b"")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Moved)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, plan, _ = dry(capsys, ["--captions", str(captions), "--out", str(tmp_path / "out"),
                                     "--model", "fake-model",
                                     "--base-url", f"http://127.0.0.1:{server.server_address[1]}/v1"])
    finally:
        server.shutdown()
    assert Moved.seen == ["Bearer sk-test-REDIRECTED"] and elsewhere.seen == []
    assert code == EXIT_FAILED and plan["engine"]["servers"][0]["status"] == 302


def test_dry_run_of_the_in_process_engine_checks_the_model_directory(tmp_path, captions, capsys):
    base = ["--captions", str(captions), "--out", str(tmp_path / "out")]
    code, plan, _ = dry(capsys, [*base, "--model", str(tmp_path / "no-such-model")])
    assert code == EXIT_FAILED and plan["engine"]["model_dir_exists"] is False
    (tmp_path / "model").mkdir()
    code, plan, _ = dry(capsys, [*base, "--model", str(tmp_path / "model")])
    assert code == EXIT_OK and plan["engine"] == {"engine": "vllm", "model": str(tmp_path / "model"),
                                                  "model_dir_exists": True, "ready": True}


def test_dry_run_says_whether_curation_would_publish_and_the_run_agrees(tmp_path, sample_captions, capsys):
    caps = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:6])
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    with FakeOpenAI() as fake:
        base = ["--captions", str(caps), "--out", str(out), "--base-url", fake.base_url, "--model", "fake-model"]

        def outlook(*extra):
            code, plan, _ = dry(capsys, [*base, *extra])
            assert code == EXIT_OK
            return plan["curation"]

        def version(*extra):
            assert main([*base, "--no-progress", *extra]) == EXIT_OK
            capsys.readouterr()
            return json.loads((out / "manifest.json").read_text())["curation"]["version"]

        assert outlook() == {"on": True, "new_version": True, "latest": None,
                             "reason": "6 captions would be asked: their queries make a new version"}
        assert main([*base, "--no-progress", "--no-curate"]) == EXIT_OK
        capsys.readouterr()
        assert outlook()["reason"] == "no curated version yet"
        first = version()
        assert outlook() == {"on": True, "new_version": False, "latest": first,
                             "reason": "unchanged inputs: shards/latest would be reused"}
        assert version() == first
        assert outlook("--no-curate")["on"] is False
        # other curation settings: a new version, and the run makes one
        job.write_text("[curation]\nmin_chars = 2\n")
        cur = outlook("--config", str(job))
        assert cur["new_version"] and "curation settings" in cur["reason"]
        second = version("--config", str(job))
        assert second != first
        # a caption with the same text under a new id: nothing to ask, but other captions
        write_jsonl(caps, sample_captions[:6] + [{**sample_captions[0], "id": "again"}])
        cur = outlook("--config", str(job))
        assert cur["new_version"] and cur["reason"] == "the captions or the generation settings differ from the last run's"
        assert version("--config", str(job)) != second
        write_jsonl(caps, sample_captions[:7])
        cur = outlook("--config", str(job))
        assert cur["new_version"] and cur["reason"].startswith("1 captions would be asked")


def test_progress_and_a_server_taken_out_carry_their_figures(tmp_path, sample_captions, caplog, capsys):
    import logging

    from gen.generate import GenStats
    from gen.generate.progress import Progress
    caplog.set_level(logging.INFO)
    progress = Progress(total=10, bar=False, every=0)
    progress(GenStats(captions=4, cached=1, accepted=3))
    (line,) = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == "progress"]
    assert (line["done"], line["total"], line["accepted"]) == (4, 10, 3) and line["elapsed_s"] >= 0
    capsys.readouterr()
    caps = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:12])
    with FakeOpenAI() as up, FakeOpenAI(faults={"500": 1.0}) as down:
        assert main(["--captions", str(caps), "--out", str(tmp_path / "out"), "--base-url", up.base_url,
                     "--base-url", down.base_url, "--model", "fake-model", "--retry-wait", "0",
                     "--concurrency", "1", "--log-format", "json"]) == EXIT_OK
    lines = json_lines(capsys.readouterr().err)
    out = [line for line in lines if line.get("event") == "server_out"]
    assert out and out[0]["server"] == down.base_url and out[0]["cooldown_s"] == 30 and out[0]["level"] == "warning"


def test_curate_shares_the_exit_codes_the_lock_and_the_json_log(tmp_path, captions, capsys):
    from gen.curate.__main__ import main as curate_main
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert main(args(captions, out, fake, "--no-curate")) == EXIT_OK
    capsys.readouterr()
    assert curate_main(["--queries", str(out), "--log-format", "json"]) == EXIT_OK
    got = capsys.readouterr()
    lines = json_lines(got.err)
    assert lines[0]["event"] == "start" and lines[0]["fingerprint"] == json.loads(got.out)["fingerprint"]
    end = finished(lines, EXIT_OK)
    assert end["shards_reused"] is False and (out / "shards" / end["shards_version"]).is_dir()
    held = lock_out_dir(out)
    try:
        assert curate_main(["--queries", str(out), "--log-format", "json", "--negatives", "2"]) == EXIT_LOCKED
    finally:
        held.close()
    finished(json_lines(capsys.readouterr().err), EXIT_LOCKED)
    assert curate_main(["--queries", str(out), "--log-format", "json", "--negatives", "-1"]) == EXIT_USAGE
    lines = json_lines(capsys.readouterr().err)
    assert "invalid settings: --negatives" in lines[0]["message"] and lines[0]["event"] == "error"
    finished(lines, EXIT_USAGE)
    assert curate_main(["--queries", str(tmp_path / "nothing"), "--log-format", "json"]) == EXIT_USAGE
    finished(json_lines(capsys.readouterr().err), EXIT_USAGE)
    assert not (tmp_path / "nothing").exists()
