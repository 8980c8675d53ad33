"""Partitioned curation and BM25 shards on the curation benchmark's synthetic run: wall, CPU,
peak memory, and what sharding does to the negatives.

    python benchmarks/curate_partitions.py --run /tmp/run1m                       # in memory
    python benchmarks/curate_partitions.py --run /tmp/run1m --partition-records 250000
    python benchmarks/curate_partitions.py --run /tmp/run1m --partition-records 250000 \\
        --bm25-shard-captions 25000

--run is made on first use (curate_bench.py's synthesis: 1M records over 100k captions,
10k evaluation texts; --records/--captions for others) and reused after, so each setting
runs in a fresh process on the same input: peak RSS is that process's (ru_maxrss), and
the largest child's is the jieba pool worker. Negatives: of the train split's, the share
found by BM25 and by random fill, the mean BM25 score of the BM25 ones (scores of
different shard sizes rest on different IDF, so compare them loosely), and the mean
positives per query row (cross-caption positives come from the row's shard only).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gen.curate import CurateConfig, curate  # noqa: E402


def make_run(run: Path, n_captions: int, n_records: int) -> None:
    from curate_bench import synthesise
    synthesise(run, n_captions, n_records, 10_000)


def negatives(shards: Path) -> dict:
    train = pl.concat([pl.read_parquet(f, columns=["neg_bm25", "pos_ids"]) for f in shards.glob("train-*.parquet")])
    scores = train["neg_bm25"].explode().drop_nulls()
    bm25 = scores.filter(scores > 0)
    return {"negatives": scores.len(),
            "bm25_share": round(bm25.len() / scores.len(), 4) if scores.len() else 0.0,
            "random_fill_share": round(1 - bm25.len() / scores.len(), 4) if scores.len() else 0.0,
            "mean_bm25_score": round(float(bm25.mean()), 3) if bm25.len() else 0.0,
            "positives_per_row": round(float(train["pos_ids"].list.len().mean()), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run directory (made on first use)")
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--captions", type=int, default=100_000)
    p.add_argument("--partition-records", type=int, help="default: above the run's records (in memory)")
    p.add_argument("--bm25-shard-captions", type=int, help="default: above the run's captions (one shard)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    if not (args.run / "queries.parquet").is_file():
        make_run(args.run, args.captions, args.records)
    big = 10**12
    config = CurateConfig(workers=args.workers, decontaminate_against=(args.run / "eval.jsonl",),
                          partition_records=args.partition_records or big,
                          bm25_shard_captions=args.bm25_shard_captions or big)
    out = args.run.parent / f"{args.run.name}-shards-{args.partition_records}-{args.bm25_shard_captions}"
    t0, c0 = time.perf_counter(), time.process_time()
    manifest = curate(args.run, config, out_dir=out)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    st = manifest["stats"]
    print(json.dumps({
        "partition_records": args.partition_records, "bm25_shard_captions": args.bm25_shard_captions,
        "records": st["queries_in"], "pairs_out": st["pairs_out"], "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "largest_child_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
        "train_negatives": negatives(out), "timings_s": manifest["timings_s"]}, indent=1))


if __name__ == "__main__":
    main()
