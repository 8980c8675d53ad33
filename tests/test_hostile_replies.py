"""Hostile OpenAI-compatible servers: whatever a reply holds (any shape, size, encoding or
content), and whatever the answer store holds, the run goes on; an unusable answer is a
reject with its reason, never stored as final, and a rerun asks again."""
import asyncio
import json
import sqlite3
import tracemalloc
from pathlib import Path

import pytest
from conftest import read_jsonl, read_rows, write_jsonl
from fake_openai import FakeOpenAI, default_answer

from gen.config import Sampling
from gen.engines import EngineError, RetryPolicy
from gen.engines.base import Completion
from gen.engines.openai import OpenAIEngine, _completion
from gen.engines.pool import Server, ServerPool
from gen.engines.retry import EmptyAnswer
from gen.run import EXIT_INCOMPLETE, EXIT_OK, main
from gen.generate.validate import AnswerError, parse_answer
from schemas import answer_json_schema


def run(captions: Path, out: Path, servers, *extra: str) -> int:
    urls = [a for s in (servers if isinstance(servers, list) else [servers]) for a in ("--base-url", s.base_url)]
    return main(["--captions", str(captions), "--out", str(out), *urls, "--model", "fake-model",
                 "--no-progress", "--retry-wait", "0.01", "--timeout", "5", *extra])


@pytest.fixture
def captions(tmp_path, sample_captions):
    return write_jsonl(tmp_path / "caps.jsonl", sample_captions[:12])


def always(fault, text=None):
    """The fault for every request (for the caption `text` only, when given)."""
    return lambda i, caption: fault if text is None or caption == text else None


def with_queries(out: Path) -> set:
    return {r["caption_id"] for r in read_rows(out / "queries.parquet")}


def servers(out: Path) -> list[dict]:
    return json.loads((out / "manifest.json").read_text())["engine"]["servers"]


# --------------------------------------------------------------------------- answers that poison the store

def test_a_lone_surrogate_in_an_answer_is_a_reject_and_a_rerun_asks_again(tmp_path, captions, sample_captions):
    target = sample_captions[0]
    out = tmp_path / "out"
    with FakeOpenAI(faults=always("lone_surrogate", target["text"])) as bad:
        assert run(captions, out, bad, "--max-attempts", "2") == EXIT_INCOMPLETE
        assert bad.count_for(target["text"]) == 2    # retried, never sent back in a repair round
    (rej,) = read_jsonl(out / "rejects.jsonl")
    assert rej["caption_id"] == target["id"]
    assert "lone surrogate '\\ud800'" in rej["reason"] and "a rerun will ask again" in rej["reason"]
    with FakeOpenAI() as good:
        assert run(captions, out, good) == EXIT_OK
        assert len(good.requests) == 1 and good.count_for(target["text"]) == 1
    assert with_queries(out) == {c["id"] for c in sample_captions[:12]}


def test_answers_damaged_in_the_store_are_rejects_and_asked_again(tmp_path, captions, sample_captions):
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert run(captions, out, fake) == EXIT_OK
        db = sqlite3.connect(out / "cache.sqlite")
        keys = [k for (k,) in db.execute("SELECT key FROM answers ORDER BY key")]
        db.execute("UPDATE answers SET answer = substr(answer, 1, 40) WHERE key = ?", (keys[0],))
        db.execute("UPDATE answers SET answer = CAST(x'7b22ff227d' AS TEXT) WHERE key = ?", (keys[1],))
        db.execute("UPDATE answers SET answer = '{\"entities\": 5}' WHERE key = ?", (keys[2],))
        db.execute("UPDATE answers SET status = 'rejected', answer = NULL, reason = CAST(x'ff' AS TEXT), "
                   "requests = 9 WHERE key = ?", (keys[3],))
        db.commit()
        db.close()
        # No JSON there (cut short, not UTF-8): asked again at once. JSON of the wrong shape, or
        # a row not UTF-8 elsewhere: a reject with the reason, dropped from the store, exit 3.
        assert run(captions, out, fake) == EXIT_INCOMPLETE
        assert len(fake.requests) == 12 + 2
        rejects = read_jsonl(out / "rejects.jsonl")
        assert len(rejects) == 2 and all("the stored answer cannot be read" in r["reason"]
                                         and "a rerun will ask again" in r["reason"] for r in rejects)
        assert len(with_queries(out)) == 10
        assert run(captions, out, fake) == EXIT_OK
        assert len(fake.requests) == 12 + 2 + 2
        assert run(captions, out, fake) == EXIT_OK and len(fake.requests) == 16
    assert read_jsonl(out / "rejects.jsonl") == []
    assert with_queries(out) == {c["id"] for c in sample_captions[:12]}


# --------------------------------------------------------------------------- answers that must not be final

@pytest.mark.parametrize("fault", ["empty_content", "refusal"])
def test_empty_or_refused_answers_are_retried_never_stored(tmp_path, captions, fault):
    out = tmp_path / "out"
    with FakeOpenAI(faults=always(fault)) as bad:
        assert run(captions, out, bad, "--max-attempts", "2") == EXIT_INCOMPLETE
        assert len(bad.requests) == 12 * 2
    rejects = read_jsonl(out / "rejects.jsonl")
    reason = "the model refused: I can't help with that." if fault == "refusal" else "the answer is empty"
    assert len(rejects) == 12 and all(reason in r["reason"] and "rerun will ask again" in r["reason"]
                                      for r in rejects)
    with FakeOpenAI() as good:
        assert run(captions, out, good) == EXIT_OK
        assert len(good.requests) == 12


def test_refusals_stored_by_an_older_capgen_are_asked_again(tmp_path, captions):
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert run(captions, out, fake) == EXIT_OK
        db = sqlite3.connect(out / "cache.sqlite")
        key = db.execute("SELECT key FROM answers LIMIT 1").fetchone()[0]
        # What earlier versions stored for a refusal: a final rejection with an empty answer.
        db.execute("UPDATE answers SET status = 'rejected', answer = NULL, raw = '', requests = 2, "
                   "reason = 'invalid answer after a repair round: the model refused: no' WHERE key = ?", (key,))
        db.commit()
        db.close()
        assert run(captions, out, fake) == EXIT_OK
        assert len(fake.requests) == 12 + 1   # that one only: the good answers are kept
        assert run(captions, out, fake) == EXIT_OK and len(fake.requests) == 13
    assert len(with_queries(out)) == 12


def test_a_fast_refusing_server_is_taken_out_and_a_rerun_has_nothing_to_ask(tmp_path, sample_captions):
    caps = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:20])
    out = tmp_path / "out"
    with FakeOpenAI(faults=always("refusal")) as bad, FakeOpenAI(latency=0.05) as good:
        assert run(caps, out, [bad, good], "--concurrency", "8") == EXIT_OK
        assert len(good.requests) == 20 and len(bad.requests) < 15
    assert [s["taken_out"] >= 1 for s in servers(out)] == [True, False]
    with FakeOpenAI() as good:
        assert run(caps, out, good) == EXIT_OK
        assert good.requests == []
    assert with_queries(out) == {c["id"] for c in sample_captions[:20]}


def test_a_server_whose_answers_fail_validation_far_more_often_is_taken_out(tmp_path, sample_captions):
    caps = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:40])
    out = tmp_path / "out"
    with FakeOpenAI(faults=always("wrong_shape")) as bad, FakeOpenAI(latency=0.05) as good:
        assert run(caps, out, [bad, good], "--concurrency", "8") in (EXIT_OK, EXIT_INCOMPLETE)
        # Out after 10 answers (and the 8 at most then in flight); fastest, it took most
        # requests before, and its invalid answers were stored as final rejections.
        assert len(bad.requests) <= 10 + 8
    assert [s["taken_out"] for s in servers(out)] == [1, 0]
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["rejected"] == 0 and counts["accepted"] + counts["failed"] == 40
    with FakeOpenAI() as good:   # what the bad server spoiled is asked again, nothing else
        assert run(caps, out, good) == EXIT_OK
        assert len(good.requests) == counts["failed"]
    assert with_queries(out) == {c["id"] for c in sample_captions[:40]}


def test_a_repair_round_asks_another_server_than_the_one_whose_answer_failed(tmp_path, sample_captions):
    """Before the pool has seen enough of a broken server to take it out, its invalid answer
    must not become a caption's final rejection on its own say: the repair round goes to
    another server (while the good one is busy, the broken one would be least loaded)."""
    caps = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:2])
    out = tmp_path / "out"
    with FakeOpenAI(faults=always("wrong_shape")) as bad, FakeOpenAI(latency=0.5) as good:
        assert run(caps, out, [bad, good], "--concurrency", "2", "--repair-rounds", "1", "--no-curate") == EXIT_OK
        assert len(bad.requests) == 1 and len(good.requests) == 2
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["rejected"] == 0 and counts["accepted"] == 2


def test_invalid_answers_alike_everywhere_take_no_server_out():
    now = [0.0]
    a, b = Server("a", None), Server("b", None)
    pool = ServerPool([a, b], clock=lambda: now[0])
    for i in range(200):   # a weak model: 60% invalid on both
        for s in (a, b):
            assert pool.checked(s, valid=i % 5 < 2) is False
    assert a.taken_out == b.taken_out == 0
    lone = ServerPool([Server("c", None)])
    assert not any(lone.checked(lone.servers[0], valid=False) for _ in range(50))
    assert lone.servers[0].taken_out == 0
    a, b = Server("a", None), Server("b", None)
    pool = ServerPool([a, b], clock=lambda: now[0])
    for _ in range(9):     # a broken one beside a good peer: suspect at once, out at 10 answers
        pool.checked(a, valid=True)
        assert pool.checked(b, valid=False) is True and b.taken_out == 0
    assert pool.checked(b, valid=False) is True and b.taken_out == 1 and b.down_until == 30.0
    assert all(pool.pick() is a for _ in range(3))
    assert pool.checked(b, valid=False) is True   # an answer still in flight: the server's fault


# --------------------------------------------------------------------------- size and decoding limits

def test_an_oversized_reply_is_cut_off_never_stored_whole_nor_sent_back(tmp_path, captions, sample_captions):
    target = sample_captions[0]
    out = tmp_path / "out"
    with FakeOpenAI(faults=always("oversized", target["text"]), oversized_bytes=20_000_000) as fake:
        assert run(captions, out, fake, "--max-attempts", "2") == EXIT_INCOMPLETE
        assert fake.count_for(target["text"]) == 2
        assert max(len(json.dumps(b, ensure_ascii=False)) for b in fake.requests) < 20_000
    (rej,) = read_jsonl(out / "rejects.jsonl")
    assert "reply larger than 131,072 bytes" in rej["reason"] and rej["caption_id"] == target["id"]
    assert (out / "cache.sqlite").stat().st_size < 1_000_000 and (out / "rejects.jsonl").stat().st_size < 2_000
    # The limit follows --max-tokens: 300 kB is past 1,024 tokens' limit, inside 4,096 tokens'.
    with FakeOpenAI(faults=always("oversized"), oversized_bytes=300_000) as fake:
        assert run(captions, tmp_path / "small", fake, "--max-attempts", "1") == EXIT_INCOMPLETE
        assert run(captions, tmp_path / "large", fake, "--max-tokens", "4096") == EXIT_OK
        assert len(fake.requests) == 24


def engine(fake, max_tokens=1024):
    return OpenAIEngine(base_urls=[fake.base_url], model="fake-model", schema=answer_json_schema(),
                        sampling=Sampling(max_tokens=max_tokens), timeout=30,
                        retry=RetryPolicy(max_attempts=1, initial=0.01))


MESSAGES = [{"role": "system", "content": "说明"}, {"role": "user", "content": "描述：一只黑猫睡在窗台上晒太阳\n输出："}]


def test_a_gzip_bomb_is_decompressed_only_up_to_the_reply_limit():
    async def five(fake):
        e = engine(fake)
        try:
            return await asyncio.gather(*(e.complete(MESSAGES) for _ in range(5)), return_exceptions=True)
        finally:
            await e.aclose()

    with FakeOpenAI(faults=always("gzip_bomb"), bomb_bytes=200 << 20) as fake:
        fake._bomb({})   # the fake's own padding, deflated once, outside the measurement
        tracemalloc.start()
        try:
            results = asyncio.run(five(fake))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert fake.timings and all(t["status"] == 200 for t in fake.timings)
    assert all(isinstance(r, EngineError) and "larger than" in str(r) for r in results)
    assert peak < 20_000_000   # 5 x 200 MB without the limit

    async def one(fake):   # a gzipped reply inside the limit is read as any other
        e = engine(fake, max_tokens=32_768)
        try:
            return await e.complete(MESSAGES)
        finally:
            await e.aclose()

    with FakeOpenAI(faults=always("gzip_bomb"), bomb_bytes=1 << 20) as fake:
        done = asyncio.run(one(fake))
    assert parse_answer(done.text, "一只黑猫睡在窗台上晒太阳").entities


# --------------------------------------------------------------------------- replies of any shape

@pytest.mark.parametrize("fault, reason", [
    ("content_not_string", "the reply's message content is an object, not text"),
    ("message_not_object", "the reply's message is a string, not an object"),
    ("choices_not_list", "the reply's choices are an object, not a list"),
])
def test_a_reply_of_another_shape_is_a_reject_with_its_reason(tmp_path, captions, fault, reason):
    out = tmp_path / "out"
    with FakeOpenAI(faults=always(fault)) as bad:
        assert run(captions, out, bad, "--max-attempts", "2") == EXIT_INCOMPLETE
    rejects = read_jsonl(out / "rejects.jsonl")
    assert len(rejects) == 12 and all(reason in r["reason"] for r in rejects)
    with FakeOpenAI() as good:
        assert run(captions, out, good) == EXIT_OK and len(good.requests) == 12


def _nested(caption: str) -> str:
    return '{"entities": ' + "[" * 50_000 + "]" * 50_000 + "}"   # 100 kB: inside the reply limit


def _long_integer(caption: str) -> str:
    # Python refuses int("9" * 5000) (the 4,300-digit limit) with a ValueError that is no
    # JSONDecodeError: 5 kB, well inside the reply limit.
    return _edited(caption, lambda d: d["entities"][0].update(grade="HUGE")).replace('"HUGE"', "9" * 5000)


@pytest.mark.parametrize("answer,reason", [(_nested, "nested too deeply"), (_long_integer, "not readable JSON")],
                         ids=["nested_past_the_stack", "integer_too_long_to_read"])
def test_an_answer_json_cannot_read_is_an_invalid_answer(tmp_path, captions, sample_captions, answer, reason):
    target = sample_captions[0]
    bad = answer(target["text"])
    out = tmp_path / "out"
    with FakeOpenAI(answer=lambda caption, body: bad if caption == target["text"] else default_answer(caption)) as fake:
        assert run(captions, out, fake) == EXIT_OK
        assert fake.count_for(target["text"]) == 2   # the repair round saw the error, not a traceback
    (rej,) = read_jsonl(out / "rejects.jsonl")
    assert rej["caption_id"] == target["id"] and reason in rej["reason"]


def test_usage_of_the_wrong_type_counts_nothing_and_keeps_the_answer(tmp_path, captions):
    out = tmp_path / "out"
    with FakeOpenAI(faults=always("usage_wrong_type")) as fake:
        assert run(captions, out, fake) == EXIT_OK
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["accepted"] == 12
    assert (m["usage"]["prompt_tokens"], m["usage"]["completion_tokens"]) == (0, 0)


SHAPES = [None, 1, "x", [], [1], {}, {"choices": None}, {"choices": "abc"}, {"choices": {"0": {}}},
          {"choices": [None]}, {"choices": [[]]}, {"choices": [{}]}, {"choices": [{"message": None}]},
          {"choices": [{"message": ["a"]}]}, {"choices": [{"message": {}}]},
          {"choices": [{"message": {"content": 5}}]}, {"choices": [{"message": {"content": ["a", 1]}}]},
          {"choices": [{"message": {"content": [{"text": None}]}}]},
          {"choices": [{"message": {"content": "   "}}]},
          {"choices": [{"message": {"content": None, "refusal": "no \ud800" * 99}}]},
          {"choices": [{"message": {"content": "{}\udfff"}}]},
          {"choices": [{"message": {"content": None, "reasoning_content": {"a": 1}}}]}]
GOOD = [({"choices": [{"message": {"content": "{}"}, "finish_reason": 7}], "usage": {"prompt_tokens": True}}, "{}"),
        ({"choices": [{"message": {"content": [{"type": "text", "text": "{"}, {"text": "}"}]}}],
          "usage": {"prompt_tokens": 10 ** 30, "completion_tokens": -1}}, "{}"),
        ({"choices": [{"message": {"content": "", "reasoning_content": "{\"a\": 1}"}}], "usage": []}, "{\"a\": 1}")]


def test_every_reply_shape_is_an_answer_or_a_retried_failure_never_a_traceback():
    for data in SHAPES:
        with pytest.raises(EmptyAnswer) as err:
            _completion(data)
        str(err.value).encode("utf-8")   # its reason can be written anywhere
    for data, text in GOOD:
        done = _completion(data, "http://a")
        assert done == Completion(text=text, server="http://a")


def _edited(caption: str, edit) -> str:
    data = json.loads(default_answer(caption))
    edit(data)
    return json.dumps(data)


def test_a_lone_surrogate_in_a_dropped_query_is_kept_in_the_rejects_and_a_rerun_reads_it(
        tmp_path, captions, sample_captions):
    """One entity's text is the \\udc00 escape: the item is dropped, the rest of the answer
    kept; rejects.jsonl keeps the item as the server sent it (escaped), and the stored answer
    goes through the same export on every rerun."""
    target = sample_captions[0]
    bad = _edited(target["text"], lambda d: d["entities"].append({"text": "\udc00x", "kind": "object", "grade": 1}))
    assert "\\udc00" in bad
    out = tmp_path / "out"
    with FakeOpenAI(answer=lambda caption, body: bad if caption == target["text"] else default_answer(caption)) as fake:
        assert run(captions, out, fake, "--repair-rounds", "0") == EXIT_OK
    dropped = [r for r in read_jsonl(out / "rejects.jsonl") if r["stage"] == "query"]
    assert [(r["caption_id"], r["raw"]["text"]) for r in dropped] == [(target["id"], "\udc00x")]
    assert target["id"] in with_queries(out)
    with FakeOpenAI() as fake:
        assert run(captions, out, fake, "--repair-rounds", "0") == EXIT_OK
        assert fake.requests == []
    assert [r["raw"] for r in read_jsonl(out / "rejects.jsonl") if r["stage"] == "query"] == [d["raw"] for d in dropped]


def test_a_refusal_whose_message_holds_a_lone_surrogate_is_written_escaped_to_the_manifest(tmp_path, captions):
    out = tmp_path / "out"
    with FakeOpenAI() as good, FakeOpenAI(faults=always("403_surrogate")) as bad:
        assert run(captions, out, [bad, good]) == EXIT_OK
        assert len(good.requests) == 12
    (refused,) = [s["refused"] for s in servers(out) if "refused" in s]
    assert "HTTP 403" in refused and "model \\ud800" in refused


@pytest.mark.parametrize("answer_grade", [True, 1.0])
def test_a_grade_of_true_is_no_grade(answer_grade, sample_captions):
    caption = sample_captions[0]["text"]
    text = _edited(caption, lambda d: d["entities"][0].update(grade=answer_grade))
    if answer_grade is True:   # true might mean the top grade, or 1: neither is safe to keep
        with pytest.raises(AnswerError, match="a grade is a number, not true or false"):
            parse_answer(text, caption)
    else:                      # 1.0 is the number 1
        assert parse_answer(text, caption).entities[0].grade == 1


def test_a_judges_true_or_false_is_no_grade():
    from schemas.judge import Judgement
    with pytest.raises(ValueError, match="not true or false"):
        Judgement.model_validate_json('{"grades": [true, false, 2]}')
    assert Judgement.model_validate_json('{"grades": [1, 0, 2.0]}').grades == [1, 0, 2]
