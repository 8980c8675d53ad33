"""How far can *any* pairs lift the encoder under the fixed protocol? A diagnostic, not data.

Every LLM-made pool lands at nDCG@10 73-74 (docs/quality.md). Is that the encoder and
protocol, or the queries? This splits the labelled queries in two halves by id, writes
half A's human (query, positive caption) pairs as a training-pairs file and half B as a
labels file, so that `gen.eval finetune` can train on people's own queries and be scored
on other people's queries. If human pairs lift half B far above what capgen's pairs do,
the queries are the limit and better generation has room; if not, the protocol is.

The pairs it writes are the dev labels themselves: they go to --out (a scratch folder),
never into the repository, a prompt, an example or a filter list, and nothing in capgen
reads them. Only the scores are recorded.

    python benchmarks/quality/human_split.py split --labels dev_queries.jsonl --out /tmp/split \\
        [--captions-below 1536]
    # train once on any pairs (none: zero-shot), score on both halves, append to --results
    python benchmarks/quality/human_split.py score --split /tmp/split --corpus captions.jsonl \\
        --pairs /tmp/split/pairs_a.jsonl --name "human A" --results split.jsonl
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def half(query_id: str) -> str:
    # The benchmark's ids are hex digests: their parity is a fixed, content-blind split.
    return "a" if int(query_id, 16) % 2 == 0 else "b"


def caption_number(caption_id: str) -> int:
    return int(caption_id.rsplit(".", 1)[-1])


def score(args) -> None:
    """The fixed protocol (gen.eval.finetune), scored on each half separately."""
    from gen.eval.finetune import Protocol, load_encoder, train
    from gen.eval.labels import load_corpus, load_labels
    from gen.eval.pairs import load_pairs, sample
    from gen.eval.retrieval import evaluate

    corpus = load_corpus(args.corpus)
    halves = {h: load_labels(args.split / f"labels_{h}.jsonl", corpus) for h in ("a", "b")}
    protocol = Protocol(seed=args.seed)
    model = load_encoder(seed=protocol.seed)
    if args.pairs:
        with tempfile.TemporaryDirectory() as work:
            model = train(model, sample(load_pairs(args.pairs), protocol.pairs, protocol.seed),
                          corpus, protocol, Path(work))
    row = {"name": args.name, "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
           "pairs_source": str(args.pairs), "seed": args.seed}
    row |= {f"half_{h}": evaluate(model, corpus, labels) for h, labels in halves.items()}
    print(json.dumps({"name": args.name, **{h: row[f"half_{h}"]["ndcg@10"] for h in "ab"}}))
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def split_labels(args) -> None:
    rows = [json.loads(line) for line in args.labels.open(encoding="utf-8") if line.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for name in ("a", "b"):
        part = [r for r in rows if half(r["id"]) == name]
        counts |= {name: len(part), f"pairs_{name}": 0}
        with open(args.out / f"labels_{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        with open(args.out / f"pairs_{name}.jsonl", "w", encoding="utf-8") as f:
            for r in part:
                for p in r["positives"]:
                    if args.captions_below is None or caption_number(p["id"]) < args.captions_below:
                        f.write(json.dumps({"query": r["query"], "caption_id": p["id"], "type": r["type"]},
                                           ensure_ascii=False) + "\n")
                        counts[f"pairs_{name}"] += 1
    print(json.dumps(counts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("split")
    sp.add_argument("--labels", type=Path, required=True)
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument("--captions-below", type=int, default=None,
                    help="keep training pairs of captions cr.0 .. cr.N-1 only (the captions capgen's runs used)")
    sc = sub.add_parser("score")
    sc.add_argument("--split", type=Path, required=True, help="the folder `split` wrote")
    sc.add_argument("--corpus", type=Path, required=True)
    sc.add_argument("--pairs", type=Path, help="any gen.eval --pairs source; none: zero-shot")
    sc.add_argument("--name", required=True)
    sc.add_argument("--results", type=Path, required=True)
    sc.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    split_labels(args) if args.cmd == "split" else score(args)


if __name__ == "__main__":
    main()
