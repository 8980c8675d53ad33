"""Pydantic models for every record capgen reads, asks for, or writes.

Flow: Caption (input line) -> CaptionQueries (the LLM's answer, also the decoding
constraint) -> QueryRecord (one row of queries.parquet) / Reject (one line of rejects.jsonl).
"""
from schemas.answer import (
    CaptionQueries,
    Entity,
    Item,
    QUERY_TYPES,
    answer_json_schema,
    decoding_constraints,
    is_short,
)
from schemas.caption import Caption
from schemas.records import QueryRecord, Reject

__all__ = [
    "Caption",
    "CaptionQueries",
    "Entity",
    "Item",
    "QUERY_TYPES",
    "QueryRecord",
    "Reject",
    "answer_json_schema",
    "decoding_constraints",
    "is_short",
]
