"""Rows capgen writes: one QueryRecord per accepted query, one Reject per thing not accepted.

QueryRecord documents a row of queries.parquet; gen/export/ writes the columns directly
(a model per row cost more than the rest of the export), and a test keeps the two in step.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel


class QueryRecord(BaseModel):
    caption_id: str
    query: str
    type: str          # one of schemas.answer.QUERY_TYPES
    subtype: Optional[str]   # entity kind (object/person/place/concept) for entities and hypernyms
    grade: int         # 2 strongly shown, 1 likely or related
    salience: int      # rank within its caption and type, 1 = most salient
    source: Optional[str]    # for a hypernym: the entity it generalises
    # What produced it: the answer's cache key names model, template, schema, sampling and text.
    model: str
    answer_key: str


class Reject(BaseModel):
    # input: a bad line; generation: a caption with no queries; query: one query dropped
    # from an answer whose other queries were kept.
    stage: Literal["input", "generation", "query"]
    reason: str
    file: Optional[str] = None
    line: Optional[int] = None
    caption_id: Optional[str] = None
    # The rejected thing itself: the input line, the model's last raw answer, or the query.
    raw: Optional[Any] = None
