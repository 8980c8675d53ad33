"""Curation: generated query records -> training shards that trainers load directly.

    curate(run_dir, config) reads RUN_DIR/queries.parquet and captions.parquet and writes
    RUN_DIR/shards/ (or out_dir). Steps, in order: normalise, decontaminate captions, judge, exact
    duplicates, filters, near duplicates, round trip, SM/KW mix, positives, split, cross-caption
    positives, negatives, write.

Every input record ends as a (query, positive) pair in a shard or as a row of
dropped.parquet with its reason; curate() checks that the two add up.
"""
from __future__ import annotations

import logging
import resource
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import polars as pl

from gen.curate import InputError, check_run_dir, cross, dedup, filters, judged, negatives, positives, roundtrip, split
from gen.curate.config import CurateConfig
from gen.curate.decontaminate import contaminated, load_eval_texts
from gen.curate.normalize import cleaned, normalized, tokenize
from gen.curate.steps import split_off, with_rank
from gen.curate.write import write_outputs

log = logging.getLogger(__name__)


INPUT_COLUMNS = ("caption_id", "query", "type", "subtype", "grade", "salience", "source",
                 "model", "answer_key")
RECORD_CASTS = {"grade": pl.Int64, "salience": pl.Int64}


class _Timer:
    """Wall seconds per step, and the process's peak memory once each step is done (so the
    step that raised it shows)."""

    def __init__(self, announce: bool = False) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_gib: dict[str, float] = {}
        self.announce = announce

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        t0 = time.perf_counter()
        if self.announce:   # a long curation says where it is
            log.info("curate: %s", step, extra={"fields": {"event": "curate_step", "step": step}})
        yield
        self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - t0
        self.peak_gib[step] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def curate(run_dir: Path, config: Optional[CurateConfig] = None, out_dir: Optional[Path] = None,
           name: Optional[Path] = None) -> dict:
    """Curate one generation run; returns the manifest written to out_dir/manifest.json.
    name: the run directory to name in messages, when run_dir is a staging copy of it."""
    config = config or CurateConfig()
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "shards"
    out.mkdir(parents=True, exist_ok=True)
    # Until the new manifest is written last, the folder must not claim to be complete.
    (out / "manifest.json").unlink(missing_ok=True)
    from gen.curate import partitioned
    if partitioned.needed(run_dir, config):
        return partitioned.curate_partitioned(run_dir, config, out, name)
    timer, stats, drops = _Timer(announce=True), {}, []
    t_start = time.perf_counter()

    with timer("load"):
        raw = load_queries(run_dir)
        caps = load_captions(run_dir)
    stats["queries_in"], stats["captions_in"] = raw.height, caps.height
    stats["queries_in_by_type"] = _counts(raw, "type")

    with timer("normalize"):
        recs, q_guard = clean_queries(raw)
        caps, refused_caps, c_guard = clean_captions(caps)
        stats["text_guard"] = {**q_guard, **c_guard}
        # Every (caption, query) the run generated, before any drop, and every other pair the
        # judge found relevant: the false-negative guard.
        graded = judged.candidates(run_dir, config.judge_candidates)
        known = pl.concat([recs.select("caption_id", "q_norm"),
                           judged.positives(graded).select("caption_id", "q_norm")]).unique()

    with timer("decontaminate"):
        evals = load_eval_texts(config.decontaminate_against)
        caps, hits, n_scored = decontaminate_captions(caps, evals, config)
    stats["decontamination"] = {"eval_texts": len(evals), "pairs_scored": n_scored,
                                "captions_dropped": hits.height}

    with timer("tokenize_captions"):
        caps = tokenize_captions(caps, config)

    recs, stats["grounding"] = record_steps(recs, caps, refused_caps, hits, run_dir, config, timer, drops)
    if stats["grounding"]["warning"]:
        log.warning("curation of %s: %s", name or run_dir, stats["grounding"]["warning"])

    with timer("roundtrip"):
        recs, d = roundtrip.apply(recs, caps, config)
        drops.append(d)

    with timer("mix"):
        recs, d = positives.mix(recs, config.summary_share)
        drops.append(d)

    with timer("positives"):
        recs, d = positives.group(recs, caps.height, config)
        drops.append(d)

    with timer("split"):
        caps = split.assign(caps, config.dev_fraction)
        recs = recs.join(caps.select(caption_id="id", split="split", pos_text="text"), on="caption_id")
        rows = _query_rows(recs)

    # One BM25 index per split, built on first use, serves both steps below.
    indexes = negatives.SplitIndexes(caps, rows, config)
    with timer("cross_positives"):
        rows, stats["judged_positives"] = cross.extend(rows, indexes, config, judged.positives(graded))

    with timer("negatives"):
        guard: Counter = Counter()
        rows = judged.mark_confirmed(negatives.attach(rows, indexes, known, config, guard), graded)
        # negatives=0 asks for none, so it cannot fall short of them.
        least = min(config.min_negatives, config.negatives)
        few = rows.filter(pl.col("neg").list.len() < least).select("query_id", "split")
        rows = rows.join(few, on=["query_id", "split"], how="anti")
        recs = recs.join(few.with_columns(_few=pl.lit(True)), on=["query_id", "split"], how="left")
        recs, d = split_off(recs, pl.col("_few").is_not_null(), "too_few_negatives",
                            pl.format("fewer than {} negatives", pl.lit(least)))
        recs, d = recs.drop("_few"), d.drop("_few")
        drops.append(d)

    with timer("write"):
        dropped = pl.concat([x.select("row", *INPUT_COLUMNS, "reason", "detail") for x in drops],
                            how="vertical_relaxed").sort("row")
        stats.update(_stats(rows, recs, dropped, guard, config))
        stats["peak_rss_gib_after_step"] = timer.peak_gib
        if stats["pairs_out"] + dropped.height != raw.height:
            raise AssertionError(f"curation lost records: {raw.height} in, {stats['pairs_out']} "
                                 f"out, {dropped.height} dropped")
        manifest = write_outputs(out, rows, caps, dropped, config, stats, timer.seconds, t_start)
    # A partitioned curation's parts that failed before (other settings or inputs, as this
    # one ran in memory): never reused, and nothing else would ever remove them.
    partitioned.remove_parts(out)
    return manifest


def _read_run_file(path: Path, columns: list[str]) -> pl.DataFrame:
    # check_run_dir read the footer; a damaged page further in surfaces only here.
    try:
        return pl.read_parquet(path, columns=columns)
    except (pl.exceptions.ComputeError, OSError, pl.exceptions.PolarsError) as e:
        raise InputError(f"{path} is damaged (a page past its header cannot be read): {e}") from None


# Columns no row of a run file may leave empty: every later step keys or reads them.
REQUIRED = {"queries.parquet": ("caption_id", "query"), "captions.parquet": ("id", "text")}


def require_values(df: pl.DataFrame, path: Path, offset: int = 0) -> pl.DataFrame:
    """df (rows offset.. of path) if it has every REQUIRED value, else an InputError naming
    the first row without one."""
    for col in REQUIRED[path.name]:
        nulls = df[col].is_null()
        if nulls.any():
            raise InputError(f"{path}: row {offset + int(nulls.arg_true()[0]) + 1}: {col} is missing (null; "
                             f"{int(nulls.sum())} such row(s) in rows {offset + 1}-{offset + df.height}): "
                             "not a gen.run output, or damaged")
    return df


def load_queries(run_dir: Path) -> pl.DataFrame:
    path = run_dir / "queries.parquet"
    return require_values(_read_run_file(path, list(INPUT_COLUMNS)), path).with_row_index("row").cast(RECORD_CASTS)


def load_captions(run_dir: Path) -> pl.DataFrame:
    path = run_dir / "captions.parquet"
    return require_values(_read_run_file(path, ["id", "text"]), path).unique("id", keep="first", maintain_order=True)


def clean_queries(raw: pl.DataFrame) -> tuple[pl.DataFrame, dict]:
    """Every text a shard holds passes schemas.text.clean here, whatever wrote the run's
    files: queries as q_clean (`query` stays as generated, for dropped.parquet)."""
    q = cleaned(raw["query"])
    recs = with_rank(raw.with_columns(q_clean=q["clean"], _refused=q["refused"]))
    recs = recs.with_columns(q_norm=normalized(recs["q_clean"]))
    return recs, {"queries_refused": int(q["refused"].is_not_null().sum()),
                  "queries_cleaned": int((q["refused"].is_null() & (q["clean"] != raw["query"])).sum())}


def clean_captions(caps: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Captions cleaned in place (own and cross positives, negatives, the BEIR corpus all
    read them), with c_norm; the refused ones apart as (caption_id, _cap_refused)."""
    c = cleaned(caps["text"])
    counts = {"captions_refused": int(c["refused"].is_not_null().sum()),
              "captions_cleaned": int((c["refused"].is_null() & (c["clean"] != caps["text"])).sum())}
    refused = caps.select(caption_id="id", _cap_refused=c["refused"]).drop_nulls("_cap_refused")
    caps = caps.with_columns(text=c["clean"]).filter(c["refused"].is_null())
    return caps.with_columns(c_norm=normalized(caps["text"])), refused, counts


def decontaminate_captions(caps: pl.DataFrame, evals: list[str], config: CurateConfig
                           ) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    hits, n_scored = contaminated(caps, evals, config.decontam_threshold, config.decontam_ngram)
    return caps.join(hits.select("id"), on="id", how="anti"), hits, n_scored


def tokenize_captions(caps: pl.DataFrame, config: CurateConfig) -> pl.DataFrame:
    return caps.join(_words_table(caps["c_norm"], "c_norm", "c_words", config.workers, search=True),
                     on="c_norm", maintain_order="left")


def record_steps(recs: pl.DataFrame, caps: pl.DataFrame, refused_caps: pl.DataFrame, hits: pl.DataFrame,
                 run_dir: Path, config: CurateConfig, timer: "_Timer", drops: list,
                 common: Optional[pl.Series] = None) -> tuple[pl.DataFrame, dict]:
    """The steps that look at one caption's records at a time: text and caption refusals,
    decontamination, the judge, duplicates, filters. caps: the captions left after cleaning
    and decontamination (id, c_norm), of the run or of one partition of it; common:
    filters.common_units of the whole run, when caps is only a part of it. Returns the
    records left (with q_words, c_norm) and the grounding report."""
    with timer("normalize"):
        recs, d = split_off(recs, pl.col("_refused").is_not_null(), "control_characters", pl.col("_refused"))
        drops.append(d)
        recs = recs.drop("_refused").join(refused_caps, on="caption_id", how="left", maintain_order="left")
        recs, d = split_off(recs, pl.col("_cap_refused").is_not_null(), "caption_control_characters",
                            pl.format("caption: {}", pl.col("_cap_refused")))
        drops.append(d)
        recs = recs.drop("_cap_refused")

    with timer("decontaminate"):
        recs = recs.join(hits.rename({"id": "caption_id"}), on="caption_id", how="left")
        recs, d = split_off(recs, pl.col("rouge_l").is_not_null(), "decontaminated",
                            pl.format("rouge_l={} eval_text={}", pl.col("rouge_l").round(3), pl.col("eval_index")))
        recs = recs.drop("rouge_l", "eval_index")
        drops.append(d)
        recs, d = split_off(recs, ~pl.col("caption_id").is_in(caps["id"].implode()), "unknown_caption")
        drops.append(d)

    with timer("judge"):
        recs, d = judged.apply_own(recs, run_dir, config.judge)
        drops.append(d)

    with timer("dedup_exact"):
        recs, d = dedup.exact(recs)
        drops.append(d)

    with timer("tokenize_queries"):
        words = _words_table(recs["q_norm"], "q_norm", "q_words", config.workers)
        recs = recs.join(words, on="q_norm").join(caps.select(caption_id="id", c_norm="c_norm"), on="caption_id")

    with timer("filters"):
        recs, d, grounding = filters.apply(recs, config, caps["c_norm"], common)
        drops.append(d)

    with timer("dedup_near"):
        recs, d = dedup.near(recs, config.near_dup_threshold)
        drops.append(d)
    return recs, grounding


def _words_table(texts: pl.Series, key: str, name: str, workers: int, search: bool = False) -> pl.DataFrame:
    uniq = texts.unique().sort()
    return pl.DataFrame({key: uniq, name: pl.Series(tokenize(uniq.to_list(), workers, search),
                                                    dtype=pl.List(pl.String))})


def _query_rows(recs: pl.DataFrame) -> pl.DataFrame:
    """One row per (query, split); positives best-ranked first."""
    return (
        recs.sort("rank")
        .group_by("query_id", "split", maintain_order=True)
        .agg(query=pl.col("q_text").first(), type=pl.col("q_type").first(),
             subtype=pl.col("q_subtype").first(), q_norm=pl.col("q_norm").first(),
             q_words=pl.col("q_words").first(), pos=pl.col("pos_text"),
             pos_ids=pl.col("caption_id"), pos_scores=pl.col("grade").cast(pl.Float64),
             n_generated=pl.len())
        .sort("split", "query_id")
        .with_row_index("qrow")
    )


def _counts(df: pl.DataFrame, col: str) -> dict:
    return dict(sorted(Counter(df[col].to_list()).items(), key=lambda kv: str(kv[0])))


def _stats(rows: pl.DataFrame, recs: pl.DataFrame, dropped: pl.DataFrame, guard: Counter,
           config: CurateConfig) -> dict:
    return finish_stats(partial_stats(rows, recs, guard, config), _counts(dropped, "reason"))


def partial_stats(rows: pl.DataFrame, recs: pl.DataFrame, guard: Counter, config: CurateConfig) -> dict:
    """The counts behind the manifest's stats, of query rows and their records: these add up
    over parts of a run (merge_stats), finish_stats turns them into the stats."""
    n_neg = rows["neg"].list.len()
    per_split = {}
    for name in ("train", "dev"):
        part = rows.filter(pl.col("split") == name)
        full = part.filter(pl.col("neg").list.len() >= config.negatives)
        per_split[name] = {
            "query_rows": part.height,
            "pairs": int(part["pos"].list.len().sum() or 0),  # cross positives included
            "st_rows": int(full["pos"].list.len().sum() or 0),
            "st_query_rows_short_of_negatives": part.height - full.height,
        }
    return {
        "generated": int(rows["n_generated"].sum() or 0),
        "positives": int(rows["pos"].list.len().sum() or 0),
        "negatives_judged_irrelevant": int(rows["neg_judged"].list.sum().sum() or 0),
        "query_rows_by_type": dict(Counter(rows["type"].to_list())),
        "pairs_by_type": dict(Counter(recs["type"].to_list())),
        "splits": per_split,
        "rows": rows.height,
        "negatives": int(n_neg.sum() or 0),
        "negatives_min": int(n_neg.min()) if rows.height else None,
        "negatives_max": int(n_neg.max()) if rows.height else None,
        "negatives_from_bm25": int(rows["neg_bm25"].list.eval((pl.element() > 0).sum()).explode().sum() or 0),
        "guard": dict(guard),
    }


def merge_stats(parts: list[dict]) -> dict:
    """partial_stats of several parts as one."""
    def add(a, b):
        if isinstance(a, dict):
            return {k: add(a.get(k), b.get(k)) if k in a and k in b else a.get(k, b.get(k))
                    for k in {**a, **b}}
        return a + b
    out = parts[0] if parts else None
    for p in parts[1:]:
        mins = [x for x in (out["negatives_min"], p["negatives_min"]) if x is not None]
        maxs = [x for x in (out["negatives_max"], p["negatives_max"]) if x is not None]
        out = {**add({k: v for k, v in out.items() if k not in ("negatives_min", "negatives_max")},
                     {k: v for k, v in p.items() if k not in ("negatives_min", "negatives_max")}),
               "negatives_min": min(mins) if mins else None, "negatives_max": max(maxs) if maxs else None}
    return out


def _sorted_counts(counts: dict) -> dict:
    return dict(sorted(counts.items(), key=lambda kv: str(kv[0])))


def finish_stats(p: dict, by_reason: dict) -> dict:
    guard = p["guard"]
    by_reason = _sorted_counts(by_reason)
    return {
        # Generated (query, caption) pairs written: the records' side of the accounting.
        "pairs_out": p["generated"],
        # Positives added by cross.py on top of them (judged_positives, set by the caller, are
        # the part the judge added).
        "cross_positives": p["positives"] - p["generated"],
        "negatives_judged_irrelevant": p["negatives_judged_irrelevant"],
        "query_rows_by_type": _sorted_counts(p["query_rows_by_type"]),
        "pairs_by_type": _sorted_counts(p["pairs_by_type"]),
        "dropped_by_reason": by_reason,
        "duplicates_removed": {"exact": by_reason.get("duplicate_exact", 0),
                               "near": by_reason.get("duplicate_near", 0)},
        "splits": {name: dict(p["splits"][name]) for name in ("train", "dev")},
        "negatives_per_query": {
            "mean": round(p["negatives"] / p["rows"], 3) if p["rows"] else 0.0,
            "min": p["negatives_min"] or 0,
            "max": p["negatives_max"] or 0,
        },
        # Of the negatives written: found by BM25, or random fill (BM25 score 0.0).
        "negatives_from_bm25": p["negatives_from_bm25"],
        "negatives_random_fill": p["negatives"] - p["negatives_from_bm25"],
        "bm25_backend": sorted(k.removeprefix("bm25_backend_") for k in guard if k.startswith("bm25_backend_")),
        "false_negative_candidates_excluded": {
            k: v for k, v in sorted(guard.items()) if k in ("known_positive", "contains_query", "contains_all_words",
                                                    "same_text_as_positive")},
    }
