"""Hard negatives and the false-negative guard."""
from __future__ import annotations

from curate_helpers import rec, rows, run_curate, sample_captions

FILLER = sample_captions()
CAPS = FILLER + [
    {"id": "car.pos", "text": "停车场里停着一辆红色汽车，旁边是一个燃气表。"},
    {"id": "car.words", "text": "一辆汽车停在红色的大门前。"},          # every word of 红色汽车, apart
    {"id": "car.own", "text": "路边停着一辆红色轿车。"},                # generated 红色汽车 itself
    {"id": "car.blue", "text": "一辆蓝色汽车驶过桥梁。"},                # a true hard negative
    {"id": "car.blue2", "text": "蓝色汽车和白色汽车停在路边。"},
    {"id": "gas.pos", "text": "厨房墙上装着燃气表和燃气灶。"},
    {"id": "gas.literal", "text": "工人正在检查燃气表的读数。"},         # contains the query
]
RECORDS = [
    rec("car.pos", "红色汽车", type="simple_condition"),
    # Grade 1 and past max_positives=1: dropped as "positives_capped", yet still a false negative.
    rec("car.own", "红色汽车", type="hypernym", grade=1),
    rec("car.blue", "蓝色汽车", type="simple_condition"),
    rec("gas.pos", "燃气表"),
]


def _row(shards, query):
    return next(r for r in rows(shards) if r["query"] == query)


def test_false_negatives_are_never_negatives(tmp_path):
    m, shards = run_curate(tmp_path, CAPS, RECORDS, max_positives=1, negatives=7)
    car = _row(shards, "红色汽车")
    assert car["pos_ids"] == ["car.pos"]
    assert "car.blue" in car["neg_ids"] and car["neg_bm25"][0] > 0           # found by BM25
    for false in ("car.pos", "car.words", "car.own"):
        assert false not in car["neg_ids"]
    gas = _row(shards, "燃气表")
    assert "gas.literal" not in gas["neg_ids"] and "gas.pos" not in gas["neg_ids"]
    assert "car.pos" not in gas["neg_ids"]   # contains 燃气表 too
    guard = m["stats"]["false_negative_candidates_excluded"]
    assert guard["known_positive"] >= 1 and guard["contains_query"] >= 1 and guard["contains_all_words"] >= 1


def test_negatives_are_lists_of_texts_with_ids_and_scores(tmp_path):
    _, shards = run_curate(tmp_path, CAPS, RECORDS, negatives=5)
    texts = {c["id"]: c["text"] for c in CAPS}
    for r in rows(shards):
        assert isinstance(r["pos"], list) and isinstance(r["neg"], list)
        assert len(r["neg"]) == len(r["neg_ids"]) == len(r["neg_scores"]) == len(r["neg_bm25"]) == 5
        assert r["neg"] == [texts[i] for i in r["neg_ids"]]
        assert r["neg_bm25"] == sorted(r["neg_bm25"], reverse=True)   # BM25 first, fill (0.0) after
        assert not set(r["neg_ids"]) & set(r["pos_ids"])


def test_without_fill_short_rows_are_dropped_with_reason(tmp_path):
    m, shards = run_curate(tmp_path, CAPS, RECORDS, random_fill=False, negatives=3, min_negatives=1)
    # 燃气表 is one word: every caption BM25 can reach contains it, so no hard negative exists
    # except 燃气灶-style partial matches; with none left it is dropped, not written empty.
    kept = {r["query"] for r in rows(shards)}
    d = m["stats"]["dropped_by_reason"]
    assert "红色汽车" in kept
    assert all(len(r["neg"]) >= 1 for r in rows(shards))
    assert d.get("too_few_negatives", 0) + len(kept) >= 1


def test_mining_is_deterministic(tmp_path):
    a, sa = run_curate(tmp_path / "a", CAPS, RECORDS)
    b, sb = run_curate(tmp_path / "b", CAPS, RECORDS)
    assert rows(sa) == rows(sb)
    assert [f["sha256"] for f in a["files"]] == [f["sha256"] for f in b["files"]]


def test_a_caption_whose_text_equals_a_positive_is_never_its_negative(tmp_path):
    # The twin differs only by punctuation, so it has its own answer key and never generated
    # the query, nor contains it or all its words: only its text says it is the positive.
    twins = [{"id": "park.pos", "text": "红色汽车停在路边。"}, {"id": "park.twin", "text": "红色汽车停在路边"},
             {"id": "park.wide", "text": "红色汽车, 停在路边!"}]
    caps = FILLER + twins + [{"id": "park.other", "text": "蓝色汽车停在路边。"}]
    recs = [rec("park.pos", "路边的车辆", type="simple_condition"),
            rec("park.other", "蓝色汽车", type="simple_condition")]
    for more in ({}, {"partition_records": 1}):   # in memory, then in partitions
        m, shards = run_curate(tmp_path / str(len(more)), caps, recs, negatives=len(caps) - 2, **more)
        row = _row(shards, "路边的车辆")
        assert row["pos_ids"] == ["park.pos"]
        assert "park.twin" not in row["neg_ids"] and "park.wide" not in row["neg_ids"]
        assert "park.other" in row["neg_ids"]
        assert m["stats"]["false_negative_candidates_excluded"]["same_text_as_positive"] >= 2
