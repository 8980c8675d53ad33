"""Quality filters. Each is a setting, each drop is counted under its reason; a record failing
several is counted once, under the first in FILTER_ORDER (cheapest and most certain first)."""
from __future__ import annotations

import polars as pl
from rapidfuzz.distance import LCSseq

from gen.curate.config import CurateConfig
from gen.curate.normalize import char_ngrams, cjk_share, normalized, tokenize
from gen.curate.steps import split_off
from schemas.text import normalize

FILTER_ORDER = (
    "empty", "stoplist", "too_short", "too_long", "too_few_words", "too_many_words",
    "low_cjk_share", "copies_caption", "ungrounded_grade2",
)
# Checked through the entity it generalises (with_ungrounded), and left out of the run's
# grounding measure, which would count each entity once more for each of its hypernyms.
BY_SOURCE = "hypernym"
# Characters and bigrams in more than this share of a run's captions ("图片", "一个", "上的")
# show nothing about any one caption, so they do not ground a query; measured in
# benchmarks/quality/grounding_probe.py. Runs of fewer captions than COMMON_MIN_CAPTIONS
# are too few to tell what is common.
COMMON_SHARE = 0.2
COMMON_MIN_CAPTIONS = 20
COMMON_SAMPLE = 20_000
# A caption is "mostly ungrounded" when more than this share of its checked queries is;
# a run warns when more than WARN_SHARE of its captions are (and it has WARN_MIN_CAPTIONS).
# Measured on the bundled model's real answers (grounding_probe.py): healthy, 0 of 40
# captions (none above 13%); each answer set against the previous caption, 39 of 40.
MOSTLY_UNGROUNDED = 0.5
WARN_SHARE = 0.2
WARN_MIN_CAPTIONS = 10
# Words too common to show that a query names something in its caption.
FUNCTION_WORDS = frozenset("的 了 在 和 与 及 或 是 有 着 个 一 一个 一些 这 那 上 中 里 下 把 被 对 也 都 很".split())
_ONLY_FUNCTION = "^[" + "".join(sorted(set("".join(FUNCTION_WORDS)))) + "]+$"


def apply(recs: pl.DataFrame, config: CurateConfig, captions: pl.Series,
          common: pl.Series | None = None) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """`recs` needs q_norm, q_words (jieba words of q_norm) and c_norm (its caption's);
    `captions` is every normalised caption of the run, or `common` (run_common_units) is
    given when they are only a part of it. Returns (kept, dropped, grounding report)."""
    q_len = pl.col("q_norm").str.len_chars()
    n_words = pl.col("q_words").list.len()
    stop = sorted({normalize(s) for s in config.stoplist})
    failing = {
        "empty": q_len == 0,
        "stoplist": pl.col("q_norm").is_in(stop),
        "too_short": q_len < config.min_chars,
        "too_long": q_len > config.max_chars,
        "too_few_words": n_words < config.min_words,
        "too_many_words": n_words > config.max_words,
        "low_cjk_share": cjk_share(pl.col("q_norm")) < config.min_cjk_share,
        "copies_caption": pl.col("_copies"),
        "ungrounded_grade2": pl.col("_ungrounded") & pl.col("type").is_in(list(config.grounding_types))
                             & (pl.col("grade") == 2),
    }
    marked = _with_copies(recs, config.copy_ratio)
    marked = with_ungrounded(marked, captions if common is None else None, common)
    report = grounding_report(marked)
    reason = pl.coalesce([pl.when(failing[r]).then(pl.lit(r)) for r in FILTER_ORDER])
    kept, dropped = split_off(marked, reason.is_not_null(), reason)
    helpers = ("_copies", "_ungrounded")
    return kept.drop(helpers), dropped.drop(helpers), report


def _with_copies(recs: pl.DataFrame, ratio: float) -> pl.DataFrame:
    # LCS is at most the query's length, so only queries nearly as long as their caption can
    # copy it: the exact LCS (rapidfuzz, bit-parallel C++) runs on those few alone.
    long_enough = pl.col("q_norm").str.len_chars() >= ratio * pl.col("c_norm").str.len_chars()
    cand = recs.filter(long_enough & (pl.col("c_norm").str.len_chars() > 0)).select("rank", "q_norm", "c_norm")
    copies = [
        r for r, q, c in cand.iter_rows()
        if q == c or LCSseq.similarity(q, c) >= ratio * len(c)
    ]
    return recs.with_columns(_copies=pl.col("rank").is_in(pl.Series(copies, dtype=pl.UInt32).implode()))


def run_common_units(captions: pl.Series) -> pl.Series | None:
    """common_units of a run's normalised captions, None for too few to tell."""
    return common_units(captions, COMMON_SHARE) if captions.n_unique() >= COMMON_MIN_CAPTIONS else None


def with_ungrounded(recs: pl.DataFrame, captions: pl.Series | None, common: pl.Series | None = None) -> pl.DataFrame:
    """recs with `_ungrounded`: the query names nothing in its caption (ungrounded_ranks). A
    hypernym rightly uses words its caption does not, so it stands or falls with the entity
    it generalises (`source`), as salvage drops an entity's hypernyms with it. captions: the
    run's, for common_units; or common already found from them."""
    if captions is not None:
        common = run_common_units(captions)
    cols = ("rank", "q_norm", "q_words", "c_norm")
    own = recs.filter(pl.col("type") != BY_SOURCE).select(cols)
    hyper = recs.filter((pl.col("type") == BY_SOURCE) & pl.col("source").is_not_null())
    src = hyper.select("rank", "c_norm", q_norm=normalized(hyper["source"]))
    src_words = tokenize(src["q_norm"].to_list())
    src = src.with_columns(q_words=pl.Series(src_words, dtype=pl.List(pl.String))).select(cols)
    bad = ungrounded_ranks(pl.concat([own, src]), common)
    return recs.with_columns(_ungrounded=pl.col("rank").is_in(bad.implode()))


def grounding_report(marked: pl.DataFrame) -> dict:
    """How much of the run's answers name nothing in their caption, and a warning when far
    more captions than in a healthy run are mostly such answers (answers about another
    caption: a server that mixes up requests)."""
    checked = marked.filter((pl.col("type") != BY_SOURCE) & (pl.col("q_norm").str.len_chars() > 0))
    per_caption = caption_grounding(checked.rename({"_ungrounded": "ungrounded"}))
    return grounding_summary({
        "queries_checked": checked.height,
        "queries_ungrounded": int(checked["_ungrounded"].sum()),
        "captions_checked": per_caption.height,
        "captions_mostly_ungrounded": int((per_caption["share"] > MOSTLY_UNGROUNDED).sum()),
    })


GROUNDING_COUNTS = ("queries_checked", "queries_ungrounded", "captions_checked", "captions_mostly_ungrounded")


def grounding_summary(counts: dict) -> dict:
    """The grounding report from its counts (which add up over parts of a run, each caption
    whole in one part)."""
    mostly, checked = counts["captions_mostly_ungrounded"], counts["captions_checked"]
    share = mostly / checked if checked else 0.0
    warn = checked >= WARN_MIN_CAPTIONS and share > WARN_SHARE
    return {
        **{k: counts[k] for k in GROUNDING_COUNTS},
        "share_mostly_ungrounded": round(share, 4),
        "warn_above": WARN_SHARE,
        "warning": (f"{mostly} of {checked} captions ({share:.0%}) got answers most of "
                    f"whose queries name nothing in the caption (warns above {WARN_SHARE:.0%}; "
                    f"a healthy run has next to none): the server may be answering about other captions"
                    if warn else None),
    }


def caption_grounding(marked: pl.DataFrame) -> pl.DataFrame:
    """caption_id, n (checked queries), share (of them ungrounded), from rows with
    caption_id and a boolean `ungrounded`."""
    return (marked.group_by("caption_id")
            .agg(n=pl.len(), share=pl.col("ungrounded").cast(pl.Float64).mean())
            .sort("caption_id"))


def common_units(c_norm: pl.Series, share: float) -> pl.Series:
    """Characters and character bigrams found in more than `share` of the distinct captions."""
    uniq = c_norm.unique().sort()
    # An evenly spread sample tells a 20% share as well as all of them, at a fixed cost.
    step = max(1, uniq.len() // COMMON_SAMPLE)
    caps = pl.DataFrame({"c_norm": uniq.gather_every(step)}).with_row_index("cap")
    grams = (pl.concat([char_ngrams(caps, "cap", "c_norm", n) for n in (1, 2)])
             .filter(pl.col("gram").str.len_chars() > 0).unique())
    counts = grams.group_by("gram").agg(n=pl.len())
    return counts.filter(pl.col("n") > share * caps.height)["gram"].sort()


def ungrounded_ranks(recs: pl.DataFrame, common: pl.Series | None = None) -> pl.Series:
    """Ranks of the records (rank, q_norm, q_words, c_norm) that name nothing in their caption."""
    # "Names something in the caption": the query, a character bigram of it or one of its
    # words occurs in the caption. A unit of function words alone ("上的", "一个") or one in
    # `common` (common_units: "图片") is no evidence: most captions have it.
    claims = recs.filter(pl.col("q_norm").str.len_chars() > 0)
    whole = claims.filter(pl.col("c_norm").str.contains(pl.col("q_norm"), literal=True)).select("rank")
    claims = claims.join(whole, on="rank", how="anti")
    bigrams = char_ngrams(claims, "rank", "q_norm", 2).rename({"gram": "unit"})
    words = claims.select("rank", unit="q_words").explode("unit").drop_nulls("unit")
    units = pl.concat([bigrams, words]).unique().filter(~pl.col("unit").str.contains(_ONLY_FUNCTION))
    if common is not None and common.len():
        units = units.filter(~pl.col("unit").is_in(common.implode()))
    units = units.join(claims.select("rank", "c_norm"), on="rank")
    grounded = (units.filter(pl.col("c_norm").str.contains(pl.col("unit"), literal=True))
                .select("rank").unique())
    return claims.select("rank").join(grounded, on="rank", how="anti")["rank"]
