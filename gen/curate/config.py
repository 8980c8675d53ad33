"""Curation settings: one frozen pydantic model, and a fingerprint of the ones that change the data."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gen.atomic import sha256_file
from gen.settings import Float, Int, OptFloat, OptInt
from schemas.answer import QUERY_TYPES

# A typo in a type name would match no query and turn its filter off without a word.
QueryType = Literal[QUERY_TYPES]

# Queries that would match almost any caption of an image data set. Written for capgen (not
# taken from any evaluation set); compared after schemas.text.normalize, so punctuation,
# width and case variants are covered.
DEFAULT_STOPLIST = (
    "图片", "照片", "图像", "图", "画面", "这张图", "这张图片", "这张照片", "一张图片", "一张照片",
    "图片内容", "图片中", "图中", "画面中", "场景", "内容", "东西", "物品", "物体", "事物",
    "背景", "细节", "信息", "文字", "截图", "屏幕截图", "图片描述", "描述", "展示", "显示",
    "其他", "一些东西", "某物", "某人", "有人", "人", "人们", "东西和人", "一个场景", "一个画面",
    "image", "picture", "photo", "photograph", "screenshot", "scene", "something",
)

# Settings that decide how the job runs or how the same rows are cut into files, not which
# rows come out: a re-curation with only these changed keeps the fingerprint.
RUNTIME_FIELDS = frozenset({"workers", "bm25_backend", "rows_per_shard", "partition_records", "executor"})


class CurateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- cleaning ---------------------------------------------------------------------
    # Jaccard of character 2- and 3-gram sets at or above which two queries of one caption
    # are near-duplicates (the worse one goes).
    near_dup_threshold: Float = Field(0.6, gt=0, le=1)
    # Lengths of the normalised query (punctuation and spaces removed). One character is a
    # real search in Chinese (猫, 鱼); min_chars 2 cost 4% of coverage (docs/quality.md).
    min_chars: Int = Field(1, ge=1)
    max_chars: Int = Field(64, ge=1)
    # Lengths in jieba words.
    min_words: Int = Field(1, ge=1)
    max_words: Int = Field(32, ge=1)
    # Share of Han characters in the normalised query.
    min_cjk_share: Float = Field(0.5, ge=0, le=1)
    # A query whose longest common subsequence with its caption covers this share of the
    # caption copies it.
    copy_ratio: Float = Field(0.8, gt=0, le=1)
    stoplist: tuple[str, ...] = DEFAULT_STOPLIST
    # Types whose grade-2 queries must share a character bigram or a word with the caption
    # (a hypernym: its entity must). Grade 1 ("likely shown") may rightly name what the
    # caption only implies (厨房 for a fridge), so it is measured, never dropped. Over every
    # type this catches 97% of answers set against the wrong caption, for 2 more of 491
    # healthy pairs than entities and conditions alone (docs/reliability.md).
    grounding_types: tuple[QueryType, ...] = QUERY_TYPES

    # Use the judge's grades (python -m gen.judge writes judgements.parquet): "drop" removes
    # pairs it graded 0; "regrade" also puts its 1/2 in place of the generator's grade.
    judge: Literal["off", "drop", "regrade"] = "off"
    # Use the judge's grades of hard-negative candidates (python -m gen.judge --candidates K
    # writes candidate_judgements.parquet): graded 1/2 become positives, 0 confirmed negatives.
    judge_candidates: bool = False
    # Round-trip filter (gen/curate/roundtrip.py): drop a record whose caption is not in
    # the BM25 top roundtrip_k for its query nor contains it; None turns it off.
    roundtrip_k: OptInt = Field(None, ge=1)
    roundtrip_exempt: tuple[QueryType, ...] = ("hypernym",)

    # --- decontamination --------------------------------------------------------------
    # JSON lines files with a `text` field; captions too close to any line are dropped.
    decontaminate_against: tuple[Path, ...] = ()
    # Character-level ROUGE-L F1 above which a caption is contaminated (the paper's 0.6).
    decontam_threshold: Float = Field(0.6, gt=0, le=1)
    # Candidate pairs come from character n-grams this long shared with an eval text.
    decontam_ngram: Int = Field(3, ge=1)

    # --- positives --------------------------------------------------------------------
    # A query with more positive captions than max(generic_share * captions,
    # generic_min_positives) is generic (a false negative for most in-batch partners): dropped.
    # Only truly generic ones: people search with broad words (男子, 公园), and at 1% the
    # filter removed most of what matched the benchmark's queries (docs/quality.md).
    generic_share: Float = Field(0.1, gt=0, le=1)
    generic_min_positives: Int = Field(5, ge=1)
    # Of a query that is not generic, keep at most this many positives (the best graded).
    max_positives: Int = Field(16, ge=1)
    # Share of summary queries among all (query, caption) pairs; None keeps the generated
    # mix. Lower it for keyword-heavy data, raise it for more overall summaries (the paper's
    # SM/KW granularity dilemma: a mix did best).
    summary_share: OptFloat = Field(None, ge=0, le=1)

    # Other captions of the split containing the whole query become grade-1 positives
    # (gen/curate/cross.py); cross_depth BM25 candidates per query are looked at.
    cross_positives: bool = True
    cross_depth: Int = Field(64, ge=1)

    # --- negatives --------------------------------------------------------------------
    # Hard negatives per query row (FlagEmbedding's train_group_size - 1 is the usual pick).
    negatives: Int = Field(7, ge=0)
    # BM25 candidates looked at per query, beyond k, by the false-negative guard; rows left
    # short look on, down to 4 * (negatives + mine_depth).
    mine_depth: Int = Field(32, ge=1)
    # Fill rows that BM25 leaves short of `negatives` with guarded random captions of the
    # split (neg_bm25 0.0); one-word queries have no BM25 negative that is not a false one.
    random_fill: bool = True
    # Query rows with fewer negatives than this (capped at `negatives`) are dropped:
    # FlagEmbedding fails on an empty `neg` list.
    min_negatives: Int = Field(1, ge=0)
    # Query words found in more than this share of a split's captions are left out of the
    # BM25 query (near-zero IDF, yet most of the work); only for splits of 1,000+ captions.
    bm25_prune_df: Float = Field(0.05, gt=0, le=1)
    # BM25 (negatives, cross-caption positives, the round trip) searches a split in shards of
    # at most this many captions, each query row in one shard (gen/curate/partitioned.py), so
    # its cost per query stays bounded as runs grow. A split within it is searched whole.
    bm25_shard_captions: Int = Field(100_000, ge=1)

    # --- split and shards -------------------------------------------------------------
    dev_fraction: Float = Field(0.05, ge=0, le=1)
    rows_per_shard: Int = Field(100_000, ge=1)
    # The licence the dataset card of each version states (gen/publish/card.py), a hub identifier
    # such as cc-by-4.0; the user's to set, as it follows from the captions' and the model's
    # terms. Part of the fingerprint: a new licence makes a new version with its card.
    dataset_license: str = Field("unknown", pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")

    # --- runtime ----------------------------------------------------------------------
    workers: Int = Field(2, ge=1)
    bm25_backend: Literal["auto", "numpy", "numba"] = "auto"
    # A run of more query records than this is curated in partitions of about this many
    # (gen/curate/partitioned.py): the memory a curation needs follows it, not the run's size.
    # The output is the same either way.
    partition_records: Int = Field(500_000, ge=1)
    # Where partitions run: "local" one after another in this process, "ray" as tasks on a
    # Ray cluster (RAY_ADDRESS, else a local instance), which need the run directory and its
    # output on storage every node sees (docs/ray.md).
    executor: Literal["local", "ray"] = "local"

    @field_validator("decontaminate_against")
    @classmethod
    def _readable_files(cls, paths: tuple[Path, ...]) -> tuple[Path, ...]:
        # Checked with the settings, by every command: the fingerprint reads each file
        # before the first log line, and a run would pay for every request first.
        for path in paths:
            try:
                problem = ("" if path.is_file() and os.access(path, os.R_OK) else
                           "not a file" if path.exists() else "no such file")
            except (OSError, ValueError) as e:   # ValueError: a NUL in the path
                problem = str(e)
            if problem:
                raise PydanticCustomError("setting", "{path}: {problem}", {"path": str(path), "problem": problem})
        return paths

    @model_validator(mode="after")
    def _bounds_in_order(self) -> "CurateConfig":
        for low, high in (("min_chars", "max_chars"), ("min_words", "max_words")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} ({getattr(self, low)}) must not exceed {high} ({getattr(self, high)})")
        return self

    def data_settings(self) -> dict:
        """The settings that change the rows, eval files named by their content."""
        out = self.model_dump(mode="json", exclude=set(RUNTIME_FIELDS))
        # The same eval set under another name decontaminates the same; an edited file does not.
        out["decontaminate_against"] = [sha256_file(Path(p)) for p in self.decontaminate_against]
        return out

    def fingerprint(self) -> str:
        blob = json.dumps(self.data_settings(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()
