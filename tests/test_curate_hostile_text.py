"""No control, zero-width or bidirectional character reaches a training shard, whatever path
a text takes there (own queries, captions as positives and negatives, cross-caption and
judged positives, the BEIR files), and each refused record is in dropped.parquet with its
reason."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import read_jsonl, write_jsonl
from curate_helpers import dropped, rec, reason_of, rows, run_curate, sample_captions, write_run
from fake_openai import FakeOpenAI, default_answer

from gen.curate import CurateConfig, curate
from gen.run import EXIT_OK, main
from schemas.text import clean

CAPS = sample_captions()
ZW = "\u200b\u200c\u200d\u2060\ufeff"
BIDI = "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
CONTROLS = "".join(map(chr, [*range(0x00, 0x09), 0x0b, 0x0c, *range(0x0e, 0x20), *range(0x7f, 0xa0)]))
FORBIDDEN = set(ZW + BIDI + CONTROLS)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def shard_texts(shards: Path) -> list[str]:
    """Every string in every file a trainer or MTEB reads (dropped.parquet and the manifest
    are records of the run, not training data)."""
    out: list[str] = []
    for f in shards.rglob("*"):
        if not f.is_file() or f.name in ("dropped.parquet", "manifest.json"):
            continue
        if f.suffix == ".parquet":
            out += _strings(pl.read_parquet(f).to_dicts())
        elif f.suffix == ".jsonl":
            out += _strings(read_jsonl(f))
        else:
            out += f.read_text(encoding="utf-8").split("\t")
    return out


def assert_clean(shards: Path) -> None:
    texts = shard_texts(shards)
    assert texts
    bad = [t for t in texts if FORBIDDEN & set(t)]
    assert not bad, bad[:5]


@pytest.mark.parametrize("text,want", [
    ("燃\u200b气表", ("燃气表", None)),                          # stray zero-width space: cleaned
    ("\ufeff\u2060燃气表\u200e", ("燃气表", None)),
    ("\u202e表气燃\u202c", ("表气燃", None)),                  # an override shows it reversed
    ("\u2066管道\u2069", ("管道", None)),
    ("👨\u200d👩\u200d👧", ("👨\u200d👩\u200d👧", None)),       # one emoji: the joiners stay
    ("❤\ufe0f\u200d🔥", ("❤\ufe0f\u200d🔥", None)),
    ("燃\u200d气表", ("燃气表", None)),                        # a joiner between Han joins nothing
    ("می\u200cخواهم", ("می\u200cخواهم", None)),               # Persian needs its non-joiner
    ("燃气表\x00", ("燃气表\x00", "control character U+0000 at 3")),
    ("\x07\x07", ("\x07\x07", "control character U+0007 at 0")),
    ("a\x85b", ("a\x85b", "control character U+0085 at 1")),  # C1: cp1252 mojibake
    ("燃气表\t管道\n", ("燃气表\t管道\n", None)),               # whitespace is not a control here
])
def test_the_rule(text, want):
    assert clean(text) == want


def test_queries_with_control_characters_are_dropped_and_invisible_ones_cleaned(tmp_path):
    recs = [
        rec("cr.0", "燃气表\x00", salience=1),
        rec("cr.0", "\x07\x00\x1b", salience=2),                 # only control characters
        rec("cr.0", "管道\x85", salience=3),
        rec("cr.0", "电源\u200b适配器", salience=4),               # stray ZWSP
        rec("cr.0", "\u202e墙上\u202c", type="simple_condition"),
        rec("cr.0", "\u2066燃气\u2069", type="hypernym", source="燃气表"),
        rec("cr.0", "\u200b\u200e\ufeff", salience=5),           # nothing visible
        rec("cr.1", "结婚证书\ufeff"),
    ]
    m, shards = run_curate(tmp_path, CAPS, recs)
    for q in ("燃气表\x00", "\x07\x00\x1b", "管道\x85"):
        assert reason_of(shards, "cr.0", q) == "control_characters"
    assert dropped(shards).filter(pl.col("query") == "\x07\x00\x1b")["detail"][0] == "control character U+0007 at 0"
    assert reason_of(shards, "cr.0", "\u200b\u200e\ufeff") == "empty"
    queries = {r["query"] for r in rows(shards)}
    assert {"电源适配器", "墙上", "燃气", "结婚证书"} <= queries
    assert m["stats"]["text_guard"] == {"queries_refused": 3, "queries_cleaned": 5,
                                        "captions_refused": 0, "captions_cleaned": 0}
    assert_clean(shards)


def test_captions_are_cleaned_or_refused_on_every_path_to_a_shard(tmp_path):
    # captions.parquet written by something other than capgen's input reader (which refuses
    # controls): a caption with a NUL goes with its records and is never a negative; zero-width
    # and bidi characters leave the others wherever they appear (own positive, cross
    # positive, judged positive, negative, BEIR corpus).
    caps = [dict(c) for c in CAPS[:20]]
    caps[0]["text"] = "\u200b" + caps[0]["text"].replace("燃气表", "燃\u2060气表") + "\u202e"
    caps[1]["text"] = caps[1]["text"] + "\x00"
    caps[2]["text"] = "燃气表旁边\ufeff有一\u200e只猫。"
    recs = [rec("cr.0", "燃气表"), rec("cr.1", "结婚证书")]
    run = write_run(tmp_path / "run", caps, recs)
    pl.DataFrame({"caption_id": ["cr.4"], "query": ["燃气表"], "judge_grade": [2]},
                 schema={"caption_id": pl.String, "query": pl.String, "judge_grade": pl.Int8}
                 ).write_parquet(run / "candidate_judgements.parquet")
    m = curate(run, CurateConfig(dev_fraction=0.5, judge_candidates=True, negatives=5))
    shards = run / "shards"
    assert reason_of(shards, "cr.1", "结婚证书") == "caption_control_characters"
    assert m["stats"]["text_guard"]["captions_refused"] == 1
    assert m["stats"]["text_guard"]["captions_cleaned"] == 2
    everything = rows(shards, "train") + rows(shards, "dev")
    ids = {i for r in everything for i in r["pos_ids"] + r["neg_ids"]}
    assert "cr.1" not in ids
    gas = next(r for r in everything if r["query"] == "燃气表")
    assert {"cr.0", "cr.2"} <= set(gas["pos_ids"]) or {"cr.0", "cr.4"} <= set(gas["pos_ids"])
    assert_clean(shards)


def _hostile(caption: str, body: dict) -> str:
    """A server that sprinkles control, zero-width and bidi characters into its queries."""
    a = json.loads(default_answer(caption))
    a["entities"][0]["text"] = "\u200b" + a["entities"][0]["text"] + "\u202e"
    a["entities"][0]["hypernyms"] = ["\ufeff" + h for h in a["entities"][0]["hypernyms"]]
    if len(a["entities"]) > 1:
        a["entities"][1]["text"] += "\x00"
    for item in a["events"]:
        item["text"] = "\u2066" + item["text"] + "\x07\u2069"
    a["summaries"] = ["\u200e" + s for s in a["summaries"]]
    return json.dumps(a, ensure_ascii=False)


def test_a_server_sending_hostile_characters_gets_none_into_the_shards(tmp_path):
    caps = write_jsonl(tmp_path / "caps.jsonl", CAPS[:12])
    out = tmp_path / "out"
    with FakeOpenAI(answer=_hostile) as fake:
        assert main(["--captions", str(caps), "--out", str(out), "--base-url", fake.base_url,
                     "--model", "fake-model", "--no-progress", "--retry-wait", "0.01"]) == EXIT_OK
    queries = pl.read_parquet(out / "queries.parquet")["query"].to_list()
    assert queries and not [q for q in queries if FORBIDDEN & set(q)]
    # Validation told the model (a repair round) and then kept the rest of each answer; the
    # refused queries are in the rejects with the reason.
    rejects = read_jsonl(out / "rejects.jsonl")
    assert rejects and all(r["stage"] == "query" and "control character" in r["reason"] for r in rejects)
    assert_clean((out / "shards" / "latest").resolve())


def test_answers_stored_before_the_rule_are_stopped_by_curation(tmp_path):
    # queries.parquet as an older capgen exported it from its store: nothing re-validates
    # those answers, so curation is the guard.
    recs = []
    for c in CAPS[:12]:
        a = json.loads(_hostile(c["text"], {}))
        for i, e in enumerate(a["entities"], 1):
            recs.append(rec(c["id"], e["text"], salience=i))
        for i, e in enumerate(a["events"], 1):
            recs.append(rec(c["id"], e["text"], type="event", salience=i))
    m, shards = run_curate(tmp_path, CAPS, recs)
    assert m["stats"]["dropped_by_reason"]["control_characters"] > 0
    assert m["stats"]["pairs_out"] > 0
    assert_clean(shards)


def test_caption_input_refuses_the_same_controls(tmp_path):
    # One definition: a C1 control (mojibake) is refused at input as a C0 one always was, so
    # no caption is paid for and then dropped at curation.
    from gen.input.captions import read_captions
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "燃气表\x85"}, {"id": "b", "text": "燃\u200b气表"}])
    got = list(read_captions(path, 4000))
    assert got[0].reason == "field 'text': text contains control character U+0085"
    assert got[1].text == "燃\u200b气表"   # cleaned where it reaches a shard, not refused
