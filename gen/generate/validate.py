"""Turn a model's raw text into a validated `CaptionQueries`, or say exactly why not.

Structured decoding makes most answers clean JSON, but servers without it (or thinking
models) wrap the object in code fences or <think> blocks; we take the outermost JSON object.
The error text is written for the model as much as for the user: it goes back to the model
in the repair rounds.

An answer still invalid after the last round is often invalid in one query only: a short caption
("一份包含苹果、酸奶和茶的中餐") invites a summary that repeats it whole. `salvage` keeps
the rest of such an answer rather than lose a caption's every query to one of them.
"""
from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from schemas import CaptionQueries
from schemas.answer import Salvaged
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


def _context(caption: str) -> dict:
    return {"caption": caption, "caption_norm": normalize(caption)}


def _load(text: str) -> object:
    try:
        return json.loads(_json_object(text))
    except json.JSONDecodeError as e:
        raise AnswerError(f"the answer is not valid JSON: {e.msg} at position {e.pos}") from None
    except RecursionError:   # valid JSON, perhaps, but nested past Python's stack
        raise AnswerError("the answer is nested too deeply to be an answer") from None
    except ValueError as e:  # an integer past Python's 4,300-digit conversion limit
        raise AnswerError(f"the answer is not readable JSON: {str(e)[:200]}") from None


def parse_answer(text: str, caption: str, refusal: str | None = None) -> CaptionQueries:
    if not text.strip():
        raise AnswerError(f"the model refused: {refusal}" if refusal else "the answer is empty")
    data = _load(text)
    try:
        return CaptionQueries.model_validate(data, context=_context(caption))
    except ValidationError as e:
        raise AnswerError("the answer does not match the schema:\n" + _explain(e)) from None


_ITEM_LISTS = ("entities", "events", "conjunctions", "simple_conditions", "complex_conditions")


def _query_path(loc: tuple) -> tuple | None:
    """Where the one query an error is about sits in the answer, or None when the error is
    about more than one query (the answer's shape). A bad entity text takes the whole entity,
    hypernyms included: they generalise a thing that is not there."""
    if len(loc) == 2 and loc[0] == "summaries" and isinstance(loc[1], int):
        return loc
    if len(loc) == 3 and loc[0] in _ITEM_LISTS and isinstance(loc[1], int) and loc[2] == "text":
        return loc[:2]
    if (len(loc) == 4 and loc[0] == "entities" and isinstance(loc[1], int) and loc[2] == "hypernyms"
            and isinstance(loc[3], int)):
        return loc
    return None


def salvage(text: str | None, caption: str) -> tuple[dict, list[tuple[Any, str]]] | None:
    """The answer without its invalid queries, and each dropped item (a query, or an entity
    with its hypernyms) as the model wrote it, with the reason.

    Only errors in single queries (too long, empty, the whole caption again) are dropped;
    an answer wrong in shape, or left without an entity, stays rejected (None). The kept
    answer may have no summary: for a caption short enough to be its own summary, none is
    better than a copy of it.
    """
    try:
        data = _load(text or "")
    except AnswerError:
        return None
    if not isinstance(data, dict):
        return None
    try:
        return Salvaged.model_validate(data, context=_context(caption)).model_dump(), []
    except ValidationError as e:
        errors = e.errors()
    paths = {}
    for err in errors:
        path = _query_path(tuple(err["loc"]))
        if path is None:
            return None
        paths.setdefault(path, err["msg"].removeprefix("Value error, "))
    dropped = []
    # Last first, so the indexes of what is still to go stay valid; a hypernym of an entity
    # that goes anyway needs no path of its own.
    fields = list(CaptionQueries.model_fields)
    for path in sorted(paths, key=lambda p: (fields.index(p[0]), p[1:]), reverse=True):
        if len(path) == 4 and path[:2] in paths:
            continue
        parent = data
        for step in path[:-1]:
            parent = parent[step]
        dropped.append((parent.pop(path[-1]), paths[path]))
    try:
        kept = Salvaged.model_validate(data, context=_context(caption)).model_dump()
    except ValidationError:
        return None
    return kept, dropped[::-1]
