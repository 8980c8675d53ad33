"""How far a grounding check over every query type goes against answers about the wrong caption.

    python benchmarks/quality/grounding_probe.py [--queries Q] [--captions C] [--json-out F]

Q is a run's queries.parquet (real model answers), C its captions (captions.parquet, or the
JSON lines it was made from); by default the bundled model's answers for the 40 captions
in tests/fixtures.
Two pairings of the same answers are checked with curation's own rule
(gen.curate.filters.with_ungrounded: a query is grounded when it, a character bigram of it
or one of its words, function words aside, occurs in its caption; a hypernym when its
entity is):
- healthy: each caption with its own answer;
- shifted: each caption with the answer of the caption before it (what a server that
  answers every request about the previous caption produces).
Reported for each: the share of all pairs the filter drops (grade 2 of grounding_types),
by type and grade, against the rule before it covered every type (grade-2 entities and
conditions, common units counting); and per caption the share of its queries (hypernyms
aside) that are ungrounded, from which curation's run-level warning takes its threshold.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gen.curate import CurateConfig  # noqa: E402
from gen.curate.filters import (BY_SOURCE, COMMON_SHARE, MOSTLY_UNGROUNDED, caption_grounding,  # noqa: E402
                                common_units, ungrounded_ranks, with_ungrounded)
from gen.curate.normalize import cleaned, normalized, tokenize  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
OLD_TYPES = ("entity", "simple_condition", "complex_condition")


def load(queries: Path, captions: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    q = pl.read_parquet(queries, columns=["caption_id", "query", "type", "grade", "source"])
    read = pl.read_parquet if captions.suffix == ".parquet" else pl.read_ndjson
    c = read(captions).select("id", "text")
    q = q.with_columns(q_norm=normalized(cleaned(q["query"])["clean"]))
    uniq = q["q_norm"].unique().sort()
    words = pl.DataFrame({"q_norm": uniq, "q_words": pl.Series(tokenize(uniq.to_list()), dtype=pl.List(pl.String))})
    q = q.join(words, on="q_norm", maintain_order="left")
    c = c.with_columns(c_norm=normalized(c["text"])).with_row_index("pos")
    return q, c


def pairing(q: pl.DataFrame, c: pl.DataFrame, shift: int) -> pl.DataFrame:
    """The queries, each set against the caption `shift` places after its own (cyclic)."""
    n = c.height
    moved = c.select(caption_id="id", target=(pl.col("pos") + shift) % n)
    return (q.join(moved, on="caption_id")
            .join(c.select(target="pos", shown_id="id", c_norm="c_norm"), on="target")
            .drop("caption_id", "target").rename({"shown_id": "caption_id"})
            .with_row_index("rank"))


def measure(pairs: pl.DataFrame, captions: pl.Series) -> dict:
    marked = with_ungrounded(pairs, captions)
    types = list(CurateConfig().grounding_types)
    marked = marked.with_columns(drop=pl.col("_ungrounded") & (pl.col("grade") == 2) & pl.col("type").is_in(types))
    old_claims = pairs.filter(pl.col("type").is_in(OLD_TYPES) & (pl.col("grade") == 2))
    old = pairs["rank"].is_in(ungrounded_ranks(old_claims).implode())
    by = (marked.group_by("type", "grade")
          .agg(n=pl.len(), ungrounded=pl.col("_ungrounded").mean().round(4), dropped=pl.col("drop").mean().round(4))
          .sort("type", "grade"))
    per_caption = caption_grounding(marked.filter(pl.col("type") != BY_SOURCE).rename({"_ungrounded": "ungrounded"}))
    shares = per_caption["share"]
    return {
        "pairs": marked.height,
        "dropped_share": round(float(marked["drop"].mean()), 4),
        "dropped_share_entities_conditions_only": round(float(old.mean()), 4),
        "by_type_grade": by.to_dicts(),
        "captions": per_caption.height,
        "caption_share_quantiles": {str(p): round(float(shares.quantile(p, "nearest")), 3)
                                    for p in (0.5, 0.9, 0.95, 0.99, 1.0)},
        "captions_mostly_ungrounded": round(float((shares > MOSTLY_UNGROUNDED).mean()), 4),
    }


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=Path, default=FIXTURES / "queries_qwen05b_sample.parquet")
    ap.add_argument("--captions", type=Path, default=FIXTURES / "captions_sample.jsonl")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    q, c = load(args.queries, args.captions)
    out = {"queries_file": _shown(args.queries), "captions_file": _shown(args.captions), "captions": c.height, "queries": q.height,
           "common_units": common_units(c["c_norm"], COMMON_SHARE).to_list(),
           "healthy": measure(pairing(q, c, 0), c["c_norm"]),
           "shifted": measure(pairing(q, c, 1), c["c_norm"])}
    text = json.dumps(out, ensure_ascii=False, indent=1)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
