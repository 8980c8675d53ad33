"""Each filter drops what it should, under its own reason, and keeps what it should not touch."""
from __future__ import annotations

import pytest

from curate_helpers import dropped, rec, reason_of, run_curate, sample_captions

CAPS = sample_captions()
CR0 = CAPS[0]["text"]   # 图片中显示了一个安装在墙上的燃气表，旁边有管道和电源适配器。


@pytest.mark.parametrize("query,settings,reason", [
    ("图片", {}, "stoplist"),
    ("这张图片。", {}, "stoplist"),                     # punctuation does not hide it
    ("ＰＨＯＴＯ", {}, "stoplist"),                     # nor width or case
    ("表", {"min_chars": 2}, "too_short"),
    ("墙上的燃气表旁边有管道和电源适配器", {"max_chars": 10}, "too_long"),
    ("管道", {"min_words": 2}, "too_few_words"),
    ("墙上的燃气表旁边有管道", {"max_words": 3}, "too_many_words"),
    ("gas meter 燃气", {}, "low_cjk_share"),
    ("。，！", {}, "empty"),
])
def test_each_filter_drops_with_its_reason(tmp_path, query, settings, reason):
    control = "墙上燃气表"   # two words, 5 characters: passes every setting here
    recs = [rec("cr.0", query, type="simple_condition"), rec("cr.0", control)]
    m, shards = run_curate(tmp_path, CAPS, recs, **settings)
    assert reason_of(shards, "cr.0", query) == reason
    assert m["stats"]["dropped_by_reason"][reason] == 1
    assert reason_of(shards, "cr.0", control) is None


def test_copies_of_the_caption_are_dropped(tmp_path):
    whole = CR0
    nearly = "图片显示了一个安装在墙上的燃气表，旁边有管道和电源"   # most of it, in order
    part = "墙上的燃气表"
    recs = [rec("cr.0", q, type="summary", salience=i) for i, q in enumerate((whole, nearly, part), 1)]
    _, shards = run_curate(tmp_path, CAPS, recs)
    assert reason_of(shards, "cr.0", whole) == "copies_caption"
    assert reason_of(shards, "cr.0", nearly) == "copies_caption"
    assert reason_of(shards, "cr.0", part) is None


def test_grade_2_claims_must_name_something_in_the_caption(tmp_path):
    recs = [
        rec("cr.0", "冰箱", grade=2),                              # names nothing in it
        rec("cr.0", "冰箱里的牛奶", type="complex_condition", grade=2),
        rec("cr.0", "厨房", grade=1, salience=2),                 # grade 1 may be implied
        rec("cr.0", "计量仪表", type="hypernym", grade=2),         # hypernyms generalise
        rec("cr.0", "燃气管道", grade=2, salience=3),              # shares 燃气 and 管道
    ]
    _, shards = run_curate(tmp_path, CAPS, recs)
    assert reason_of(shards, "cr.0", "冰箱") == "ungrounded_grade2"
    assert reason_of(shards, "cr.0", "冰箱里的牛奶") == "ungrounded_grade2"
    for kept in ("厨房", "计量仪表", "燃气管道"):
        assert reason_of(shards, "cr.0", kept) is None


def test_dropped_rows_keep_every_input_column_and_a_reason(tmp_path):
    recs = [rec("cr.0", "图片", salience=4), rec("cr.0", "燃气表")]
    _, shards = run_curate(tmp_path, CAPS, recs)
    d = dropped(shards)
    assert {"row", "caption_id", "query", "type", "subtype", "grade", "salience", "source", "model",
            "answer_key", "reason", "detail"} <= set(d.columns)
    assert d["reason"].null_count() == 0


def test_a_hypernym_that_repeats_its_entity_is_dropped(tmp_path):
    # Small models often give a thing as its own hypernym (燃气表 -> 燃气表); the exact
    # duplicate step keeps the entity, the better-ranked type.
    recs = [rec("cr.0", "燃气表", type="entity"),
            rec("cr.0", "燃气表", type="hypernym", source="燃气表", salience=1),
            rec("cr.0", "仪表", type="hypernym", source="燃气表", salience=2)]
    _, shards = run_curate(tmp_path, CAPS, recs)
    assert reason_of(shards, "cr.0", "仪表") is None
    assert dropped(shards).filter(type="hypernym")["reason"].to_list() == ["duplicate_exact"]
