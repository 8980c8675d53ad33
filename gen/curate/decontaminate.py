"""Drop captions too close to an evaluation set (ROUGE-L F1 on characters, the paper's > 0.6).

All pairs is 100k x 10k = 1e9 LCS computations; instead an inverted index of the eval
texts' character n-grams proposes candidates, and ROUGE-L runs on those alone:
- n-grams found in many eval texts are left out of the index (they propose everything and
  decide nothing);
- a pair is a candidate when it shares at least _MIN_SHARED of the caption's indexed
  n-grams, and its lengths allow the threshold at all: F1 = 2*LCS/(|a|+|b|) and LCS <=
  min(|a|,|b|), so the longer text can be at most (2/threshold - 1) times the shorter;
- a caption keeps its _TOP candidates sharing the most n-grams.
This is a filter for near copies, not a proof: a rewrite that keeps few runs of n characters
can be missed (measured below), and is not what decontamination is after.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import polars as pl
from rapidfuzz.distance import LCSseq

from gen.input.captions import BROKEN, input_format, open_lines
from gen.curate.normalize import char_ngrams, normalized

# An n-gram in more eval texts than this share (and at least _STOP_MIN) is not indexed.
_STOP_SHARE = 0.01
_STOP_MIN = 50
# Share of a caption's indexed n-grams a candidate must share, and how many candidates (most
# shared first) a caption gets at most. Checked against all pairs: of 365 CapRetrieval
# captions above 0.6 against copies with 10-35% of characters edited, 360 found; all of the
# benchmark's (benchmarks/BENCHMARKS.md).
_MIN_SHARED = 0.2
_TOP = 10
_CHUNK = 20_000


def load_eval_texts(paths: Iterable[Path]) -> list[str]:
    """The `text` of every record; read as captions are (JSON lines, compressed or not, or parquet)."""
    texts: list[str] = []
    for path in map(Path, paths):
        kind = input_format(path)
        if kind == "parquet":
            try:
                texts += pl.read_parquet(path, columns=["text"])["text"].to_list()
            except pl.exceptions.ColumnNotFoundError as e:
                raise ValueError(f"{path}: no `text` column") from e
            continue
        n = 0
        try:
            with open_lines(path, kind) as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        texts.append(json.loads(line)["text"])
        except BROKEN as e:
            raise ValueError(f"{path}: {kind} data broken after line {n} ({e})") from e
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a JSON object with a `text` field ({e})") from e
    return texts


def rouge_l(a: str, b: str) -> float:
    """Character-level ROUGE-L F1 (beta 1): 2 * LCS / (|a| + |b|)."""
    if not a or not b:
        return 0.0
    return 2 * LCSseq.similarity(a, b) / (len(a) + len(b))


def eval_index(evals: pl.DataFrame, n: int) -> pl.DataFrame:
    """(gram, ev) for the eval texts' n-grams, without the ones found in too many texts."""
    e_grams = char_ngrams(evals, "ev", "e_norm", n).unique()
    df = e_grams.group_by("gram").agg(df=pl.len())
    stop = max(_STOP_MIN, math.ceil(_STOP_SHARE * evals.height))
    return e_grams.join(df.filter(pl.col("df") <= stop).select("gram"), on="gram")


def candidates(captions: pl.DataFrame, evals: pl.DataFrame, index: pl.DataFrame, n: int,
               threshold: float) -> pl.DataFrame:
    """(cap, ev) candidate pairs. captions: cap (int), c_norm; evals: ev (int), e_norm."""
    c_grams = char_ngrams(captions, "cap", "c_norm", n).unique().join(
        index.select("gram").unique(), on="gram")
    need = c_grams.group_by("cap").agg(
        need=pl.max_horizontal(pl.lit(1), (pl.len() * _MIN_SHARED).ceil().cast(pl.Int64)))
    ratio = 2 / threshold - 1
    lens = captions.select("cap", la=pl.col("c_norm").str.len_chars())
    e_lens = evals.select("ev", lb=pl.col("e_norm").str.len_chars())
    return (
        c_grams.join(index, on="gram")
        .group_by("cap", "ev").agg(shared=pl.len())
        .join(need, on="cap")
        .filter(pl.col("shared") >= pl.col("need"))
        .join(lens, on="cap").join(e_lens, on="ev")
        .filter((pl.max_horizontal("la", "lb") <= ratio * pl.min_horizontal("la", "lb")))
        .sort(["cap", "shared", "ev"], descending=[False, True, False])
        .group_by("cap", maintain_order=True).head(_TOP)
        .select("cap", "ev")
    )


def contaminated(captions: pl.DataFrame, eval_texts: list[str], threshold: float, n: int) -> tuple[pl.DataFrame, int]:
    """Captions (id, c_norm) whose ROUGE-L with some eval text exceeds the threshold:
    (id, eval_index, rouge_l of the closest eval text), and how many pairs were scored.
    eval_index counts the non-blank lines of the eval files, in the order given."""
    empty = pl.DataFrame(schema={"id": pl.String, "eval_index": pl.Int64, "rouge_l": pl.Float64})
    if not eval_texts or captions.height == 0:
        return empty, 0
    caps = captions.select("id", "c_norm").with_row_index("cap")
    evals = pl.DataFrame({"e_norm": normalized(pl.Series(eval_texts, dtype=pl.String))}).with_row_index("ev")
    index = eval_index(evals, n)
    # Captions in chunks: the gram join grows with them, memory must not.
    pairs = pl.concat([candidates(caps.slice(i, _CHUNK), evals, index, n, threshold)
                       for i in range(0, caps.height, _CHUNK)])
    c_text, e_text = caps["c_norm"].to_list(), evals["e_norm"].to_list()
    scores = [rouge_l(c_text[c], e_text[e]) for c, e in zip(pairs["cap"].to_list(), pairs["ev"].to_list())]
    hits = (
        pairs.join(caps.select("cap", "id"), on="cap", maintain_order="left")
        .select("id", eval_index=pl.col("ev").cast(pl.Int64))
        .with_columns(rouge_l=pl.Series(scores, dtype=pl.Float64))
        .filter(pl.col("rouge_l") > threshold)
        .sort(["id", "rouge_l", "eval_index"], descending=[False, True, False])
        .unique("id", keep="first", maintain_order=True)
    )
    return hits, pairs.height
