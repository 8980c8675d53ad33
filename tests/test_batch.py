"""Batch mode against the fake batch API (tests/fake_batch.py): the cron shape, every
provider fault, and crashes at each step of a batch's life."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, read_jsonl, read_rows, write_jsonl
from fake_batch import FakeBatch
from fake_openai import FakeOpenAI, default_answer

import gen.generate.batch
from gen.run import EXIT_FAILED, EXIT_INCOMPLETE, EXIT_OK, EXIT_PENDING, main


def run(captions: Path, out: Path, fake, *extra: str) -> int:
    return main(["--captions", str(captions), "--out", str(out), "--base-url", fake.base_url,
                 "--model", "fake-model", "--no-progress", "--retry-wait", "0.01", "--timeout", "5",
                 "--max-attempts", "2", "--no-curate", "--batch", *extra])


WAIT = ("--wait", "--batch-poll", "0.001")


@pytest.fixture
def captions(tmp_path, sample_captions):
    return write_jsonl(tmp_path / "caps.jsonl", sample_captions[:12])


def sent(fake: FakeBatch) -> Counter:
    """custom_id -> how many request lines, over every file uploaded."""
    return Counter(json.loads(line)["custom_id"] for f in fake.files.values() if f["meta"]["purpose"] == "batch"
                   for line in f["data"].splitlines() if line.strip())


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def answered_once(out: Path, sample: list[dict]) -> None:
    rows = read_rows(out / "captions.parquet")
    assert sorted(r["id"] for r in rows) == sorted(c["id"] for c in sample)
    store = sqlite3.connect(out / "cache.sqlite")
    assert store.execute("SELECT COUNT(*) FROM batch_requests").fetchone()[0] == 0   # nothing left open
    store.close()


def test_a_batch_asks_what_the_online_path_asks_and_gives_the_same_rows(tmp_path, captions, sample_captions):
    with FakeOpenAI() as online:
        assert main(["--captions", str(captions), "--out", str(tmp_path / "online"), "--base-url", online.base_url,
                     "--model", "fake-model", "--no-progress", "--no-curate"]) == EXIT_OK
    with FakeBatch() as fake:
        assert run(captions, tmp_path / "batch", fake, *WAIT) == EXIT_OK
        lines = fake.batch_lines
    assert len(lines) == 12 and all(line["url"] == "/v1/chat/completions" and line["method"] == "POST"
                                    for line in lines)
    by_text = {r["messages"][1]["content"]: r for r in online.requests}
    for line in lines:   # each body exactly what the online engine sent for that caption
        assert line["body"] == by_text[line["body"]["messages"][1]["content"]]
    assert read_rows(tmp_path / "batch" / "queries.parquet") == read_rows(tmp_path / "online" / "queries.parquet")
    assert read_rows(tmp_path / "batch" / "captions.parquet") == read_rows(tmp_path / "online" / "captions.parquet")
    m = manifest(tmp_path / "batch")
    assert m["counts"]["accepted"] == 12 and m["counts"]["pending"] == 0
    usage = m["batch"]["usage"]
    assert usage["requests"] == 12 and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert m["usage"]["prompt_tokens"] == usage["prompt_tokens"]


def test_cron_submits_returns_4_and_the_next_runs_collect_and_submit_only_what_is_new(
        tmp_path, captions, sample_captions):
    out = tmp_path / "out"
    with FakeBatch(steps=2) as fake:
        assert run(captions, out, fake) == EXIT_PENDING
        m = manifest(out)
        assert m["counts"]["pending"] == 12 and m["counts"]["queries"] == 0 and len(m["batch"]["open"]) == 1
        assert read_rows(out / "captions.parquet") == [] and read_jsonl(out / "rejects.jsonl") == []
        assert run(captions, out, fake) == EXIT_PENDING      # still running: nothing submitted again
        assert len(fake.batches) == 1
        more = write_jsonl(tmp_path / "more.jsonl", sample_captions[:16])
        assert run(more, out, fake) == EXIT_PENDING          # only the 4 new ones go out
        assert sorted(sent(fake).values()) == [1] * 16
        codes = [run(more, out, fake) for _ in range(8)]
        assert codes[-1] == EXIT_OK and set(codes[codes.index(EXIT_OK):]) == {EXIT_OK}
        assert len(fake.batches) == 2 and max(sent(fake).values()) == 1
    answered_once(out, sample_captions[:16])
    assert manifest(out)["counts"]["pending"] == 0


def test_a_partly_answered_run_exports_what_is_answered_and_counts_the_rest_pending(
        tmp_path, sample_captions):
    out = tmp_path / "out"
    first = write_jsonl(tmp_path / "a.jsonl", sample_captions[:6])
    both = write_jsonl(tmp_path / "b.jsonl", sample_captions[:10])
    with FakeBatch(steps=1) as fake:
        assert run(first, out, fake, *WAIT) == EXIT_OK
        assert run(both, out, fake) == EXIT_PENDING
    m = manifest(out)
    assert m["counts"]["pending"] == 4 and m["counts"]["captions_with_queries"] == 6
    assert {r["id"] for r in read_rows(out / "captions.parquet")} == {c["id"] for c in sample_captions[:6]}


def test_every_oddity_of_an_output_file_is_logged_with_the_batch_id_and_nothing_lost_or_doubled(
        tmp_path, captions, sample_captions, capsys):
    texts = [c["text"] for c in sample_captions[:12]]
    faults = {texts[0]: "error", texts[1]: "missing", texts[2]: "duplicate", texts[3]: "truncated",
              texts[4]: "invalid"}
    out = tmp_path / "out"
    with FakeBatch(line_fault=lambda cid, caption: faults.get(caption), shuffle=True, unknown_line=True) as fake:
        assert run(captions, out, fake, *WAIT) == EXIT_INCOMPLETE
        log = capsys.readouterr().err
        assert "batch-000002: output line" in log and "custom_id 'never-sent' was not sent" in log
        assert "a second line for custom_id" in log and "not JSON (cut short?)" in log
        assert "fake: this request failed" in log and "captions without an answer line" in log
        m = manifest(out)   # each failed caption was submitted again at once, up to --max-attempts (2)
        assert m["counts"]["failed"] == 3 and m["counts"]["accepted"] == 8 and m["counts"]["pending"] == 0
        rejects = read_jsonl(out / "rejects.jsonl")
        assert {r["caption_id"] for r in rejects} == {sample_captions[i]["id"] for i in (0, 1, 3, 4)}
        assert all("batch batch-0000" in r["reason"] for r in rejects if r["caption_id"] != sample_captions[4]["id"])
        # the invalid answer's repair round went into a follow-up batch: the answer and its error
        repair = [line for line in fake.batch_lines if len(line["body"]["messages"]) > 2]
        assert len(repair) == 1 and repair[0]["body"]["messages"][2] == {
            "role": "assistant", "content": json.dumps({"queries": ["a"]})}
        faults.clear()
        assert run(captions, out, fake) == EXIT_PENDING        # the rerun submits exactly the 3 failed
        assert run(captions, out, fake, *WAIT) == EXIT_OK
    counts = sent(fake)
    assert counts.pop(repair[0]["custom_id"]) == 2 and sorted(counts.values()) == [1] * 8 + [3] * 3
    # caption 4 ended rejected after its repair round (the repair was answered as badly)
    assert {r["id"] for r in read_rows(out / "captions.parquet")} == {c["id"] for c in sample_captions[:12]} - {
        sample_captions[4]["id"]}


def test_an_oversized_output_line_is_skipped_and_its_caption_asked_again(tmp_path, sample_captions, capsys):
    caps = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:4])
    big = sample_captions[0]["text"]
    with FakeBatch(line_fault=lambda cid, caption: "oversized" if caption == big else None,
                   oversized_bytes=300_000) as fake:
        assert run(caps, tmp_path / "a", fake, *WAIT) == EXIT_INCOMPLETE   # 3 answered, the big one asked twice
        log = capsys.readouterr().err
        assert "output line" in log and "longer than 139,264 bytes; skipped" in log
        assert manifest(tmp_path / "a")["counts"]["captions_with_queries"] == 3
        store = sqlite3.connect(tmp_path / "a" / "cache.sqlite")
        assert max(len(r or "") for (r,) in store.execute("SELECT raw FROM answers")) < 10_000
        store.close()
    one = write_jsonl(tmp_path / "one.jsonl", sample_captions[:1])
    with FakeBatch(line_fault=lambda cid, caption: "oversized", oversized_bytes=3_000_000) as fake:
        assert run(one, tmp_path / "b", fake, *WAIT) == EXIT_INCOMPLETE
        log = capsys.readouterr().err
        assert "output file: file file-" in log and "is larger than 1,187,840 bytes" in log
        assert manifest(tmp_path / "b")["counts"]["failed"] == 1 and sent(fake).most_common(1)[0][1] == 2


@pytest.mark.parametrize("status", ["failed", "expired", "cancelled"])
def test_a_batch_that_ends_without_answers_frees_its_captions_with_the_providers_reason(
        tmp_path, captions, sample_captions, capsys, status):
    out = tmp_path / "out"
    with FakeBatch(outcome=lambda n: status if n == 0 else "completed") as fake:
        assert run(captions, out, fake, *WAIT) == EXIT_OK   # submitted again at once, answered
        log = capsys.readouterr().err
        kept = 0 if status == "failed" else 6               # a partial batch keeps its answers
        assert manifest(out)["counts"]["accepted"] == 12
        first = manifest(out)["batch"]["collected"][0]
        assert (first["batch_id"], first["status"], first["answered"]) == ("batch-000002", status, kept)
        reason = {"failed": "fake: the batch failed", "expired": "could not be executed before",
                  "cancelled": "the batch cancelled"}[status]
        assert "batch-000002" in log and reason in log
        assert len(fake.batches) == 2
        assert sorted(sent(fake).values()) == sorted([1] * kept + [2] * (12 - kept))
    answered_once(out, sample_captions[:12])


def test_batch_cancel_cancels_and_the_next_run_resubmits_the_rest(tmp_path, captions, sample_captions):
    out = tmp_path / "out"
    with FakeBatch(steps=3) as fake:
        assert run(captions, out, fake) == EXIT_PENDING
        assert run(captions, out, fake, "--batch-cancel") == EXIT_OK
        assert [b["status"] for b in fake.batches.values()] == ["cancelling"]
        assert run(captions, out, fake, *WAIT) == EXIT_OK
    answered_once(out, sample_captions[:12])
    assert sorted(sent(fake).values()) == [1] * 6 + [2] * 6


def test_a_server_without_a_batch_api_is_a_clear_error_naming_online_mode(tmp_path, captions, capsys):
    with FakeOpenAI() as fake:
        assert run(captions, tmp_path / "out", fake) == EXIT_FAILED
    log = capsys.readouterr().err
    assert "has no batch API (HTTP 404" in log and "online mode" in log
    assert not (tmp_path / "out" / "manifest.json").exists()
    with FakeBatch() as fake:   # the refused intent is found nowhere, dropped, and its captions submitted
        assert run(captions, tmp_path / "out", fake, *WAIT) == EXIT_OK


def test_large_runs_are_split_by_requests_and_bytes_and_a_size_refusal_names_the_setting(
        tmp_path, captions, sample_captions, capsys):
    with FakeBatch() as fake:
        assert run(captions, tmp_path / "a", fake, "--batch-max-requests", "5", *WAIT) == EXIT_OK
        assert sorted(b["request_counts"]["total"] for b in fake.batches.values()) == [2, 5, 5]
    with FakeBatch() as fake:
        assert run(captions, tmp_path / "b", fake, "--batch-max-bytes", "20000", *WAIT) == EXIT_OK
        sizes = [f["meta"]["bytes"] for f in fake.files.values() if f["meta"]["purpose"] == "batch"]
        assert len(sizes) >= 4 and max(sizes) <= 20000 and sum(sent(fake).values()) == 12
    with FakeBatch(max_file_bytes=10_000) as fake:
        assert run(captions, tmp_path / "c", fake) == EXIT_FAILED
    assert "lower --batch-max-bytes" in capsys.readouterr().err


class Killed(BaseException):
    """What a kill -9 leaves: nothing after the point runs (not even except Exception)."""


@pytest.mark.parametrize("point", ["uploaded", "created", "downloading"])
def test_a_run_killed_at_each_step_ends_with_every_caption_answered_once_and_no_batch_twice(
        tmp_path, captions, sample_captions, monkeypatch, point):
    out = tmp_path / "out"

    def crash(name):
        if name == point:
            raise Killed(name)
    with FakeBatch() as fake:
        monkeypatch.setattr(gen.generate.batch, "checkpoint", crash)
        with pytest.raises(Killed):
            run(captions, out, fake, *WAIT)
        monkeypatch.setattr(gen.generate.batch, "checkpoint", lambda name: None)
        assert run(captions, out, fake, *WAIT) == EXIT_OK
        assert len(fake.batches) == 1 and sorted(sent(fake).values()) == [1] * 12
        uploads = [f for f in fake.files.values() if f["meta"]["purpose"] == "batch"]
        assert len(uploads) == 1
    answered_once(out, sample_captions[:12])
    store = sqlite3.connect(out / "cache.sqlite")
    assert store.execute("SELECT COUNT(*), SUM(requests) FROM answers").fetchone() == (12, 12)
    assert store.execute("SELECT status FROM batches").fetchall() == [("completed",)]
    store.close()


def test_a_batch_created_but_not_recorded_is_found_pages_down_the_providers_list(tmp_path, captions, monkeypatch):
    import openai
    out = tmp_path / "out"

    def crash(name):
        if name == "created":
            raise Killed(name)
    with FakeBatch(page_cap=2) as fake:
        monkeypatch.setattr(gen.generate.batch, "checkpoint", crash)
        with pytest.raises(Killed):
            run(captions, out, fake)
        monkeypatch.setattr(gen.generate.batch, "checkpoint", lambda name: None)
        client = openai.OpenAI(base_url=fake.base_url, api_key="x")
        for i in range(5):   # other jobs' batches since, listed before ours
            f = client.files.create(file=(f"other-{i}.jsonl", b'{"custom_id": "x"}\n'), purpose="batch")
            client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert run(captions, out, fake, *WAIT) == EXIT_OK
        assert len(fake.batches) == 6 and sorted(n for k, n in sent(fake).items() if k != "x") == [1] * 12


KILL = """
import os, signal, sys
import gen.generate.batch
from gen.run import cli
point = sys.argv.pop(1)
def kill(name):
    if name == point:
        os.kill(os.getpid(), signal.SIGKILL)
gen.generate.batch.checkpoint = kill
sys.exit(cli())
"""


def test_a_real_kill_9_between_create_and_the_store_write_leaves_a_batch_the_rerun_finds(
        tmp_path, captions, sample_captions):
    out = tmp_path / "out"
    with FakeBatch() as fake:
        args = ["--captions", str(captions), "--out", str(out), "--base-url", fake.base_url, "--model",
                "fake-model", "--no-progress", "--no-curate", "--batch"]
        done = subprocess.run([sys.executable, "-c", KILL, "created", *args], cwd=ROOT, timeout=120,
                              capture_output=True, text=True)
        assert done.returncode == -signal.SIGKILL, done.stderr
        assert len(fake.batches) == 1
        store = sqlite3.connect(out / "cache.sqlite")
        assert store.execute("SELECT status FROM batches").fetchall() == [("intent",)]
        store.close()
        assert run(captions, out, fake, *WAIT) == EXIT_OK
        assert len(fake.batches) == 1 and sorted(sent(fake).values()) == [1] * 12
    answered_once(out, sample_captions[:12])


def test_a_store_from_before_batch_mode_opens_and_keeps_its_answers(tmp_path, captions, sample_captions):
    out = tmp_path / "out"
    with FakeOpenAI() as online:
        assert main(["--captions", str(captions), "--out", str(out), "--base-url", online.base_url,
                     "--model", "fake-model", "--no-progress", "--no-curate"]) == EXIT_OK
    db = sqlite3.connect(out / "cache.sqlite")
    db.execute("DROP TABLE batch_requests")
    db.execute("DROP TABLE batches")
    db.commit()
    db.close()
    more = write_jsonl(tmp_path / "more.jsonl", sample_captions[:14])
    with FakeBatch() as fake:
        assert run(more, out, fake, *WAIT) == EXIT_OK
        assert len(sent(fake)) == 2          # the 12 answered online are not asked again
    answered_once(out, sample_captions[:14])


def test_dry_run_shows_what_is_pending_and_what_would_be_submitted(tmp_path, captions, sample_captions, capsys):
    out = tmp_path / "out"
    with FakeBatch(steps=5) as fake:
        assert run(captions, out, fake) == EXIT_PENDING
        more = write_jsonl(tmp_path / "more.jsonl", sample_captions[:15])
        capsys.readouterr()
        assert run(more, out, fake, "--dry-run") == EXIT_OK
        plan = json.loads(capsys.readouterr().out)
        assert plan["batch"]["pending"] == 12 and plan["batch"]["to_submit"] == 3 and plan["to_request"] == 3
        assert [b["batch_id"] for b in plan["batch"]["open_batches"]] == ["batch-000002"]
        assert len(fake.batches) == 1


def test_batch_dir_writes_request_files_and_collects_results_placed_beside_them(tmp_path, captions, sample_captions):
    out, queue = tmp_path / "out", tmp_path / "queue"
    args = ["--captions", str(captions), "--out", str(out), "--model", "fake-model", "--no-progress",
            "--no-curate", "--batch-dir", str(queue)]
    assert main(args) == EXIT_PENDING
    requests = sorted(queue.glob("capgen-*.requests.jsonl"))
    assert len(requests) == 1
    assert main(args) == EXIT_PENDING and len(list(queue.glob("*.requests.jsonl"))) == 1   # not twice
    lines = read_jsonl(requests[0])
    assert len(lines) == 12 and lines[0]["body"]["model"] == "fake-model"
    # the site's queue answers, as vLLM's run_batch writes its output file (one line more, one cut short)
    results = []
    for i, line in enumerate(lines):
        caption = line["body"]["messages"][1]["content"].removeprefix("描述：").removesuffix("输出：").strip()
        body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": default_answer(caption)},
                             "finish_reason": "stop"}], "usage": {"prompt_tokens": 10, "completion_tokens": 5}}
        results.append(json.dumps({"id": f"vllm-{i}", "custom_id": line["custom_id"],
                                   "response": {"status_code": 200, "request_id": str(i), "body": body},
                                   "error": None}, ensure_ascii=False))
    text = "\n".join(results[1:]) + "\n" + results[0][:50]
    requests[0].with_name(requests[0].name.replace(".requests.", ".results.")).write_text(text, encoding="utf-8")
    assert main(args) == EXIT_PENDING               # 11 answered, the cut one submitted again
    assert manifest(out)["counts"]["captions_with_queries"] == 11 and manifest(out)["counts"]["pending"] == 1
    second = [p for p in queue.glob("capgen-*.requests.jsonl") if p != requests[0]]
    assert len(second) == 1 and len(read_jsonl(second[0])) == 1


@pytest.mark.slow
def test_vllm_run_batch_answers_capgens_request_file_and_capgen_collects_it(tmp_path, sample_captions):
    """The real batch runner: vLLM's run_batch on the bundled 0.5B model, on CPU."""
    pytest.importorskip("vllm")
    from gen import localmodel
    from gen.engines.vllm import _cpu_defaults
    model = localmodel.ensure()
    out, queue = tmp_path / "out", tmp_path / "queue"
    caps = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:3])
    # --seed none: a per-request seed crashes vLLM's CPU build (gen/engines/vllm.py); no repair
    # round, which would go into a second batch
    args = [sys.executable, "-m", "gen.run", "--captions", str(caps), "--out", str(out), "--batch-dir", str(queue),
            "--seed", "none", "--repair-rounds", "0", "--no-curate", "--no-progress"]
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == EXIT_PENDING, first.stderr[-3000:]
    [requests] = queue.glob("capgen-*.requests.jsonl")
    results = requests.with_name(requests.name.replace(".requests.", ".results."))
    env = dict(os.environ)
    _cpu_defaults()
    env.update({k: v for k, v in os.environ.items() if k.startswith("VLLM_")})
    ran = subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(requests),
                          "-o", f"{results}.part", "--model", str(model), "--enforce-eager",
                          "--max-model-len", "4096"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=1500)
    assert ran.returncode == 0, ran.stderr[-3000:]
    Path(f"{results}.part").rename(results)   # whole, as the README's queue script does
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode in (EXIT_OK, EXIT_INCOMPLETE), second.stderr[-3000:]
    m = manifest(out)
    assert m["counts"]["pending"] == 0 and m["batch"]["collected"][0]["answered"] == 3
    assert m["usage"]["completion_tokens"] > 0
    done = {r["caption_id"] for r in read_rows(out / "queries.parquet")}
    rejected = {r["caption_id"] for r in read_jsonl(out / "rejects.jsonl") if r["stage"] != "query"}
    assert done | rejected == {c["id"] for c in sample_captions[:3]} and len(done) >= 2


def test_force_submits_every_caption_again_and_stores_the_new_answers(tmp_path, captions):
    import time
    out = tmp_path / "out"
    with FakeBatch() as fake:
        assert run(captions, out, fake, *WAIT) == EXIT_OK
        started = time.time()
        assert run(captions, out, fake, "--force", *WAIT) == EXIT_OK
        assert len(fake.batches) == 2 and sorted(sent(fake).values()) == [2] * 12
    store = sqlite3.connect(out / "cache.sqlite")
    assert store.execute("SELECT COUNT(*) FROM answers WHERE created >= ? AND requests = 1",
                         (started,)).fetchone()[0] == 12
    store.close()


def test_batch_repair_online_repairs_an_invalid_batch_answer_at_once(tmp_path, captions, sample_captions):
    bad = sample_captions[0]["text"]
    out = tmp_path / "out"
    with FakeBatch(line_fault=lambda cid, caption: "invalid" if caption == bad else None) as fake:
        assert run(captions, out, fake, "--batch-repair", "online", *WAIT) == EXIT_OK
        assert len(fake.batches) == 1 and len(fake.requests) == 1     # one online request: the repair
        repair = fake.requests[0]["messages"]
        assert repair[2] == {"role": "assistant", "content": json.dumps({"queries": ["a"]})}
    m = manifest(out)
    assert m["counts"]["accepted"] == 12 and m["counts"]["repaired"] == 1 and m["usage"]["requests"] == 13
    store = sqlite3.connect(out / "cache.sqlite")
    assert store.execute("SELECT status, SUM(requests) FROM answers GROUP BY status").fetchall() == [("ok", 13)]
    store.close()


def test_a_batch_status_of_another_shape_is_taken_as_still_running(tmp_path, captions, sample_captions, capsys):
    out = tmp_path / "out"
    with FakeBatch() as fake:
        assert run(captions, out, fake) == EXIT_PENDING
        [b] = fake.batches.values()
        b["status"] = 42
        assert run(captions, out, fake) == EXIT_PENDING
        assert "unknown status 'int 42'; taken as still running" in capsys.readouterr().err
        b["status"] = "finalizing"
        assert run(captions, out, fake, *WAIT) == EXIT_OK
        assert len(fake.batches) == 1
    answered_once(out, sample_captions[:12])


def test_an_output_file_that_cannot_be_downloaded_leaves_the_batch_to_the_next_run(tmp_path, captions,
                                                                                   sample_captions):
    out = tmp_path / "out"
    with FakeBatch() as fake:
        assert run(captions, out, fake) == EXIT_PENDING
        [b] = fake.batches.values()
        for _ in range(3):
            fake._advance(b)                            # completed, with an output file
        hidden = fake.files.pop(b["output_file_id"])    # gone from the provider for a while
        assert run(captions, out, fake) == EXIT_PENDING  # no answer lost: the batch stays open
        fake.files[b["output_file_id"]] = hidden
        assert run(captions, out, fake) == EXIT_OK
        assert len(fake.batches) == 1 and sorted(sent(fake).values()) == [1] * 12
    answered_once(out, sample_captions[:12])


def test_a_caption_is_never_reserved_for_two_live_batches(tmp_path):
    from gen.store import AnswerStore, BatchRequest, StoreError
    store = AnswerStore(tmp_path / "cache.sqlite")
    req = BatchRequest("k1", "cr.1", "一只猫", 0, 0, 0)
    store.reserve_batch("d1", [req])
    with pytest.raises(StoreError, match="another run sharing the store"):
        store.reserve_batch("d2", [BatchRequest("k2", "cr.2", "两只狗", 0, 0, 0), req])
    assert [b.digest for b in store.open_batches()] == ["d1"] and not store.pending("k2")   # all or nothing
    store.close_batch("d1", "completed", None)
    store.reserve_batch("d2", [req])                       # free again once its batch is closed
    assert store.batch_requests("d2").keys() == {"k1"}
    store.close()


def once(method: str, path: str, fault: str):
    """A route_fault: `fault` on the first call of `method` to `path` (a prefix), then none."""
    done = []

    def fault_at(m, p, query):
        if m == method and p.startswith(path) and not done:
            done.append(p)
            return fault
        return None
    return fault_at


@pytest.mark.parametrize("fault", ["lost", "502"])
def test_a_create_whose_reply_is_lost_is_not_sent_again_and_its_batch_is_collected(
        tmp_path, captions, sample_captions, capsys, fault):
    out = tmp_path / "out"
    with FakeBatch(route_fault=once("POST", "/v1/batches", fault)) as fake:
        assert run(captions, out, fake, *WAIT) == EXIT_OK
        assert fake.calls.count(("POST", "/v1/batches")) == 1 and len(fake.batches) == 1
        assert "created although POST /batches failed" in capsys.readouterr().err
        assert sorted(sent(fake).values()) == [1] * 12
    answered_once(out, sample_captions[:12])


def test_a_batch_404_from_a_server_without_the_batch_api_leaves_the_batch_open(
        tmp_path, captions, sample_captions, capsys):
    out = tmp_path / "out"
    with FakeBatch(steps=2) as fake:
        assert run(captions, out, fake) == EXIT_PENDING
        # the wrong --base-url for a while: every batches route 404s, the batch's included
        fake.route_fault = lambda method, path, query: "404" if path.startswith("/v1/batches") else None
        assert run(captions, out, fake) == EXIT_FAILED
        store = sqlite3.connect(out / "cache.sqlite")
        assert store.execute("SELECT batch_id, status FROM batches").fetchall() == [("batch-000002", "live")]
        store.close()
        assert "has no batch API (HTTP 404 on GET /batches)" in capsys.readouterr().err
        fake.route_fault = lambda method, path, query: None
        assert run(captions, out, fake, *WAIT) == EXIT_OK
        assert len(fake.batches) == 1 and sorted(sent(fake).values()) == [1] * 12
    answered_once(out, sample_captions[:12])


def test_a_batch_the_provider_no_longer_knows_is_closed_and_its_captions_submitted_again(
        tmp_path, captions, sample_captions, capsys):
    out = tmp_path / "out"
    with FakeBatch(steps=2) as fake:
        assert run(captions, out, fake) == EXIT_PENDING
        del fake.batches["batch-000002"]    # the batches API answers; this batch is gone
        assert run(captions, out, fake, *WAIT) == EXIT_OK
        assert "the provider no longer knows this batch" in capsys.readouterr().err
        assert len(fake.batches) == 1 and sorted(sent(fake).values()) == [2] * 12
    answered_once(out, sample_captions[:12])


def test_a_listing_that_fails_pages_down_is_a_clear_error_and_the_rerun_finds_the_batch(
        tmp_path, captions, capsys, monkeypatch):
    import openai
    out = tmp_path / "out"

    def crash(name):
        if name == "created":
            raise Killed(name)
    with FakeBatch(page_cap=2) as fake:
        monkeypatch.setattr(gen.generate.batch, "checkpoint", crash)
        with pytest.raises(Killed):
            run(captions, out, fake)
        monkeypatch.setattr(gen.generate.batch, "checkpoint", lambda name: None)
        client = openai.OpenAI(base_url=fake.base_url, api_key="x")
        for i in range(5):   # other jobs' batches since: ours is on the third page
            f = client.files.create(file=(f"other-{i}.jsonl", b'{"custom_id": "x"}\n'), purpose="batch")
            client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        fake.route_fault = lambda method, path, query: "500" if path == "/v1/batches" and "after" in query else None
        capsys.readouterr()
        assert run(captions, out, fake, *WAIT) == EXIT_FAILED
        log = capsys.readouterr().err
        assert "GET /batches (next page) failed: HTTP 500" in log and "unexpected failure" not in log
        fake.route_fault = lambda method, path, query: None
        assert run(captions, out, fake, *WAIT) == EXIT_OK
        assert len(fake.batches) == 6 and sorted(n for k, n in sent(fake).items() if k != "x") == [1] * 12


def test_a_file_cut_off_mid_download_is_a_warning_and_the_next_run_downloads_it_whole(
        tmp_path, captions, sample_captions, capsys):
    out = tmp_path / "out"
    with FakeBatch() as fake:
        assert run(captions, out, fake) == EXIT_PENDING
        fake.route_fault = lambda method, path, query: "cut" if path.endswith("/content") else None
        assert run(captions, out, fake, *WAIT) == EXIT_PENDING
        log = capsys.readouterr().err
        assert "/content failed: RemoteProtocolError" in log and "unexpected failure" not in log
        assert manifest(out)["counts"]["captions_with_queries"] == 0
        fake.route_fault = lambda method, path, query: None
        assert run(captions, out, fake) == EXIT_OK
        assert len(fake.batches) == 1 and sorted(sent(fake).values()) == [1] * 12
    answered_once(out, sample_captions[:12])


def two_finished_batches(fake, captions, out) -> tuple[dict, dict]:
    """The 12 captions submitted in two batches of 6, both finished at the fake, none collected."""
    assert run(captions, out, fake, "--batch-max-requests", "6") == EXIT_PENDING
    first, second = fake.batches.values()
    for b in (first, second):
        while b["status"] != "completed":
            fake._advance(b)
    return first, second


def test_a_batch_whose_status_cannot_be_read_stays_open_and_the_others_are_collected(
        tmp_path, captions, sample_captions, capsys):
    out = tmp_path / "out"
    with FakeBatch(steps=100) as fake:
        first, second = two_finished_batches(fake, captions, out)
        broken = f"/v1/batches/{first['id']}"
        fake.route_fault = lambda method, path, query: "500" if path == broken else None
        assert run(captions, out, fake) == EXIT_PENDING
        log = capsys.readouterr().err
        assert f"batch {first['id']}: GET /batches/{first['id']} failed: HTTP 500" in log and "Traceback" not in log
        m = manifest(out)
        assert [c["batch_id"] for c in m["batch"]["collected"]] == [second["id"]]
        assert m["counts"]["captions_with_queries"] == 6 and m["counts"]["pending"] == 6
        fake.calls.clear()   # --wait checks --max-attempts (2) times (each a request and the SDK's retry)
        assert run(captions, out, fake, *WAIT) == EXIT_PENDING
        assert fake.calls.count(("GET", broken)) == 2 * 2
        fake.route_fault = lambda method, path, query: None
        assert run(captions, out, fake) == EXIT_OK
        assert len(fake.batches) == 2 and sorted(sent(fake).values()) == [1] * 12
    answered_once(out, sample_captions[:12])


def test_a_file_that_fails_to_download_leaves_its_batch_open_and_the_others_are_collected(
        tmp_path, captions, sample_captions, capsys):
    out = tmp_path / "out"
    with FakeBatch(steps=100) as fake:
        first, second = two_finished_batches(fake, captions, out)
        broken = f"/v1/files/{first['output_file_id']}/content"
        fake.route_fault = lambda method, path, query: "404" if path == broken else None
        assert run(captions, out, fake) == EXIT_PENDING
        log = capsys.readouterr().err
        assert f"batch {first['id']} (completed): GET /files/{first['output_file_id']}/content failed" in log
        assert "it stays open" in log
        m = manifest(out)
        assert [c["batch_id"] for c in m["batch"]["collected"]] == [second["id"]]
        assert m["counts"]["captions_with_queries"] == 6 and m["counts"]["pending"] == 6
        # --wait tries the download --max-attempts (2) times, then leaves the batch open
        fake.calls.clear()
        assert run(captions, out, fake, *WAIT) == EXIT_PENDING
        assert fake.calls.count(("GET", broken)) == 2
        # --batch-cancel cancels the batch still running, and leaves the finished one open
        assert run(write_jsonl(tmp_path / "more.jsonl", sample_captions[:14]), out, fake) == EXIT_PENDING
        assert run(captions, out, fake, "--batch-cancel") == EXIT_OK
        assert [b["status"] for b in fake.batches.values()] == ["completed", "completed", "cancelling"]
        fake.route_fault, fake.steps = (lambda method, path, query: None), 1
        assert run(tmp_path / "more.jsonl", out, fake, *WAIT) == EXIT_OK
        # the cancelled batch answered one of its two captions; the other went into a fourth
        assert len(fake.batches) == 4 and sorted(sent(fake).values()) == [1] * 13 + [2]
    answered_once(out, sample_captions[:14])
