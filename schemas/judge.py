"""What the judge answers for one caption: a grade per query, in the order asked.

Grades use the benchmark's definitions: 2 certainly or almost certainly shown; 1 likely
shown, or highly related by search intent; 0 not. The count must match the queries asked,
which a grammar cannot say for a list of any length: gen/judge.py checks it.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class Judgement(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grades: list[Literal[0, 1, 2]]


def judge_json_schema() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["grades"],
            "properties": {"grades": {"type": "array", "items": {"type": "integer", "enum": [0, 1, 2]}}}}
