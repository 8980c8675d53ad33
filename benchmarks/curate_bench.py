"""Curation benchmark: 1M generated query records over 100k captions, synthesised from the
real CapRetrieval captions, through gen.curate.curate(); reports wall time, peak memory and
the share of time per step.

    python benchmarks/curate_bench.py            # 1,000,000 records / 100,000 captions
    python benchmarks/curate_bench.py --small    # 20,000 records / 2,000 captions (CI)

Synthesis: caption i is real caption i mod 1,512 (the even-numbered lines of the caption
file; the odd ones feed the evaluation set) with a numeric suffix, so texts differ
but, as in real data, the same things recur across captions. Queries are drawn from the
caption's own jieba words and spans in the answer schema's mix (entities, hypernyms from a
small list, events, conjunctions, conditions, summaries), with some exact, punctuation and
near duplicates and some generic queries, so every curation step has work to do.
The evaluation set for decontamination (10k texts; 500 with --small) is in-domain: clauses
of the odd-numbered real captions recombined (the common phrasing, but no benchmark
caption), plus 10 near copies (two characters changed) of benchmark captions, which must be
found; each also matches the ~65 other captions cut from the same real one.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import jieba
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gen.curate import CurateConfig, curate  # noqa: E402

CAPTIONS = ROOT / "tests" / "fixtures" / "capretrieval_captions.jsonl"
HYPERNYMS = ("物品", "动物", "建筑", "交通工具", "食物", "人物", "植物", "电子产品", "文件", "家具",
             "风景", "服装", "商品", "标志", "工具")
GENERIC = ("图片", "这张照片", "画面")


def synthesise(n_captions: int, n_records: int, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    jieba.setLogLevel(60)
    base = _real_captions()[0::2]
    words = [[w for w in jieba.lcut(t) if w.strip() and not _punct(w)] for t in base]
    rng = random.Random(seed)
    per_caption = n_records / n_captions
    cols: dict[str, list] = {k: [] for k in ("caption_id", "query", "type", "subtype", "grade",
                                             "salience", "source")}

    def add(cid, q, typ, grade, sal, sub=None, src=None):
        for k, v in zip(cols, (cid, q, typ, sub, grade, sal, src)):
            cols[k].append(v)

    ids, texts = [], []
    for i in range(n_captions):
        b = i % len(base)
        cid, text, ws = f"bench.{i}", f"{base[b]}编号{i // len(base) + 1}", words[b]
        ids.append(cid)
        texts.append(text)
        nouns = [w for w in ws if len(w) >= 2] or ws or [text[:2]]
        budget = max(1, round(rng.gauss(per_caption, 1.5)))
        made = 0
        ents = rng.sample(nouns, min(len(nouns), 3))
        for s, e in enumerate(ents, 1):
            add(cid, e, "entity", rng.choice((2, 2, 2, 1)), s, rng.choice(("object", "person", "place", "concept")))
        made += len(ents)
        for s, e in enumerate(ents[:2], 1):
            add(cid, rng.choice(HYPERNYMS), "hypernym", 2, s, "object", e)
            made += 1
        spans = (("event", 2), ("conjunction", 0), ("simple_condition", 3), ("complex_condition", 5))
        for typ, n in spans:
            if made >= budget - 2:
                break
            if typ == "conjunction":
                q = "和".join(rng.sample(nouns, 2)) if len(nouns) >= 2 else nouns[0]
            else:
                a = rng.randrange(max(1, len(ws) - n + 1))
                q = "".join(ws[a:a + n]) or nouns[0]
            add(cid, q, typ, rng.choice((2, 1)), 1)
            made += 1
        while made < budget:
            a = rng.randrange(max(1, len(text) - 12))
            add(cid, text[a:a + rng.randint(10, 22)], "summary", 2, made)
            made += 1
        r = rng.random()
        if r < 0.10:      # punctuation / width variant of an entity: an exact duplicate
            add(cid, f"“{ents[0]}”", "entity", 1, 9, "object")
        elif r < 0.15:    # one character more: a near duplicate of a longer query
            q = cols["query"][-1]
            add(cid, q + "的", cols["type"][-1], 1, 9)
        elif r < 0.18:
            add(cid, rng.choice(GENERIC), "entity", 2, 9, "object")
    n = len(cols["query"])
    queries = pl.DataFrame(cols).with_columns(
        grade=pl.col("grade").cast(pl.Int8), salience=pl.col("salience").cast(pl.Int16),
        model=pl.lit("bench"), answer_key=pl.lit("bench"))
    captions = pl.DataFrame({"id": ids, "text": texts})
    assert n > 0
    return queries, captions


def _real_captions() -> list[str]:
    return [json.loads(line)["text"] for line in CAPTIONS.open(encoding="utf-8")]


def synthesise_eval(captions: pl.DataFrame, n: int, n_copies: int = 10, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    base = _real_captions()[1::2]
    clauses = [c for t in base for c in t.replace("。", "，").split("，") if len(c) >= 4]
    out = ["，".join(rng.sample(clauses, 3)) + "。" for _ in range(n - n_copies)]
    texts = captions["text"].to_list()
    for i in rng.sample(range(len(texts)), n_copies):
        chars = list(texts[i])
        for j in rng.sample(range(len(chars)), 2):
            chars[j] = "某"
        out.append("".join(chars))
    return out


def _punct(w: str) -> bool:
    return all(not c.isalnum() for c in w)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="20k records over 2k captions")
    p.add_argument("--captions", type=int)
    p.add_argument("--records", type=int)
    p.add_argument("--eval", type=int, help="evaluation texts to decontaminate against")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--keep", type=Path, help="write the run here and keep it")
    args = p.parse_args()
    n_caps = args.captions or (2_000 if args.small else 100_000)
    n_recs = args.records or (20_000 if args.small else 1_000_000)

    print(f"load average before: {os.getloadavg()[0]:.2f}")
    t0 = time.perf_counter()
    queries, captions = synthesise(n_caps, n_recs)
    evals = synthesise_eval(captions, args.eval or (500 if args.small else 10_000))
    t_synth = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        run = args.keep or Path(tmp)
        run.mkdir(parents=True, exist_ok=True)
        queries.write_parquet(run / "queries.parquet")
        captions.write_parquet(run / "captions.parquet")
        eval_file = run / "eval.jsonl"
        eval_file.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in evals),
                             encoding="utf-8")
        del queries, captions
        t1, c1 = time.perf_counter(), time.process_time()
        manifest = curate(run, CurateConfig(workers=args.workers, decontaminate_against=(eval_file,)))
        wall, cpu = time.perf_counter() - t1, time.process_time() - c1

    print(f"load average after: {os.getloadavg()[0]:.2f}")
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    st = manifest["stats"]
    steps = {k: v for k, v in manifest["timings_s"].items() if k != "total"}
    print(f"records in:        {st['queries_in']:,} over {st['captions_in']:,} captions "
          f"(synthesised in {t_synth:.1f} s)")
    print(f"pairs out:         {st['pairs_out']:,}; query rows train {st['splits']['train']['query_rows']:,}, "
          f"dev {st['splits']['dev']['query_rows']:,}")
    print(f"negatives / query: mean {st['negatives_per_query']['mean']}, min {st['negatives_per_query']['min']}; "
          f"{st['negatives_from_bm25']:,} from BM25, {st['negatives_random_fill']:,} random fill "
          f"(backend {', '.join(st['bm25_backend'])})")
    print(f"dropped:           {json.dumps(st['dropped_by_reason'], ensure_ascii=False)}")
    dc = st["decontamination"]
    print(f"decontamination:   {dc['captions_dropped']:,} captions dropped against {dc['eval_texts']:,} eval texts "
          f"({dc['pairs_scored']:,} ROUGE-L pairs scored, not {st['captions_in'] * dc['eval_texts']:,})")
    print(f"curation wall:     {wall:.1f} s; CPU {cpu:.1f} s in the process (+ pool workers)")
    print(f"peak RSS:          {self_kb / 2**20:.2f} GiB (process), {child_kb / 2**20:.2f} GiB (largest worker)")
    peak = st["peak_rss_gib_after_step"]
    print("time per step (in pipeline order; peak RSS of the process once the step is done):")
    for k, v in steps.items():
        print(f"  {k:<18} {v:7.2f} s  {100 * v / wall:5.1f} %   peak {peak.get(k, 0):5.2f} GiB")


if __name__ == "__main__":
    main()
