"""What the judge answers for one caption: a grade per query, in the order asked.

Grades use the benchmark's definitions: 2 certainly or almost certainly shown; 1 likely
shown, or highly related by search intent; 0 not. The count must match the queries asked:
judge_json_schema(n) says so to the decoder (minItems = maxItems = n), since a 0.5B model
asked for 13 grades wrote 10, or looped "0, 1, 2, ..." to max_tokens, in most answers
without it; gen/judge.py checks the count anyway, for servers that ignore schemas.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict

from schemas.answer import not_a_bool


class Judgement(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grades: list[Annotated[Literal[0, 1, 2], BeforeValidator(not_a_bool)]]


def judge_json_schema(n: Optional[int] = None) -> dict[str, Any]:
    """The answer's schema; with n, a list of exactly n grades."""
    grades: dict[str, Any] = {"type": "array", "items": {"type": "integer", "enum": [0, 1, 2]}}
    if n is not None:
        grades |= {"minItems": n, "maxItems": n}
    return {"type": "object", "additionalProperties": False, "required": ["grades"],
            "properties": {"grades": grades}}
