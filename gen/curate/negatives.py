"""Hard negatives: BM25 (bm25s) over one split's captions, minus false negatives.

Most complaints about mined negatives are false negatives: a "negative" that is relevant.
A candidate caption is not a negative of a query when
- it generated the same normalised query itself (whether or not that record survived the
  filters, the cap or the split): `known` holds every (caption, normalised query) of the run;
- it contains the normalised query as a substring; or
- it contains every jieba word of the query (each as a substring, which also catches a
  caption jieba happened to cut differently); or
- its normalised text equals one of the row's positives' ("红色汽车停在路边。" and
  "红色汽车停在路边"): another id or punctuation gives it another answer key, so it need not
  have generated the query, yet it is the positive itself.
Candidates need a BM25 score above zero. A one-word query ("管道") has none that pass the
guard: every caption sharing a term with it contains it. So rows BM25 leaves short are
filled (random_fill) with captions of the split drawn by a fixed hash of the query id,
through the same guard, after the BM25 ones and marked by a BM25 score of 0.0: no harder
than in-batch negatives, but they give every row the k negatives trainers expect.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

import bm25s
import numpy as np
import polars as pl

from gen.curate.config import CurateConfig
from gen.curate.normalize import normalized, search_terms

logging.getLogger("bm25s").setLevel(logging.ERROR)

# numba's JIT compile costs ~5 s a process; bm25s' numpy path costs (measured, 2-core
# x86_64) ~0.2 ms a query plus ~0.085 us a caption. Use numba when numpy would take longer.
_NUMBA_COMPILE_S = 5.0
_PRUNE_MIN_CAPTIONS = 1_000
_BATCH = 25_000


def _backend(config: CurateConfig, n_queries: int, n_docs: int) -> str:
    if config.bm25_backend != "auto":
        return config.bm25_backend
    try:
        import numba  # noqa: F401
    except ImportError:
        return "numpy"
    numpy_s = n_queries * (2e-4 + 8.5e-8 * n_docs)
    return "numba" if numpy_s > _NUMBA_COMPILE_S else "numpy"


class SplitIndex:
    """BM25 over one split's captions (jieba search-mode terms, normalize.search_terms)."""

    def __init__(self, words: Sequence[list[str]], config: CurateConfig, n_queries: int):
        self.n_docs = len(words)
        self.backend = _backend(config, n_queries, self.n_docs)
        self.threads = config.workers
        self.bm25 = bm25s.BM25(backend=self.backend)
        self.bm25.index(list(words), show_progress=False)
        self.vocab = self.bm25.vocab_dict
        df: Counter = Counter()
        for doc in words:
            df.update(set(doc))
        self.common: set[str] = set()
        if self.n_docs >= _PRUNE_MIN_CAPTIONS:
            self.common = {w for w, c in df.items() if c > config.bm25_prune_df * self.n_docs}

    def query_tokens(self, words: list[str]) -> list[str]:
        known = [w for w in search_terms(words) if w in self.vocab]
        pruned = [w for w in known if w not in self.common]
        return pruned or known

    def search(self, queries: list[list[str]], depth: int) -> tuple[np.ndarray, np.ndarray]:
        depth = min(depth, self.n_docs)
        docs, scores = self.bm25.retrieve(queries, k=depth, show_progress=False, n_threads=self.threads)
        return np.asarray(docs), np.asarray(scores)



class SplitIndexes:
    """Each split's captions (doc = position) and its BM25 index, each built once when first
    asked for: cross-caption positives and negatives search the same index."""

    def __init__(self, caps: pl.DataFrame, rows: pl.DataFrame, config: CurateConfig):
        self.all_caps, self.rows, self.config = caps, rows, config
        self._caps: dict[str, pl.DataFrame] = {}
        self._index: dict[str, SplitIndex] = {}

    def captions(self, name: str) -> pl.DataFrame:
        if name not in self._caps:
            self._caps[name] = self.all_caps.filter(pl.col("split") == name).sort("id").with_row_index("doc")
        return self._caps[name]

    def index(self, name: str) -> SplitIndex:
        if name not in self._index:
            n_queries = self.rows.filter(pl.col("split") == name).height
            self._index[name] = SplitIndex(self.captions(name)["c_words"].to_list(), self.config, n_queries)
        return self._index[name]

def candidates(index: SplitIndex, rows: pl.DataFrame, depth: int) -> pl.DataFrame:
    """(qrow, pos, doc, score): each query row's top `depth` captions (pos 0 = best) with a
    score above 0."""
    tokens = [tuple(index.query_tokens(q)) for q in rows["q_words"].to_list()]
    # Different queries often leave the same BM25 terms ("红色的汽车", "红色汽车"): search
    # each set of terms once. A query with no term in this split's captions has no candidate.
    distinct = list(dict.fromkeys(t for t in tokens if t))
    empty = pl.DataFrame(schema={"qrow": pl.UInt32, "pos": pl.Int64, "doc": pl.Int64, "score": pl.Float64})
    if not distinct:
        return empty
    slot = {t: i for i, t in enumerate(distinct)}
    docs, scores = index.search([list(t) for t in distinct], depth)
    width = docs.shape[1]
    found = pl.DataFrame({
        "slot": np.repeat(np.arange(len(distinct)), width),
        "pos": np.tile(np.arange(width), len(distinct)),
        "doc": docs.reshape(-1).astype(np.int64),
        "score": scores.reshape(-1).astype(np.float64),
    }).filter(pl.col("score") > 0)
    owners = pl.DataFrame({"qrow": rows["qrow"], "slot": [slot.get(t, -1) for t in tokens]},
                          schema={"qrow": pl.UInt32, "slot": pl.Int64})
    return owners.join(found, on="slot").select("qrow", "pos", "doc", "score")


def positive_twins(rows: pl.DataFrame, caps: pl.DataFrame) -> pl.DataFrame:
    """(qrow, doc): the captions of `caps` whose normalised text equals one of the row's
    positives'. From the positives' texts, not their ids: where the split is in BM25 shards,
    a positive's caption may sit in another shard than its twin."""
    if "pos" not in rows.columns or rows.height == 0:
        return pl.DataFrame(schema={"qrow": rows.schema["qrow"], "doc": caps.schema["doc"]})
    pos = rows.select("qrow", text="pos").explode("text").drop_nulls("text")
    pos = pos.with_columns(c_norm=normalized(pos["text"]))
    return pos.join(caps.select("doc", "c_norm"), on="c_norm").select("qrow", "doc").unique()


def _guard(cand: pl.DataFrame, rows: pl.DataFrame, caps: pl.DataFrame, known: pl.DataFrame,
           stats: Counter, twins: pl.DataFrame) -> pl.DataFrame:
    """cand (qrow, doc, score) minus false negatives. known: (qrow, doc) pairs where the
    caption generated the query itself; twins: positive_twins. Integer joins first; strings
    only for what is left."""
    n0 = cand.height
    cand = cand.join(known, on=["qrow", "doc"], how="anti")
    stats["known_positive"] += n0 - cand.height
    n1 = cand.height
    texts = cand.join(caps.select("doc", "c_norm"), on="doc").join(rows.select("qrow", "q_norm"), on="qrow")
    cand = texts.filter(~pl.col("c_norm").str.contains(pl.col("q_norm"), literal=True))
    stats["contains_query"] += n1 - cand.height
    words = rows.select("qrow", w="q_words").explode("w").filter(pl.col("w").is_not_null()).unique()
    n_words = words.group_by("qrow").agg(n_words=pl.len())
    all_in = (cand.select("qrow", "doc", "c_norm").join(words, on="qrow")
              .filter(pl.col("c_norm").str.contains(pl.col("w"), literal=True))
              .group_by("qrow", "doc").agg(hits=pl.len())
              .join(n_words, on="qrow").filter(pl.col("hits") == pl.col("n_words")))
    n2 = cand.height
    cand = cand.join(all_in.select("qrow", "doc"), on=["qrow", "doc"], how="anti")
    stats["contains_all_words"] += n2 - cand.height
    n3 = cand.height
    cand = cand.join(twins, on=["qrow", "doc"], how="anti")
    stats["same_text_as_positive"] += n3 - cand.height
    return cand.select("qrow", "doc", "score")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # A fixed integer hash (numpy's and polars' own generators are not promised stable).
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _fill(found: pl.DataFrame, rows: pl.DataFrame, caps: pl.DataFrame, known: pl.DataFrame,
          k: int, stats: Counter, twins: pl.DataFrame) -> pl.DataFrame:
    """Random negatives for rows with fewer than k, (qrow, doc, score=0.0), guard applied."""
    have = found.group_by("qrow").agg(n=pl.len())
    short = (rows.select("qrow", "query_id").join(have, on="qrow", how="left")
             .with_columns(need=k - pl.col("n").fill_null(0)).filter(pl.col("need") > 0))
    if short.height == 0:
        return found.clear()
    draws = 3 * k + 8
    seeds = np.array([int(q[1:17], 16) for q in short["query_id"].to_list()], dtype=np.uint64)
    j = np.arange(draws, dtype=np.uint64)
    with np.errstate(over="ignore"):
        docs = _splitmix64(seeds[:, None] * np.uint64(draws) + j[None, :]) % np.uint64(caps.height)
    cand = pl.DataFrame({
        "qrow": np.repeat(short["qrow"].to_numpy(), draws),
        "draw": np.tile(np.arange(draws), short.height),
        "doc": docs.reshape(-1).astype(np.int64),
    }).unique(["qrow", "doc"], keep="first").join(found.select("qrow", "doc"), on=["qrow", "doc"], how="anti")
    guarded = _guard(cand.with_columns(score=pl.lit(0.0)), rows, caps, known, stats, twins)
    picked = (cand.join(guarded.select("qrow", "doc"), on=["qrow", "doc"])
              .join(short.select("qrow", "need"), on="qrow")
              .sort("qrow", "draw")
              .filter(pl.int_range(pl.len()).over("qrow") < pl.col("need")))
    return picked.select("qrow", "doc", score=pl.lit(0.0))


def _mine_batch(index: SplitIndex, rows: pl.DataFrame, caps: pl.DataFrame, known: pl.DataFrame,
                config: CurateConfig, stats: Counter, twins: pl.DataFrame) -> pl.DataFrame:
    k = config.negatives
    # One search, deep enough for the hard cases; the guard (string work) then looks at the
    # first k + mine_depth candidates of every row, and further down only for rows still short.
    first = k + config.mine_depth
    cand = candidates(index, rows, 4 * first)
    found, todo = [], rows.select("qrow")
    for lo, hi in ((0, first), (first, 4 * first)):
        window = cand.filter((pl.col("pos") >= lo) & (pl.col("pos") < hi)).join(todo, on="qrow")
        found.append(_guard(window, rows, caps, known, stats, twins))
        have = pl.concat(found).group_by("qrow").agg(n=pl.len()).filter(pl.col("n") >= k)
        todo = todo.join(have, on="qrow", how="anti")
        if todo.height == 0:
            break
    found = (pl.concat(found).sort(["qrow", "score", "doc"], descending=[False, True, False])
             .group_by("qrow", maintain_order=True).head(k))
    if config.random_fill:
        found = pl.concat([found, _fill(found, rows, caps, known, k, stats, twins)])
    return found


def mine(rows: pl.DataFrame, indexes: SplitIndexes, name: str, known: pl.DataFrame,
         config: CurateConfig, stats: Counter) -> pl.DataFrame:
    """Negatives of each query row of one split.

    rows: qrow, q_norm, q_words (and pos, the positives' texts, where it has them) of split
    `name`; indexes: its captions (doc = 0.., id, c_norm,
    c_words) and BM25 index.
    known: every (caption_id, q_norm) the run generated, dropped or not. Returns qrow, neg_ids, neg_bm25 (lists,
    best first; ties broken by caption order so the result is deterministic)."""
    out_schema = {"qrow": pl.UInt32, "neg_ids": pl.List(pl.String), "neg_bm25": pl.List(pl.Float64)}
    k = config.negatives
    caps = indexes.captions(name)
    if k == 0 or rows.height == 0 or caps.height == 0:
        return pl.DataFrame(schema=out_schema)
    index = indexes.index(name)
    stats["bm25_backend_" + index.backend] += 1
    known = (known.join(caps.select(caption_id="id", doc="doc"), on="caption_id")
             .join(rows.select("q_norm", "qrow"), on="q_norm").select("qrow", "doc"))
    # Rows in batches: the candidate frames grow with them, memory must not.
    found = pl.concat([
        _mine_batch(index, batch, caps, known.join(batch.select("qrow"), on="qrow"), config, stats,
                    positive_twins(batch, caps))
        for batch in rows.iter_slices(_BATCH)
    ])
    return (
        found
        .join(caps.select("doc", "id"), on="doc")
        .sort(["qrow", "score", "doc"], descending=[False, True, False])
        .group_by("qrow", maintain_order=True)
        .agg(neg_ids=pl.col("id"), neg_bm25=pl.col("score"))
        .cast({"qrow": pl.UInt32})
    )


def attach(rows: pl.DataFrame, indexes: SplitIndexes, known: pl.DataFrame, config: CurateConfig,
           stats: Counter) -> pl.DataFrame:
    """rows (all splits) with neg, neg_ids, neg_bm25 lists (empty where none), each split
    mined against its own captions (indexes.all_caps: id, text, c_norm, c_words, split)."""
    found = []
    for name in ("train", "dev"):
        found.append(mine(rows.filter(pl.col("split") == name), indexes, name, known, config, stats))
    texts = indexes.all_caps.select(neg_ids="id", neg_text="text")
    negs = (pl.concat(found).explode("neg_ids", "neg_bm25")
            .filter(pl.col("neg_ids").is_not_null())
            .join(texts, on="neg_ids", how="left", maintain_order="left")
            .group_by("qrow", maintain_order=True)
            .agg(neg=pl.col("neg_text"), neg_ids=pl.col("neg_ids"), neg_bm25=pl.col("neg_bm25")))
    return rows.join(negs, on="qrow", how="left", maintain_order="left").with_columns(
        [pl.col(c).fill_null([]) for c in ("neg", "neg_ids", "neg_bm25")])
