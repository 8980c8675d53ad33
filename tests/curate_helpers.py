"""Builders for curation tests: a run directory as the generation stage writes it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import polars as pl

from gen.curate import CurateConfig, curate

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def sample_captions() -> list[dict]:
    with (FIXTURES / "captions_sample.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def rec(caption_id: str, query: str, type: str = "entity", grade: int = 2, salience: int = 1,
        subtype: Optional[str] = None, source: Optional[str] = None) -> dict[str, Any]:
    if subtype is None and type in ("entity", "hypernym"):
        subtype = "object"
    return dict(caption_id=caption_id, query=query, type=type, subtype=subtype, grade=grade,
                salience=salience, source=source, model="test-model", answer_key="k-" + caption_id)


def write_run(run: Path, captions: list[dict], records: list[dict]) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    schema = {"caption_id": pl.String, "query": pl.String, "type": pl.String, "subtype": pl.String,
              "grade": pl.Int8, "salience": pl.Int16, "source": pl.String, "model": pl.String,
              "answer_key": pl.String}
    pl.DataFrame(records, schema=schema).write_parquet(run / "queries.parquet")
    pl.DataFrame([{"id": c["id"], "text": c["text"], "extra": "{}"} for c in captions],
                 schema={"id": pl.String, "text": pl.String, "extra": pl.String}).write_parquet(run / "captions.parquet")
    return run


def run_curate(tmp_path: Path, captions: list[dict], records: list[dict], **settings) -> tuple[dict, Path]:
    """Curate a fresh run; returns (manifest, shards folder)."""
    settings.setdefault("dev_fraction", 0.0)
    run = write_run(tmp_path / "run", captions, records)
    manifest = curate(run, CurateConfig(**settings))
    return manifest, run / "shards"


def rows(shards: Path, split: str = "train") -> list[dict]:
    files = sorted(shards.glob(f"{split}-*.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files]).to_dicts() if files else []


def dropped(shards: Path) -> pl.DataFrame:
    return pl.read_parquet(shards / "dropped.parquet")


def reason_of(shards: Path, caption_id: str, query: str) -> Optional[str]:
    d = dropped(shards).filter((pl.col("caption_id") == caption_id) & (pl.col("query") == query))
    return d["reason"][0] if d.height else None
