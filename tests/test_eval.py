"""gen.eval: the coverage match, nDCG, the pair sources and sample, the jieba baseline, the CLI.

Labels here are made up for the fixture captions (never the benchmark's dev queries)."""
import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import write_jsonl

from gen.eval.__main__ import main
from gen.eval.baselines import jieba_pairs
from gen.eval.coverage import Matcher, coverage
from gen.eval.labels import LabelError, LabelledQuery, load_corpus, load_labels
from gen.eval.pairs import load_pairs, sample
from gen.eval.retrieval import ndcg_at_k


@pytest.mark.parametrize("human,generated,expected", [
    ("体育馆", "体育馆", True),
    ("体育馆", "体育馆。", True),             # punctuation and width do not matter
    ("体育馆", "体育馆里", True),              # 3 of 4 characters
    ("公园", "公园门口", False),               # a different thing that contains it
    ("燃气表", "图片中显示了一个安装在墙上的燃气表", False),  # a summary that merely contains it
    ("女孩和狗", "狗和女孩", True),            # same words, another order
    ("红色的车", "红色车", True),
    ("红色的车", "蓝色的车", False),
    ("", "车", False),
])
def test_match_is_strict(human, generated, expected):
    assert Matcher(human).matches(generated) is expected


def test_coverage_counts_strong_pairs_of_generated_captions_only():
    labels = [LabelledQuery("q1", "燃气表", "singleton_object", {"c1": 2, "c2": 2, "c3": 1}),
              LabelledQuery("q2", "证书", "singleton_object", {"c2": 2}),
              LabelledQuery("q3", "墙上的燃气表", "simple_condition", {"c1": 2, "c9": 2})]
    gen = [("c1", "燃气表", "entity"), ("c1", "管道", "entity"), ("c2", "证书照片", "entity"),
           ("c3", "燃气表", "entity")]  # c3 is grade 1: not a strong pair; c9 was not generated
    r = coverage(labels, gen)
    assert (r["strong_pairs"], r["covered"], r["captions"]) == (4, 1, 3)
    assert r["by_type"]["singleton_object"] == {"pairs": 3, "coverage": round(1 / 3, 4)}
    assert r["by_type"]["simple_condition"]["coverage"] == 0.0
    assert r["matched_by_generated_type"] == {"entity": 1}


def test_ndcg_linear_gains():
    pos = {"a": 2, "b": 1}
    assert ndcg_at_k(["a", "b", "x"], pos) == pytest.approx(1.0)
    swapped = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert ndcg_at_k(["b", "a"], pos) == pytest.approx(swapped)
    assert ndcg_at_k(["x"] * 10 + ["a"], pos) == 0.0  # beyond 10 counts nothing


def test_labels_name_file_line_and_field(tmp_path):
    corpus = load_corpus(write_jsonl(tmp_path / "c.jsonl", [{"id": "c1", "text": "一只猫"}]))
    good = write_jsonl(tmp_path / "ok.jsonl", [{"id": "q", "query": "猫", "type": "t", "positives": [{"id": "c1", "score": 2}]}])
    assert load_labels(good, corpus)[0].positives == {"c1": 2}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "q", "query": "猫", "positives": [{"id": "c1", "score": 2}]},
                                               {"id": "q2", "query": "狗", "positives": [{"id": "c7", "score": 2}]}])
    with pytest.raises(LabelError, match=r"bad.jsonl:2: field positives: caption 'c7'"):
        load_labels(bad, corpus)


def test_pairs_from_run_shards_and_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    pl.DataFrame({"caption_id": ["c1", "c1"], "query": ["猫", "睡觉"], "type": ["entity", "event"],
                  "grade": [2, 2]}).write_parquet(run / "queries.parquet")
    assert load_pairs(run).rows() == [("猫", "c1", "entity"), ("睡觉", "c1", "event")]
    shards = tmp_path / "shards"
    shards.mkdir()
    pl.DataFrame({"query": ["猫"], "pos_ids": [["c1", "c2"]], "type": ["entity"]}).write_parquet(shards / "train-00000.parquet")
    pl.DataFrame({"query": ["狗"], "pos_ids": [["c3"]], "type": ["entity"]}).write_parquet(shards / "dev-00000.parquet")
    assert sorted(load_pairs(shards)["caption_id"]) == ["c1", "c2", "c3"]
    f = write_jsonl(tmp_path / "p.jsonl", [{"query": "猫", "caption_id": "c1"}])
    assert load_pairs(f).rows() == [("猫", "c1", "unknown")]
    with pytest.raises(ValueError, match="caption_id"):
        load_pairs(write_jsonl(tmp_path / "x.jsonl", [{"query": "猫"}]))


def test_sample_is_exact_seeded_and_distinct_first():
    df = pl.DataFrame({"query": [f"q{i}" for i in range(10)] + ["q0"], "caption_id": ["c"] * 11, "type": ["t"] * 11})
    s = sample(df, 5, seed=1)
    assert s.height == 5 and s["query"].n_unique() == 5 and s.equals(sample(df, 5, seed=1))
    big = sample(df, 25, seed=1)  # 10 distinct pairs, topped up to 25
    assert big.height == 25 and set(big["query"]) == {f"q{i}" for i in range(10)}


def test_jieba_baseline_nouns_and_verbs(sample_captions):
    corpus = {c["id"]: c["text"] for c in sample_captions[:5]}
    df = jieba_pairs(corpus)
    assert set(df["type"]) <= {"noun", "verb"} and df["query"].str.len_chars().min() >= 2
    assert "燃气表" in df.filter(pl.col("caption_id") == "cr.0")["query"].to_list()
    assert df.unique(["query", "caption_id"]).height == df.height
    # With generic_share, words in more than a quarter of 10 captions go (图片 is in 5, 显示 in 3).
    corpus = {c["id"]: c["text"] for c in sample_captions[:10]}
    df = jieba_pairs(corpus)
    common = set(df.group_by("query").len().filter(pl.col("len") > 2.5)["query"])
    assert {"图片", "显示"} <= common
    kept = jieba_pairs(corpus, generic_share=0.25)
    assert set(kept["query"]) == set(df["query"]) - common


def test_cli_coverage_and_bad_pairs(tmp_path, sample_captions, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_captions[:3])
    labels = write_jsonl(tmp_path / "l.jsonl", [{"id": "q", "query": "燃气表", "type": "singleton_object",
                                                 "positives": [{"id": "cr.0", "score": 2}]}])
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"query": "燃气表", "caption_id": "cr.0"}])
    results = tmp_path / "results.jsonl"
    assert main(["coverage", "--corpus", str(corpus), "--labels", str(labels), "--pairs", str(pairs),
                 "--name", "t", "--results", str(results)]) == 0
    rec = json.loads(results.read_text())
    assert rec["name"] == "t" and rec["coverage"]["coverage"] == 1.0 and rec["machine"]
    stray = write_jsonl(tmp_path / "s.jsonl", [{"query": "燃气表", "caption_id": "cr.404"}])
    assert main(["coverage", "--corpus", str(corpus), "--labels", str(labels), "--pairs", str(stray)]) == 2
    assert "cr.404" in capsys.readouterr().err


@pytest.mark.parametrize("absent", ["embedding", "sentence_transformers"])
def test_encoder_commands_without_the_opt_in_eval_parts_say_how_to_add_them(tmp_path, sample_captions, capsys,
                                                                          monkeypatch, absent):
    # What a machine set up without CAPGEN_EVAL=1 has: neither the eval extra nor the encoder.
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == absent else find_spec(name, *a))
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_captions[:3])
    labels = write_jsonl(tmp_path / "l.jsonl", [{"id": "q", "query": "燃气表", "type": "singleton_object",
                                                 "positives": [{"id": "cr.0", "score": 2}]}])
    assert main(["zeroshot", "--corpus", str(corpus), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err
    assert "CAPGEN_EVAL=1 bash scripts/setup.sh" in err and "research use" in err


HARD_CORPUS = {
    "c1": "墙上的燃气表旁边有管道",
    "c2": "厨房里的燃气灶和管道",
    "c3": "一只猫在沙发上睡觉",
    "c4": "燃气表读数显示在手机上",
    "c5": "公园里的小孩在放风筝",
}


def test_hard_negative_is_the_best_bm25_caption_that_is_not_a_positive():
    from gen.eval.hardneg import negatives
    pool = pl.DataFrame({"query": ["燃气灶", "燃气设备", "燃气设备", "猫", "风筝", "燃气表"],
                         "caption_id": ["c2", "c1", "c2", "c3", "c5", "c4"]})
    neg = negatives(pool, HARD_CORPUS, ["燃气灶", "燃气设备", "猫"])
    # 燃气灶: shares 燃气 with c1 and c4, and BM25 ranks them; c2 is its own caption.
    assert neg["燃气灶"] in {"c1", "c4"}
    # 燃气设备: c1 and c2 would rank first but are its positives in the pool; c4 shares 燃气.
    assert neg["燃气设备"] == "c4"
    # 猫: no other caption has the word, so a random one, never c3 (its own, containing 猫).
    assert neg["猫"] in {"c1", "c2", "c4", "c5"}
    assert negatives(pool, HARD_CORPUS, ["猫"]) == {"猫": neg["猫"]}  # seeded by the query, not the run


def test_hard_negatives_refuse_a_pool_with_nothing_to_contrast():
    from gen.eval.hardneg import attach
    pool = pl.DataFrame({"query": ["猫", "沙发"], "caption_id": ["c3", "c3"], "type": ["t", "t"]})
    with pytest.raises(ValueError, match="no caption to mine a negative from"):
        attach(pool, pool, HARD_CORPUS)
    pool = pool.vstack(pl.DataFrame({"query": ["风筝"], "caption_id": ["c5"], "type": ["t"]}))
    out = attach(pool, pool, HARD_CORPUS)
    assert out["neg_id"].to_list() == ["c5", "c5", "c3"]


def _clashes(batch, queries, captions):
    return [(i, j) for i in batch for j in batch if i != j and queries[i] in captions[j][0]]


def test_clean_batches_keep_out_captions_that_contain_another_query():
    import random

    from gen.eval.batches import plan
    captions = [(f"第{i}张：蓝色的天空和白云",) if i % 4 == 1 else (f"第{i}张：绿色的草地",) for i in range(256)]
    queries = ["天空" if i in (1, 129) else f"物件{i}" for i in range(256)]
    for clean in (False, True):
        batches, relaxed = plan(queries, captions, 32, random.Random(0), clean)
        assert sorted(i for b in batches for i in b) == list(range(256))
        for b in batches:  # no text twice, whatever the rule
            texts = [t for i in b for t in (queries[i], *captions[i])]
            assert len(texts) == len(set(texts))
        clashes = [c for b in batches for c in _clashes(b, queries, captions)]
        if clean:  # only a pair the last batches could not place strictly may clash
            assert len(relaxed) <= 2 and all(i in relaxed or j in relaxed for i, j in clashes)
        else:
            assert len(clashes) > 4  # what clean is for: random batches do hold them

    # A query every caption contains fits no clean batch: it is placed under the first rule
    # alone, counted, and the number of batches stays ceil(n / 32).
    queries[0] = "第"
    batches, relaxed = plan(queries, captions, 32, random.Random(0), True)
    assert relaxed and len(batches) == 8
    assert all(i in relaxed or j in relaxed for b in batches for i, j in _clashes(b, queries, captions))


@pytest.mark.slow
def test_finetune_protocol_end_to_end_moves_the_encoder(tmp_path, sample_captions, eval_encoder):
    """The real encoder (m3e-small) through the real protocol, on 64 pairs: the command
    records protocol, coverage and nDCG, and training changes the scores. Minutes, not
    the 12,000-pair run: that one is a benchmark (docs/quality.md)."""
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_captions)
    labels = write_jsonl(tmp_path / "l.jsonl", [
        {"id": "q1", "query": "燃气表", "type": "singleton_object", "positives": [{"id": "cr.0", "score": 2}]},
        {"id": "q2", "query": "证书", "type": "singleton_object", "positives": [{"id": "cr.1", "score": 2}]},
    ])
    pairs = tmp_path / "pairs.jsonl"
    assert main(["jieba", "--corpus", str(corpus), "--out", str(pairs)]) == 0
    results = tmp_path / "r.jsonl"
    common = ["--corpus", str(corpus), "--labels", str(labels), "--results", str(results)]
    assert main(["zeroshot", *common, "--name", "zero"]) == 0
    assert main(["finetune", *common, "--pairs", str(pairs), "--n-pairs", "64", "--name", "ft"]) == 0
    assert main(["finetune", *common, "--pairs", str(pairs), "--n-pairs", "64", "--name", "hn",
                 "--hard-negatives"]) == 0
    zero, ft, hn = [json.loads(line) for line in results.read_text().splitlines()]
    assert ft["protocol"]["pairs"] == 64 and ft["protocol"]["batch_size"] == 32
    assert ft["protocol"]["hard_negatives"] == 0 and hn["protocol"]["hard_negatives"] == 1
    assert 0 <= ft["retrieval"]["ndcg@10"] <= 100 and ft["coverage"]["strong_pairs"] == 2
    assert zero["encoder"] == "m3e-small" and ft["train_s"] > 0

    # Training moves the encoder: a query's embedding is not what it was zero-shot.
    from gen.eval.finetune import Protocol, load_encoder, train
    from gen.eval.pairs import load_pairs
    texts = {c["id"]: c["text"] for c in sample_captions}
    before = load_encoder().encode(["燃气表"])[0]
    proto = Protocol(pairs=64)
    model = train(load_encoder(), sample(load_pairs(pairs), 64, 0), texts, proto, tmp_path / "w")
    after = model.encode(["燃气表"])[0]
    assert abs(after - before).max() > 1e-4

    # The variant's negatives reach the loss: same pairs and seed, other weights.
    from gen.eval.hardneg import attach
    drawn = sample(load_pairs(pairs), 64, 0)
    hard = train(load_encoder(), attach(drawn, load_pairs(pairs), texts), texts,
                 Protocol(pairs=64, hard_negatives=1), tmp_path / "h")
    assert abs(hard.encode(["燃气表"])[0] - after).max() > 1e-4

    # Clean batches reach the trainer: it asks gen.eval.batches for its plan.
    import gen.eval.batches as batches_mod
    calls = []
    real_plan = batches_mod.plan

    def spy(*a, **k):
        calls.append(a[4])
        return real_plan(*a, **k)

    batches_mod.plan = spy
    try:
        train(load_encoder(), drawn, texts, Protocol(pairs=64, clean_batches=True), tmp_path / "c")
    finally:
        batches_mod.plan = real_plan
    assert calls and all(calls)


def _benchmark(name: str):
    """A script of benchmarks/quality/ as a module (they are scripts, not a package)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_screen_batches_never_repeat_a_text_and_use_every_pair():
    """A repeated text in a batch would be its own in-batch negative; a dropped pair would
    change the training budget between variants."""
    import random
    screen = _benchmark("gpu_screen")
    corpus = {f"c{i}": f"caption {i}" for i in range(40)}
    pairs = [{"query": f"q{i % 7}", "caption_id": f"c{i % 40}"} for i in range(300)]
    seen = []
    for batch in screen.batches(pairs, corpus, random.Random(0)):
        texts = [t for pair in batch for t in pair]
        assert len(texts) == len(set(texts)) and len(batch) <= screen.BATCH
        seen += batch
    assert sorted(seen) == sorted((p["query"], corpus[p["caption_id"]]) for p in pairs)

    # With hard negatives a negative is a text of the batch too: it must not be another
    # pair's caption there, or the loss would call that caption both right and wrong.
    hard = [p | {"neg_id": f"c{(i + 1) % 40}"} for i, p in enumerate(pairs)]
    seen = []
    for batch in screen.batches(hard, corpus, random.Random(0)):
        texts = [t for triple in batch for t in triple]
        assert len(texts) == len(set(texts)) and all(len(t) == 3 for t in batch)
        seen += batch
    assert len(seen) == len(hard)


@pytest.mark.slow
def test_gpu_screen_prep_and_train_run_on_cpu(tmp_path, sample_captions, eval_encoder):
    """The screen's two halves end to end on 64 pairs: prep writes the fp16 encoder and the
    drawn pairs, train records zero-shot and one run per (variant, seed)."""
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_captions)
    labels = write_jsonl(tmp_path / "l.jsonl", [
        {"id": "q1", "query": "燃气表", "type": "singleton_object", "positives": [{"id": "cr.0", "score": 2}]}])
    pairs = tmp_path / "pairs.jsonl"
    assert main(["jieba", "--corpus", str(corpus), "--out", str(pairs)]) == 0
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "gpu_screen.py"
    screen, results = tmp_path / "screen", tmp_path / "r.jsonl"
    run = [sys.executable, str(script)]
    subprocess.run([*run, "prep", "--out", str(screen), "--seeds", "0", "1", "--pairs", "64",
                    "--variant", f"jieba={pairs}"], check=True)
    assert (screen / "m3e-small" / "model.safetensors").is_file()
    subprocess.run([*run, "train", "--dir", str(screen), "--corpus", str(corpus), "--labels", str(labels),
                    "--results", str(results)], check=True)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["name"], r.get("seed")) for r in rows] == [("zero-shot", None), ("jieba", 0), ("jieba", 1)]
    assert all(0 <= r["ndcg@10"] <= 100 for r in rows)

    hard = tmp_path / "hard"
    subprocess.run([*run, "prep", "--out", str(hard), "--seeds", "0", "--pairs", "64", "--hard-negatives",
                    "--corpus", str(corpus), "--variant", f"jieba={pairs}"], check=True)
    drawn = [json.loads(line) for line in gzip.open(hard / "pairs" / "jieba+hn.s0.jsonl.gz", "rt")]
    assert len(drawn) == 64 and all(d["neg_id"] != d["caption_id"] for d in drawn)
    subprocess.run([*run, "train", "--dir", str(hard), "--corpus", str(corpus), "--labels", str(labels),
                    "--results", str(results)], check=True)
    last = json.loads(results.read_text().splitlines()[-1])
    assert (last["name"], last["seed"]) == ("jieba+hn", 0) and 0 <= last["ndcg@10"] <= 100


def test_human_split_halves_are_disjoint_and_pairs_keep_to_the_captions(tmp_path):
    """benchmarks/quality/human_split.py: every labelled query lands in exactly one half, and
    a half's training pairs are its own queries' positives below --captions-below only."""
    module = _benchmark("human_split")
    path = Path(module.__file__)
    labels = write_jsonl(tmp_path / "l.jsonl", [
        {"id": f"{i:032x}", "query": f"查询{i}", "type": "singleton_object",
         "positives": [{"id": f"cr.{i}", "score": 2}, {"id": f"cr.{100 + i}", "score": 1}]}
        for i in range(10)])
    out = tmp_path / "split"
    subprocess.run([sys.executable, str(path), "split", "--labels", str(labels), "--out", str(out),
                    "--captions-below", "100"], check=True)
    read = lambda name: [json.loads(line) for line in (out / name).read_text().splitlines()]  # noqa: E731
    a, b = read("labels_a.jsonl"), read("labels_b.jsonl")
    assert {r["id"] for r in a} | {r["id"] for r in b} == {f"{i:032x}" for i in range(10)}
    assert not {r["id"] for r in a} & {r["id"] for r in b} and a and b
    for half, rows in (("a", a), ("b", b)):
        pairs = read(f"pairs_{half}.jsonl")
        assert sorted(p["caption_id"] for p in pairs) == sorted(r["positives"][0]["id"] for r in rows)
        assert all(module.half(r["id"]) == half for r in rows)
