"""python -m gen.eval {coverage,zeroshot,finetune,jieba}: see docs/quality.md.

Every command prints its result as JSON; with --results FILE it is also appended there as
one line (name, date, machine, inputs, protocol, figures) for the tables in docs/quality.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from gen.eval import coverage as cov
from gen.eval import pairs as pairs_mod
from gen.eval.finetune import EncoderMissing
from gen.eval.labels import LabelError, load_corpus, load_labels
from gen.logs import json_line


def _record(args, result: dict) -> None:
    result = {"name": args.name, "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{platform.machine()} {platform.node()} ({os.cpu_count()} cores)"} | result
    print(json.dumps(result, ensure_ascii=False, indent=1))
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(json_line(result) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gen.eval", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["coverage", "zeroshot", "finetune", "jieba"])
    ap.add_argument("--corpus", type=Path, required=True, help="captions: JSON lines with id, text")
    ap.add_argument("--labels", type=Path, help="labelled queries: id, query, type, positives[{id, score}]")
    ap.add_argument("--pairs", type=Path, help="a capgen run or shard directory, or a pairs file (query, caption_id)")
    ap.add_argument("--out", type=Path, help="jieba: where to write the pairs (.jsonl or .parquet)")
    ap.add_argument("--generic-share", type=float,
                    help="jieba: drop words found in more than this share of the captions (capgen's curation uses 0.1)")
    ap.add_argument("--name", default="", help="what this run is, for the results table")
    ap.add_argument("--results", type=Path, help="append the result here (JSON lines)")
    ap.add_argument("--n-pairs", type=int, default=12_000, help="finetune: pairs sampled (default 12000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hard-negatives", action="store_true",
                    help="finetune: add each pair's BM25 hard negative (changes the protocol: "
                         "compare only with runs that use it too)")
    ap.add_argument("--clean-batches", action="store_true",
                    help="finetune: keep a caption out of a batch whose other query it contains "
                         "(changes the protocol, as --hard-negatives does)")
    args = ap.parse_args(argv)
    try:
        corpus = load_corpus(args.corpus)
        if args.command == "jieba":
            from gen.eval.baselines import jieba_pairs
            if not args.out:
                ap.error("jieba needs --out")
            df = jieba_pairs(corpus, generic_share=args.generic_share)
            df.write_parquet(args.out) if args.out.suffix == ".parquet" else df.write_ndjson(args.out)
            print(f"{df.height} pairs over {df['caption_id'].n_unique()} captions -> {args.out}")
            return 0
        if not args.labels:
            ap.error(f"{args.command} needs --labels")
        labels = load_labels(args.labels, corpus)
        if args.command == "zeroshot":
            from gen.eval.finetune import load_encoder
            from gen.eval.retrieval import evaluate
            _record(args, {"encoder": "m3e-small", "retrieval": evaluate(load_encoder(), corpus, labels)})
            return 0
        if not args.pairs:
            ap.error(f"{args.command} needs --pairs")
        pairs = pairs_mod.load_pairs(args.pairs)
        unknown = pairs.filter(~pairs["caption_id"].is_in(list(corpus)))
        if unknown.height:
            raise LabelError(f"{args.pairs}: {unknown.height} pairs name captions not in {args.corpus}, "
                             f"e.g. {unknown['caption_id'][0]!r}")
        result = {"pairs_source": str(args.pairs), "pairs": pairs.height,
                  "distinct_pairs": pairs.unique(["query", "caption_id"]).height,
                  "captions": pairs["caption_id"].n_unique(),
                  "coverage": cov.coverage(labels, pairs.select("caption_id", "query", "type").iter_rows())}
        if args.command == "finetune":
            from gen.eval.finetune import Protocol, load_encoder, train
            from gen.eval.retrieval import evaluate
            protocol = Protocol(pairs=args.n_pairs, seed=args.seed, hard_negatives=int(args.hard_negatives),
                                clean_batches=args.clean_batches)
            sample = pairs_mod.sample(pairs, protocol.pairs, protocol.seed)
            if protocol.hard_negatives:
                from gen.eval.hardneg import attach
                sample = attach(sample, pairs, corpus)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as work:
                model = train(load_encoder(seed=protocol.seed), sample, corpus, protocol, Path(work))
            result |= {"protocol": protocol.describe(), "train_s": round(time.perf_counter() - t0, 1),
                       "retrieval": evaluate(model, corpus, labels)}
        _record(args, result)
        return 0
    except (LabelError, FileNotFoundError, ValueError, EncoderMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
