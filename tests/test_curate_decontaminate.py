"""Decontamination: near copies of eval texts are found through an n-gram index, not all pairs."""
from __future__ import annotations

import json
import random

import polars as pl

import gen.curate.decontaminate as dc
from curate_helpers import rec, reason_of, rows, run_curate, sample_captions

CAPS = sample_captions()
# cr.6 with a few characters changed: ROUGE-L ~0.9.
NEAR_COPY = "图片展示了日出时分，云海翻滚，山顶上有观景台和许多游客，天空湛蓝，景色壮丽。"


def _unrelated(n: int) -> list[str]:
    # The sample captions with their characters shuffled: the same characters, no shared runs.
    rng = random.Random(0)
    out = []
    for i in range(n):
        chars = list(CAPS[i % len(CAPS)]["text"])
        rng.shuffle(chars)
        out.append("".join(chars))
    return out


def test_rouge_l_is_character_lcs_f1():
    assert dc.rouge_l("abcd", "abed") == 2 * 3 / 8
    assert dc.rouge_l("", "abc") == 0.0
    assert dc.rouge_l(CAPS[6]["text"], NEAR_COPY) > 0.6


def test_near_copy_found_without_scoring_all_pairs(monkeypatch):
    calls = []
    real = dc.rouge_l
    monkeypatch.setattr(dc, "rouge_l", lambda a, b: calls.append(1) or real(a, b))
    evals = _unrelated(400) + [NEAR_COPY]
    caps = pl.DataFrame(CAPS).select("id", c_norm=pl.col("text"))
    hits, scored = dc.contaminated(caps, evals, threshold=0.6, n=3)
    assert hits["id"].to_list() == ["cr.6"] and hits["eval_index"].to_list() == [400]
    all_pairs = len(CAPS) * len(evals)
    assert scored == len(calls) and len(calls) < all_pairs / 100, (len(calls), all_pairs)


def test_curation_drops_contaminated_captions_and_their_queries(tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                 for t in _unrelated(50) + [NEAR_COPY]), encoding="utf-8")
    recs = [rec("cr.6", "云海", salience=1), rec("cr.6", "观景台", salience=2), rec("cr.7", "桥梁")]
    m, shards = run_curate(tmp_path, CAPS, recs, decontaminate_against=(eval_file,))
    assert m["stats"]["decontamination"]["captions_dropped"] == 1
    assert reason_of(shards, "cr.6", "云海") == "decontaminated"
    out = rows(shards)
    assert [r["query"] for r in out] == ["桥梁"]
    assert all("cr.6" not in r["neg_ids"] for r in out)   # gone as a negative too
    assert m["settings"]["decontaminate_against"] != []   # the file's digest is in the settings


def test_eval_sets_are_read_as_captions_are_compressed_or_parquet(tmp_path):
    import gzip
    texts = _unrelated(5) + [NEAR_COPY]
    lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()
    (tmp_path / "eval.jsonl.gz").write_bytes(gzip.compress(lines))
    pl.DataFrame({"id": range(6), "text": texts}).write_parquet(tmp_path / "eval.pq")
    assert dc.load_eval_texts([tmp_path / "eval.jsonl.gz"]) == dc.load_eval_texts([tmp_path / "eval.pq"]) == texts
    pl.DataFrame({"caption": texts}).write_parquet(tmp_path / "wrong.parquet")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(lines * 200)[:300])
    for bad, says in (("wrong.parquet", "no `text` column"), ("cut.gz", "gzip data broken after line")):
        try:
            dc.load_eval_texts([tmp_path / bad])
        except ValueError as e:
            assert says in str(e) and bad in str(e)
        else:
            raise AssertionError(f"{bad} read without an error")
