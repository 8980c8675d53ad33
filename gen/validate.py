"""Turn a model's raw text into a validated `CaptionQueries`, or say exactly why not.

Structured decoding makes most answers clean JSON, but servers without it (or thinking
models) wrap the object in code fences or <think> blocks; we take the outermost JSON object.
The error text is written for the model as much as for the user: it goes back to the model
in the repair round.
"""
from __future__ import annotations

import json
import re

from pydantic import ValidationError

from schemas import CaptionQueries
from schemas.text import normalize

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
MAX_ERRORS_SHOWN = 6


class AnswerError(ValueError):
    pass


def _json_object(text: str) -> str:
    text = _THINK.sub("", text)
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise AnswerError("the answer contains no JSON object")
    return text[start:end + 1]


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors()[:MAX_ERRORS_SHOWN]:
        where = ".".join(str(p) for p in e["loc"]) or "answer"
        lines.append(f"- {where}: {e['msg'].removeprefix('Value error, ')}")
    more = err.error_count() - MAX_ERRORS_SHOWN
    if more > 0:
        lines.append(f"- ... and {more} more")
    return "\n".join(lines)


def parse_answer(text: str, caption: str, refusal: str | None = None) -> CaptionQueries:
    if not text.strip():
        raise AnswerError(f"the model refused: {refusal}" if refusal else "the answer is empty")
    try:
        data = json.loads(_json_object(text))
    except json.JSONDecodeError as e:
        raise AnswerError(f"the answer is not valid JSON: {e.msg} at position {e.pos}") from None
    try:
        return CaptionQueries.model_validate(
            data, context={"caption": caption, "caption_norm": normalize(caption)})
    except ValidationError as e:
        raise AnswerError("the answer does not match the schema:\n" + _explain(e)) from None
