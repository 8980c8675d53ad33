"""What curation takes from the judge (python -m gen.judge): grades of the run's own pairs,
and grades of the hard-negative candidates of the previous curation.

Own pairs (`judge`): "drop" removes those graded 0; "regrade" also puts the judge's 1/2 in
place of the generator's grade.

Candidates (`judge_candidates`): another caption the judge graded 1 or 2 for a query is a
positive the generator did not claim, so it joins the query's positives with that grade
(cross.extend) and can never be mined as a negative; one graded 0 is a negative the judge
confirmed, marked in the shards' `neg_judged`. Matched on the normalised query, so a grade
survives a re-curation that changed the query's surface form.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from gen.curate.normalize import normalized
from gen.curate.steps import split_off, with_rank

JUDGEMENTS = "judgements.parquet"
CANDIDATE_JUDGEMENTS = "candidate_judgements.parquet"
_EMPTY = {"caption_id": pl.String, "q_norm": pl.String, "judge_grade": pl.Int8}


def inputs(run_dir: Path, judge: str, candidates: bool) -> list[Path]:
    """The judge files a curation with these settings reads (they change its output)."""
    return ([run_dir / JUDGEMENTS] if judge != "off" else []) + \
           ([run_dir / CANDIDATE_JUDGEMENTS] if candidates else [])


def require(run_dir: Path, judge: str, candidates: bool) -> None:
    """The judge files these settings read, checked before any work (a partitioned curation
    reads them in its tasks, where a missing file would surface late and wrapped)."""
    for path, setting in ((run_dir / JUDGEMENTS, f"judge = {judge!r}"),
                          (run_dir / CANDIDATE_JUDGEMENTS, "judge_candidates = true")):
        if path in inputs(run_dir, judge, candidates) and not path.is_file():
            raise FileNotFoundError(f"{setting} needs {path}: run python -m gen.judge first")


def _read(path: Path, setting: str, captions: pl.Series | None = None) -> pl.DataFrame:
    """captions: only the grades of these captions (a partition's, gen/curate/partitioned.py),
    filtered as it is read, so the whole file is never held."""
    if not path.is_file():
        raise FileNotFoundError(f"{setting} needs {path}: run python -m gen.judge first")
    grades = pl.scan_parquet(path).select("caption_id", "query", "judge_grade")
    if captions is not None:
        grades = grades.filter(pl.col("caption_id").is_in(captions.unique().implode()))
    return grades.collect()   # the filter is pushed into the reader; file order kept for keep="first"


def apply_own(recs: pl.DataFrame, run_dir: Path, mode: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    if mode == "off":
        return split_off(recs, pl.lit(False), "judged_irrelevant")
    grades = (_read(run_dir / JUDGEMENTS, f"judge = {mode!r}", recs["caption_id"])
              .unique(["caption_id", "query"], keep="first"))
    recs = recs.join(grades, on=["caption_id", "query"], how="left", maintain_order="left")
    kept, dropped = split_off(recs, pl.col("judge_grade") == 0, "judged_irrelevant")
    if mode == "regrade":  # an unjudged pair keeps the generator's grade
        kept = kept.with_columns(grade=pl.coalesce(pl.col("judge_grade").cast(pl.Int64), "grade"))
        kept = with_rank(kept.drop("rank"))  # rank orders by grade first
    return kept.drop("judge_grade"), dropped.drop("judge_grade")


def candidates(run_dir: Path, on: bool) -> pl.DataFrame:
    """caption_id, q_norm, judge_grade of every judged candidate (ungraded ones left out);
    where two surface forms of one query got different grades, the higher stands."""
    if not on:
        return pl.DataFrame(schema=_EMPTY)
    return graded(_read(run_dir / CANDIDATE_JUDGEMENTS, "judge_candidates = true"))


def graded(got: pl.DataFrame) -> pl.DataFrame:
    """candidates() from rows of candidate_judgements.parquet (all of a query's, or none)."""
    got = got.drop_nulls("judge_grade")
    return (got.with_columns(q_norm=normalized(got["query"]))
            .group_by("caption_id", "q_norm").agg(pl.col("judge_grade").max())
            .select(*_EMPTY).cast(_EMPTY).sort("q_norm", "caption_id"))


def positives(judged: pl.DataFrame) -> pl.DataFrame:
    return judged.filter(pl.col("judge_grade") >= 1)


def mark_confirmed(rows: pl.DataFrame, judged: pl.DataFrame) -> pl.DataFrame:
    """rows with neg_judged: per negative, whether the judge graded it 0 for this query."""
    zero = judged.filter(pl.col("judge_grade") == 0).select("q_norm", neg_ids="caption_id", _z=pl.lit(True))
    if zero.height == 0:   # judge_candidates off (the default): no per-negative join to pay for
        return rows.with_columns(neg_judged=pl.col("neg_ids").list.eval(pl.lit(False)))
    flags = (rows.select("qrow", "q_norm", "neg_ids").explode("neg_ids")
             .join(zero, on=["q_norm", "neg_ids"], how="left", maintain_order="left")
             .group_by("qrow", maintain_order=True)
             .agg(neg_judged=pl.col("_z").fill_null(False).filter(pl.col("neg_ids").is_not_null())))
    return rows.join(flags, on="qrow", how="left", maintain_order="left").with_columns(
        pl.col("neg_judged").fill_null([]).cast(pl.List(pl.Boolean)))
