"""The judge stage against the fake server: grades per query, repair, resume, curation use."""
import json

import polars as pl
from conftest import write_jsonl
from curate_helpers import reason_of, rows
from fake_openai import FakeOpenAI

from gen.curate import CurateConfig, curate
from gen.judge import main as judge_main
from gen.judge import parse
from gen.run import main as run_main


def _judge_answer(calls):
    def answer(caption_block: str, body: dict) -> str:
        # The judge's user message: 描述：caption / 查询： / 1. q ...; the fake hands us all of it.
        if "查询：" not in caption_block:   # a generation request
            from fake_openai import default_answer
            return default_answer(caption_block)
        caption, _, listed = caption_block.partition("查询：")
        queries = [line.split(". ", 1)[1] for line in listed.strip().splitlines() if ". " in line]
        calls.append(len(body["messages"]))
        # The decoder is told how many grades: the schema sent with this very request.
        asked = body["response_format"]["json_schema"]["schema"]["properties"]["grades"]
        assert asked["minItems"] == asked["maxItems"] == len(queries), (asked, queries)
        grades = [2 if q in caption else 0 for q in queries]
        if "燃气表" in caption and len(body["messages"]) == 2:
            grades = grades[:-1]            # first answer one grade short: must be repaired
        return json.dumps({"grades": grades})
    return answer


def test_parse_demands_one_grade_per_query():
    assert parse('{"grades": [2, 0, 1]}', 3) == [2, 0, 1]
    for bad, n in (('{"grades": [2, 0]}', 3), ('{"grades": [3]}', 1), ("nope", 1)):
        try:
            parse(bad, n)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def _generated(tmp_path, sample_captions, fake) -> list[str]:
    """Six captions' queries generated through `fake`; the options to judge them the same way."""
    caps = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:6])
    common = ["--captions", str(caps), "--out", str(tmp_path / "out"), "--base-url", fake.base_url,
              "--model", "m", "--no-progress"]
    assert run_main([*common, "--no-curate"]) == 0
    return common


def test_judge_grades_resumes_and_curation_drops_or_regrades(tmp_path, sample_captions):
    out = tmp_path / "out"
    calls: list[int] = []
    with FakeOpenAI(answer=_judge_answer(calls)) as fake:
        common = _generated(tmp_path, sample_captions, fake)
        assert judge_main(common) == 0
        first = len(calls)
        assert first == 6 + 1                     # one request per caption, one repair
        assert judge_main(common) == 0 and len(calls) == first   # rerun: all from judge.sqlite
    j = pl.read_parquet(out / "judgements.parquet")
    q = pl.read_parquet(out / "queries.parquet").unique(["caption_id", "query"])
    assert j.height == q.height and j["judge_grade"].null_count() == 0
    assert set(j["judge_grade"].unique()) <= {0, 2}

    zero = j.filter(pl.col("judge_grade") == 0).row(0, named=True)
    curate(out, CurateConfig(judge="drop", dev_fraction=0.0), out / "s_drop")
    assert reason_of(out / "s_drop", zero["caption_id"], zero["query"]) == "judged_irrelevant"
    # The generator graded some surviving pairs 1; the judge graded them 2, and regrade says so.
    scores = lambda d: {x for r in rows(d) for x in r["pos_scores"]}  # noqa: E731
    curate(out, CurateConfig(judge="drop", dev_fraction=0.0, cross_positives=False), out / "s_d")
    curate(out, CurateConfig(judge="regrade", dev_fraction=0.0, cross_positives=False), out / "s_re")
    assert scores(out / "s_d") == {1.0, 2.0} and scores(out / "s_re") == {2.0}


def test_judge_repair_rounds_and_a_rerun_with_more_asks_only_the_rejected(tmp_path, sample_captions):
    out = tmp_path / "out"
    calls: list[int] = []
    with FakeOpenAI(answer=_judge_answer(calls)) as fake:
        common = _generated(tmp_path, sample_captions, fake)
        assert judge_main([*common, "--repair-rounds", "0"]) == 0
        assert calls == [2] * 6                   # no repair: the short answer is rejected
        j = pl.read_parquet(out / "judgements.parquet")
        assert 0 < j["judge_grade"].null_count() < j.height
        assert judge_main(common) == 0            # one round allowed now: only that chunk again
        assert calls == [2] * 6 + [2, 4]
    assert pl.read_parquet(out / "judgements.parquet")["judge_grade"].null_count() == 0


def test_judge_before_generation_is_a_usage_error(tmp_path, sample_captions, capsys):
    caps = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:2])
    rc = judge_main(["--captions", str(caps), "--out", str(tmp_path / "none"), "--base-url",
                     "http://127.0.0.1:9/v1", "--model", "m", "--log-format", "json"])
    assert rc == 2
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]   # JSON logs, as asked
    (error,) = [line for line in lines if line.get("event") == "error"]
    assert error["level"] == "error" and "run gen.run first" in error["message"]
    assert (lines[-1]["event"], lines[-1]["exit_status"], lines[-1]["command"]) == ("finished", 2, "gen.judge")


def _candidate_answer(caption_block: str, body: dict) -> str:
    # Generation as the fake always answers; a judgement grades by shared characters, so
    # some BM25 candidates come out relevant (1 or 2) and others not (0).
    if "查询：" not in caption_block:
        from fake_openai import default_answer
        return default_answer(caption_block)
    caption, _, listed = caption_block.partition("查询：")
    queries = [line.split(". ", 1)[1] for line in listed.strip().splitlines() if ". " in line]
    shared = [len(set(q) & set(caption)) / max(len(set(q)), 1) for q in queries]
    return json.dumps({"grades": [2 if s >= 0.8 else 1 if s >= 0.5 else 0 for s in shared]})


def test_candidates_become_positives_or_confirmed_negatives(tmp_path, sample_captions):
    from gen.publish import curate_versioned

    caps = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:12])
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text("[curation]\ndev_fraction = 0.0\n")   # one split: every query has one row
    calls: list[dict] = []
    with FakeOpenAI(answer=lambda block, body: calls.append(body) or _candidate_answer(block, body)) as fake:
        common = ["--captions", str(caps), "--out", str(out), "--base-url", fake.base_url,
                  "--model", "m", "--no-progress", "--config", str(job)]
        assert run_main(common) == 0
        before = len(calls)
        assert judge_main([*common, "--candidates", "2"]) == 0
        asked = len(calls) - before
        assert judge_main([*common, "--candidates", "2"]) == 0 and len(calls) == before + asked  # resumed

    shards = rows(out / "shards" / "latest")
    expected = {(n, r["query"]) for r in shards
                for n, b in list(zip(r["neg_ids"], r["neg_bm25"]))[:2] if b > 0}
    cj = pl.read_parquet(out / "candidate_judgements.parquet")
    assert set(zip(cj["caption_id"], cj["query"])) == expected and cj["judge_grade"].null_count() == 0
    assert set(cj["judge_grade"].unique()) == {0, 1, 2}   # the test needs all three outcomes

    new = curate_versioned(out, CurateConfig(judge_candidates=True, dev_fraction=0.0))
    graded = {(c, q): g for c, q, g in cj.iter_rows()}
    after = {r["query"]: r for r in rows(out / "shards" / "latest")}
    added = confirmed = 0
    for (cid, query), g in graded.items():
        r = after[query]
        assert (g >= 1) == (cid in r["pos_ids"]), (query, cid, g)   # relevant: a positive ...
        assert not (g >= 1 and cid in r["neg_ids"])                  # ... never a negative
        if g >= 1:
            added += 1
            assert r["pos_scores"][r["pos_ids"].index(cid)] == g     # with the judge's grade
        elif cid in r["neg_ids"]:
            confirmed += 1
            assert r["neg_judged"][r["neg_ids"].index(cid)] is True
    assert added and confirmed
    assert new["stats"]["judged_positives"] == added
    assert new["stats"]["negatives_judged_irrelevant"] == confirmed
    assert all(not any(r["neg_judged"]) for r in shards)   # without the setting: nothing marked

    # Re-judged grades are new input: the same settings must make a new version.
    assert curate_versioned(out, CurateConfig(judge_candidates=True, dev_fraction=0.0))["reused"]
    cj.with_columns(judge_grade=pl.lit(0, dtype=pl.Int8)).write_parquet(out / "candidate_judgements.parquet")
    regraded = curate_versioned(out, CurateConfig(judge_candidates=True, dev_fraction=0.0))
    assert not regraded["reused"] and regraded["version"] != new["version"]
    assert regraded["stats"]["judged_positives"] == 0


def test_curating_with_judge_settings_but_no_judgements_is_a_usage_error(tmp_path, capsys):
    from curate_helpers import rec, write_run

    from gen.curate.__main__ import main as curate_main
    run = write_run(tmp_path / "run", [{"id": "c1", "text": "一只猫在沙发上"}], [rec("c1", "猫")])
    for flags in (["--judge", "drop"], ["--judge-candidates", "true"]):
        assert curate_main(["--queries", str(run), *flags]) == 2
        assert "run python -m gen.judge first" in capsys.readouterr().err
