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


def test_judge_grades_resumes_and_curation_drops_or_regrades(tmp_path, sample_captions):
    caps = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:6])
    out = tmp_path / "out"
    calls: list[int] = []
    with FakeOpenAI(answer=_judge_answer(calls)) as fake:
        common = ["--captions", str(caps), "--out", str(out), "--base-url", fake.base_url,
                  "--model", "m", "--no-progress"]
        assert run_main([*common, "--no-curate"]) == 0
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


def test_judge_before_generation_is_a_usage_error(tmp_path, sample_captions, capsys):
    caps = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:2])
    rc = judge_main(["--captions", str(caps), "--out", str(tmp_path / "none"), "--base-url",
                     "http://127.0.0.1:9/v1", "--model", "m", "--log-format", "json"])
    assert rc == 2
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])   # JSON logs, as asked
    assert line["level"] == "error" and "run gen.run first" in line["message"]
