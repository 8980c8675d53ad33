"""Probe: conditions, events and conjunctions with an entity swapped for its own hypernym.

The benchmark's weakest query types are conditions, and its people search with category
words ("a dog on a beach" for a caption about a golden retriever on a beach). capgen's
answer already holds both halves: conditions that name an entity, and that entity's
hypernyms. The 0.5B model does not combine them when asked (prompt v3, docs/quality.md);
this does it in code, with no LLM: for each such query of a caption and each of its
entities that stands in the query as whole jieba words, one variant per hypernym of that
entity ("乡间公路上的野猪" -> "乡间公路上的动物"). A variant is as true of the caption as
the less sure of its query and entity, so it takes the lower grade.

Writes a run directory that `python -m gen.curate` and `gen.eval` read like any other:
the original rows plus the variants (same type, subtype "variant", source "entity->hypernym").
No dev query is read here; the probe is measured with gen.eval like every other row.

    .venv/bin/python benchmarks/quality/hypernym_variants.py --run RUN --out RUN_VARIANTS
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import polars as pl

TARGETS = ("event", "conjunction", "simple_condition", "complex_condition")


def boundaries(words: list[str]) -> set[int]:
    edges, at = {0}, 0
    for w in words:
        at += len(w)
        edges.add(at)
    return edges


def swap(query: str, entity: str, hypernym: str, edges: set[int]) -> str | None:
    """query with its first whole-word occurrence of entity replaced; None if there is none."""
    start = query.find(entity)
    while start >= 0:
        if start in edges and start + len(entity) in edges:
            return query[:start] + hypernym + query[start + len(entity):]
        start = query.find(entity, start + 1)
    return None


def variants(queries: pl.DataFrame) -> pl.DataFrame:
    import jieba
    jieba.setLogLevel(60)
    hyper = (queries.filter(pl.col("type") == "hypernym")
             .join(queries.filter(pl.col("type") == "entity").select("caption_id", source="query", e_grade="grade"),
                   on=["caption_id", "source"])
             .select("caption_id", entity="source", hypernym="query", e_grade="e_grade")
             .unique())
    targets = queries.filter(pl.col("type").is_in(TARGETS))
    pairs = (targets.join(hyper, on="caption_id")
             .filter(pl.col("query").str.contains(pl.col("entity"), literal=True),
                     ~pl.col("query").str.contains(pl.col("hypernym"), literal=True),
                     pl.col("entity") != pl.col("hypernym")))
    cuts = {q: boundaries(jieba.lcut(q)) for q in pairs["query"].unique().to_list()}
    made = [swap(q, e, h, cuts[q]) for q, e, h in pairs.select("query", "entity", "hypernym").iter_rows()]
    return (pairs.with_columns(variant=pl.Series(made, dtype=pl.String))
            .filter(pl.col("variant").is_not_null())
            .with_columns(query=pl.col("variant"), subtype=pl.lit("variant"),
                          grade=pl.min_horizontal("grade", pl.col("e_grade").cast(pl.Int8)),
                          source=pl.format("{}->{}", "entity", "hypernym"))
            .select(queries.columns)
            .unique(["caption_id", "query"], keep="first", maintain_order=True)
            .join(queries.select("caption_id", "query"), on=["caption_id", "query"], how="anti"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a gen.run output directory")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    queries = pl.read_parquet(args.run / "queries.parquet")
    extra = variants(queries)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.run / "captions.parquet", args.out / "captions.parquet")
    pl.concat([queries, extra.cast(queries.schema)]).write_parquet(args.out / "queries.parquet")
    by_type = dict(extra.group_by("type").len().iter_rows())
    print(f"{queries.height} queries + {extra.height} variants {by_type} -> {args.out}")


if __name__ == "__main__":
    main()
