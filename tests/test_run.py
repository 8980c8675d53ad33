"""The spine end to end against the fake OpenAI-compatible server: outputs, resume, repair."""
import json
import logging
from pathlib import Path

import pytest
from conftest import read_jsonl, read_rows, write_jsonl
from fake_openai import FakeOpenAI, default_answer

from gen.run import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, main


def run(captions: Path, out: Path, fake: FakeOpenAI, *extra: str) -> int:
    return main(["--captions", str(captions), "--out", str(out), "--base-url", fake.base_url,
                 "--model", "fake-model", "--no-progress", "--retry-wait", "0.01",
                 "--timeout", "2", *extra])


@pytest.fixture
def captions(tmp_path, sample_captions):
    return write_jsonl(tmp_path / "caps.jsonl", sample_captions[:12])


def test_outputs_every_caption_with_records_rejects_and_manifest(tmp_path, captions, sample_captions):
    bad = tmp_path / "mixed.jsonl"
    bad.write_text(captions.read_text(encoding="utf-8") + "{broken\n" + '{"id": "cr.0", "text": "重复"}\n',
                   encoding="utf-8")
    with FakeOpenAI() as fake:
        assert run(bad, tmp_path / "out", fake) == EXIT_OK
        assert len(fake.requests) == 12
    out = tmp_path / "out"
    rows = read_rows(out / "queries.parquet")
    assert {r["caption_id"] for r in rows} == {c["id"] for c in sample_captions[:12]}
    assert {"entity", "hypernym", "event", "summary"} <= {r["type"] for r in rows}
    assert all(r["model"] == "fake-model" and r["grade"] in (1, 2) and r["salience"] >= 1 for r in rows)
    rejects = read_jsonl(out / "rejects.jsonl")
    assert [(r["line"], r["stage"]) for r in rejects] == [(13, "input"), (14, "input")]
    assert "duplicate id 'cr.0'" in rejects[1]["reason"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["captions"] == 12 and m["counts"]["input_rejects"] == 2
    assert m["counts"]["queries"] == len(rows) and m["usage"]["requests"] == 12
    assert m["engine"]["response_format"] == "json_schema" and m["model"] == "fake-model"
    assert len(read_rows(out / "captions.parquet")) == 12
    # the schema went to the server as the decoding constraint
    rf = fake.requests[0]["response_format"]
    assert rf["type"] == "json_schema" and "entities" in rf["json_schema"]["schema"]["properties"]
    assert fake.requests[0]["chat_template_kwargs"] == {"enable_thinking": False}


def test_gzipped_captions_give_the_plain_files_outputs(tmp_path, captions, monkeypatch):
    import gzip
    packed = tmp_path / "caps.jsonl.gz"
    packed.write_bytes(gzip.compress(captions.read_bytes()))
    monkeypatch.chdir(tmp_path)
    with FakeOpenAI() as fake:
        assert run(captions, tmp_path / "plain", fake) == EXIT_OK
        assert main(["--captions", str(packed), "--base-url", fake.base_url, "--model", "fake-model",
                     "--no-progress"]) == EXIT_OK   # the default --out: outputs/caps/, as for caps.jsonl
        assert len(fake.requests) == 12 * 2
    assert read_rows(tmp_path / "outputs" / "caps" / "queries.parquet") == read_rows(tmp_path / "plain" / "queries.parquet")


def test_a_file_with_no_caption_in_it_is_bad_input_not_an_empty_success(tmp_path, capsys):
    csv = tmp_path / "caps.csv"
    csv.write_text("id,text\ncr.0,一只猫\ncr.1,两只狗\n", encoding="utf-8")
    with FakeOpenAI() as fake:
        assert run(csv, tmp_path / "out", fake) == EXIT_USAGE
        assert fake.requests == []
    assert [r["line"] for r in read_jsonl(tmp_path / "out" / "rejects.jsonl")] == [1, 2, 3]  # kept all the same
    err = capsys.readouterr().err
    assert "no line of" in err and "check the file's format" in err


def test_rerun_makes_no_calls_and_new_captions_pay_only_for_themselves(tmp_path, captions, sample_captions):
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert run(captions, out, fake) == EXIT_OK
        first = read_rows(out / "queries.parquet")
        assert run(captions, out, fake) == EXIT_OK
        assert len(fake.requests) == 12  # the rerun asked nothing
        assert read_rows(out / "queries.parquet") == first  # and wrote the same, no duplicates
        more = write_jsonl(tmp_path / "more.jsonl", sample_captions[:15])
        assert run(more, out, fake) == EXIT_OK
        assert len(fake.requests) == 15
        assert {fake.count_for(c["text"]) for c in sample_captions[:15]} == {1}
        assert run(more, out, fake, "--force") == EXIT_OK
        assert len(fake.requests) == 30



@pytest.mark.parametrize("concurrency", ["1", "8"])  # duplicates after the first is stored / while in flight
def test_identical_texts_under_different_ids_cost_one_request(tmp_path, sample_captions, concurrency):
    texts = [c["text"] for c in sample_captions[:4]]
    caps = write_jsonl(tmp_path / "caps.jsonl", [{"id": f"{i}-{t}", "text": texts[t]}
                                                 for i in range(3) for t in range(4)])
    out = tmp_path / "out"
    with FakeOpenAI(latency=0.05) as fake:
        assert run(caps, out, fake, "--concurrency", concurrency) == EXIT_OK
        assert len(fake.requests) == 4
        assert run(caps, out, fake, "--concurrency", concurrency, "--force") == EXIT_OK
        assert len(fake.requests) == 8  # forced: each text once more, not once per id
    assert len({r["caption_id"] for r in read_rows(out / "queries.parquet")}) == 12
    assert json.loads((out / "manifest.json").read_text())["counts"]["cached"] == 8

def test_changing_the_template_or_sampling_pays_again(tmp_path, captions):
    out = tmp_path / "out"
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for f in Path("prompts").glob("*.j2"):
        (prompts / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    with FakeOpenAI() as fake:
        run(captions, out, fake, "--prompts", str(prompts))
        run(captions, out, fake, "--prompts", str(prompts), "--concurrency", "3", "--timeout", "9")
        assert len(fake.requests) == 12  # concurrency and timeouts are not in the fingerprint
        (prompts / "queries.system.j2").write_text("新的说明", encoding="utf-8")
        run(captions, out, fake, "--prompts", str(prompts))
        assert len(fake.requests) == 24
        run(captions, out, fake, "--prompts", str(prompts), "--temperature", "0.9")
        assert len(fake.requests) == 36


def test_invalid_answer_gets_one_repair_round_with_the_error(tmp_path, captions, sample_captions):
    target = sample_captions[0]["text"]
    calls = {"n": 0}

    def answer(caption, body):
        if caption == target and len(body["messages"]) == 2:
            return json.dumps({"entities": []})  # wrong: needs at least one
        return default_answer(caption)

    with FakeOpenAI(answer=answer) as fake:
        assert run(captions, tmp_path / "out", fake) == EXIT_OK
        repair = [r for r in fake.requests if len(r["messages"]) == 4]
    assert len(repair) == 1
    assert repair[0]["messages"][2]["content"] == json.dumps({"entities": []})
    assert "entities" in repair[0]["messages"][3]["content"]  # the validation error, fed back
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["counts"]["repaired"] == 1 and m["counts"]["accepted"] == 12


BAD = '{"queries": ["x"]}'


def invalid_for(target: dict):
    """The fake's answers: always invalid for `target`, the default answer for the rest."""
    return lambda caption, body: BAD if caption == target["text"] else default_answer(caption)


def test_twice_invalid_goes_to_rejects_with_raw_and_is_not_asked_again(tmp_path, captions, sample_captions):
    target = sample_captions[1]
    out = tmp_path / "out"
    with FakeOpenAI(answer=invalid_for(target)) as fake:
        assert run(captions, out, fake) == EXIT_OK  # a rejected row is data, not a failed run
        assert fake.count_for(target["text"]) == 2
        run(captions, out, fake)
        assert fake.count_for(target["text"]) == 2
    (rej,) = read_jsonl(out / "rejects.jsonl")
    assert rej["caption_id"] == target["id"] and rej["raw"] == BAD
    assert "invalid answer after a repair round" in rej["reason"]
    assert target["id"] not in {r["caption_id"] for r in read_rows(out / "queries.parquet")}


def test_repair_rounds_how_many_and_a_rerun_with_more_asks_only_the_rejected(tmp_path, captions, sample_captions):
    target = sample_captions[1]
    out = tmp_path / "out"
    with FakeOpenAI(answer=invalid_for(target)) as fake:
        assert run(captions, out, fake, "--repair-rounds", "0") == EXIT_OK
        assert fake.count_for(target["text"]) == 1 and len(fake.requests) == 12
        (rej,) = read_jsonl(out / "rejects.jsonl")
        assert "invalid answer (no repair round)" in rej["reason"]
        assert json.loads((out / "manifest.json").read_text())["repair_rounds"] == 0
        # more rounds allowed: the rejected caption is asked again, the accepted ones are not
        assert run(captions, out, fake, "--repair-rounds", "3") == EXIT_OK
        assert fake.count_for(target["text"]) == 1 + 4 and len(fake.requests) == 12 + 4
        # fewer rounds, or the same: nothing is asked again, nothing lost or duplicated
        assert run(captions, out, fake, "--repair-rounds", "2") == EXIT_OK
        assert run(captions, out, fake) == EXIT_OK
        assert len(fake.requests) == 16
    (rej,) = read_jsonl(out / "rejects.jsonl")
    assert rej["caption_id"] == target["id"] and "after 3 repair rounds" in rej["reason"]
    asked = [r["messages"] for r in fake.requests if target["text"] in r["messages"][1]["content"]]
    # each round shows the first exchange and the last answer only: the context does not grow
    assert [len(m) for m in asked] == [2, 2, 4, 4, 4]
    assert {r["caption_id"] for r in read_rows(out / "queries.parquet")} == {c["id"] for c in sample_captions[:12]} - {target["id"]}


def test_dry_run_counts_rejected_answers_a_rerun_with_more_rounds_would_ask_again(tmp_path, captions,
                                                                                 sample_captions, capsys):
    out = tmp_path / "out"
    with FakeOpenAI(answer=invalid_for(sample_captions[1])) as fake:
        assert run(captions, out, fake) == EXIT_OK
    capsys.readouterr()
    for rounds, to_request in (("1", 0), ("2", 1)):
        assert main(["--captions", str(captions), "--out", str(out), "--model", "fake-model", "--dry-run",
                     "--repair-rounds", rounds]) == EXIT_OK
        plan = json.loads(capsys.readouterr().out)
        assert (plan["cached"], plan["to_request"]) == (12 - to_request, to_request)
        assert plan["requests_at_most"] == (1 + int(rounds)) * to_request


def test_an_answer_invalid_in_one_query_keeps_the_rest_and_rejects_that_query(tmp_path, captions,
                                                                          sample_captions):
    target = sample_captions[3]

    def answer(caption, body):
        good = json.loads(default_answer(caption))
        if caption == target["text"]:   # the model repeats the caption as its summary, twice
            good["summaries"] = [caption]
        return json.dumps(good, ensure_ascii=False)

    out = tmp_path / "out"
    with FakeOpenAI(answer=answer) as fake:
        assert run(captions, out, fake) == EXIT_OK
        assert fake.count_for(target["text"]) == 2   # the repair round was tried first
        m = json.loads((out / "manifest.json").read_text())["counts"]
        assert (m["rejected"], m["salvaged"], m["captions_with_queries"]) == (1, 1, 12)
        assert m["rejects_by_stage"] == {"query": 1}
        assert run(captions, out, fake) == EXIT_OK   # from the store: salvaged again, not re-asked
        assert fake.count_for(target["text"]) == 2
    rows = [r for r in read_rows(out / "queries.parquet") if r["caption_id"] == target["id"]]
    want = json.loads(default_answer(target["text"]))
    assert {r["query"] for r in rows if r["type"] == "entity"} == {e["text"] for e in want["entities"]}
    assert not [r for r in rows if r["type"] == "summary"]
    (rej,) = read_jsonl(out / "rejects.jsonl")
    assert (rej["stage"], rej["caption_id"], rej["raw"]) == ("query", target["id"], target["text"])
    assert "repeats the whole caption" in rej["reason"]
    m = json.loads((out / "manifest.json").read_text())["counts"]
    assert (m["cached"], m["rejected"], m["salvaged"], m["captions_with_queries"]) == (12, 0, 1, 12)


def test_a_short_caption_is_asked_for_no_summary_and_needs_no_repair(tmp_path):
    short = "一只猫在沙发上睡觉。"
    long_ = "傍晚的公园里，一位戴帽子的老人在石桌旁和朋友下象棋，旁边围着几个人在看。"
    caps = write_jsonl(tmp_path / "caps.jsonl", [{"id": "s", "text": short}, {"id": "l", "text": long_}])

    def answer(caption, body):   # a model that follows its grammar: no summary where none fits
        good = json.loads(default_answer(caption))
        if body["response_format"]["json_schema"]["schema"]["properties"]["summaries"].get("maxItems") == 0:
            good["summaries"] = []
        return json.dumps(good, ensure_ascii=False)

    out = tmp_path / "out"
    with FakeOpenAI(answer=answer) as fake:
        assert run(caps, out, fake) == EXIT_OK
        assert len(fake.requests) == 2
        limits = {("s" if short in r["messages"][-1]["content"] else "l"):
                  r["response_format"]["json_schema"]["schema"]["properties"]["summaries"]
                  for r in fake.requests}
    assert len(limits) == 2 and limits["s"]["maxItems"] == 0 and limits["l"]["minItems"] == 1
    m = json.loads((out / "manifest.json").read_text())["counts"]
    assert (m["accepted"], m["repaired"], m["salvaged"]) == (2, 0, 0)
    types = {(r["caption_id"], r["type"]) for r in read_rows(out / "queries.parquet")}
    assert ("l", "summary") in types and ("s", "summary") not in types and ("s", "entity") in types


def test_unanswered_captions_exit_3_and_a_rerun_completes_them(tmp_path, captions, sample_captions):
    down = {sample_captions[2]["text"]}
    fault = lambda i, caption: "503" if caption in down else None
    out = tmp_path / "out"
    with FakeOpenAI(faults=fault) as fake:
        assert run(captions, out, fake, "--max-attempts", "3") == EXIT_INCOMPLETE
        assert fake.count_for(sample_captions[2]["text"]) == 3
        (rej,) = read_jsonl(out / "rejects.jsonl")
        assert rej["caption_id"] == sample_captions[2]["id"] and "rerun will ask again" in rej["reason"]
        down.clear()
        assert run(captions, out, fake) == EXIT_OK
        assert len(fake.requests) == 12 + 2 + 1  # only the missing caption was asked again
    assert read_jsonl(out / "rejects.jsonl") == []
    assert len({r["caption_id"] for r in read_rows(out / "queries.parquet")}) == 12


def test_strict_and_missing_file_are_usage_errors(tmp_path, captions):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "猫"}\nnope\n', encoding="utf-8")
    with FakeOpenAI() as fake:
        assert run(bad, tmp_path / "o1", fake, "--strict") == EXIT_USAGE
        assert run(tmp_path / "nope.jsonl", tmp_path / "o2", fake) == EXIT_USAGE


def test_json_logs_and_key_never_logged(tmp_path, captions, monkeypatch, capsys):
    secret = "sk-test-SECRET-123456"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    with FakeOpenAI(faults=lambda i, c: "500" if i == 0 else None) as fake:
        assert run(captions, tmp_path / "out", fake, "--log-format", "json") == EXIT_OK
        assert fake.auth_headers[0] == f"Bearer {secret}"  # sent to the server...
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any("summary" in line for line in lines)
    everything = err + "".join(p.read_text(errors="replace") for p in (tmp_path / "out").glob("*.json*"))
    assert secret not in everything  # ...and nowhere else


def test_second_run_on_same_out_dir_is_refused(tmp_path, captions):
    from gen.run import EXIT_LOCKED, lock_out_dir
    held = lock_out_dir(tmp_path / "out")
    try:
        with FakeOpenAI() as fake:
            assert run(captions, tmp_path / "out", fake) == EXIT_LOCKED
            assert fake.requests == []
    finally:
        held.close()
    with FakeOpenAI() as fake:  # released with its holder: no stale lock
        assert run(captions, tmp_path / "out", fake) == EXIT_OK
