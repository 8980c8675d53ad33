"""Render gen.eval's results (JSON lines) as the markdown tables of docs/quality.md.

    .venv/bin/python benchmarks/quality/table.py results.jsonl
"""
from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    zero = next((r for r in rows if "pairs_source" not in r), None)
    base = zero["retrieval"]["ndcg@10"] if zero else None
    print("| run | distinct pairs | coverage | nDCG@10 | vs zero-shot |\n|---|---|---|---|---|")
    for r in rows:
        cov = f"{100 * r['coverage']['coverage']:.1f}%" if r.get("coverage") else "-"
        ndcg = r.get("retrieval", {}).get("ndcg@10")
        delta = f"{ndcg - base:+.2f}" if ndcg is not None and base is not None and r is not zero else "-"
        print(f"| {r['name']} | {r.get('distinct_pairs', '-')} | {cov} | {ndcg if ndcg is not None else '-'} | {delta} |")
    typed = [r for r in rows if "retrieval" in r]
    types = sorted({t for r in typed for t in r["retrieval"]["by_type"]})
    print("\n| run | " + " | ".join(t.replace("singleton_", "") for t in types) + " |")
    print("|---|" + "---|" * len(types))
    for r in typed:
        print(f"| {r['name']} | " + " | ".join(str(r["retrieval"]["by_type"].get(t, "-")) for t in types) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
