"""What the LLM answers for one caption: every kind of query in one object.

The JSON schema of `CaptionQueries` is sent to the engine as the decoding constraint, so
anything a grammar can express (shape, enums, list sizes, string lengths) lives in the field
declarations; the validators check what a grammar cannot (a query equal to its caption,
whitespace-only text). They read the caption from the validation context. One size depends
on the caption: how many summaries (none for a short caption), set in `answer_json_schema`.
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, model_validator

from schemas.text import clean, normalize

# Order matters: it is the order of the keys in the answer and of `type` in the records.
QUERY_TYPES = (
    "entity",
    "hypernym",
    "event",
    "conjunction",
    "simple_condition",
    "complex_condition",
    "summary",
)

KEYWORD_MAX_CHARS = 32
SUMMARY_MAX_CHARS = 80
# A caption this short (normalised characters) is its own summary: a small model asked for
# one copies the caption, fails validation, and copies it again in the repair round. So
# such a caption is asked for no summary (the decoding constraint allows none).
SHORT_CAPTION_CHARS = 16


def is_short(caption: str) -> bool:
    return _is_short_norm(normalize(caption))


def _is_short_norm(caption_norm: str) -> bool:
    return len(caption_norm) <= SHORT_CAPTION_CHARS


def _caption_norm(info: ValidationInfo) -> str | None:
    """The normalised caption of the validation context; None when validated without one."""
    ctx = info.context or {}
    caption = ctx.get("caption")
    if caption is None:
        return None
    # caption_norm: normalised once per answer, not once for each of its ~20 queries (a
    # dict.get default would be computed on every call).
    return ctx["caption_norm"] if "caption_norm" in ctx else normalize(caption)


def _check_query(value: str, info: ValidationInfo) -> str:
    value, bad = clean(value)
    if bad:
        raise ValueError(f"query {value!r} contains a {bad}; write plain text")
    value = value.strip()
    if not value:
        raise ValueError("query is empty")
    caption_norm = _caption_norm(info)
    if caption_norm is None:
        return value
    if normalize(value) == caption_norm:
        raise ValueError(f"query {value!r} repeats the whole caption; ask for a part of it")
    return value


Keyword = Annotated[str, Field(min_length=1, max_length=KEYWORD_MAX_CHARS), AfterValidator(_check_query)]
Summary = Annotated[str, Field(min_length=1, max_length=SUMMARY_MAX_CHARS), AfterValidator(_check_query)]
def not_a_bool(value: Any) -> Any:
    # pydantic takes true for the literal 1 (True == 1), yet a model that answers true most
    # likely means "shown", the top grade: neither reading is safe for a training row.
    if isinstance(value, bool):
        raise ValueError("a grade is a number, not true or false")
    return value


# 2: certainly or almost certainly shown; 1: likely shown, or closely related by search intent.
Grade = Annotated[Literal[1, 2], BeforeValidator(not_a_bool)]


class Entity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: Keyword
    kind: Literal["object", "person", "place", "concept"]
    hypernyms: list[Keyword] = Field(default_factory=list, max_length=3)
    grade: Grade


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: Keyword
    grade: Grade


class CaptionQueries(BaseModel):
    """Each list is ordered by salience: the first item matters most in the caption."""

    model_config = ConfigDict(extra="forbid")
    entities: list[Entity] = Field(min_length=1, max_length=10)
    events: list[Item] = Field(default_factory=list, max_length=5)
    conjunctions: list[Item] = Field(default_factory=list, max_length=4)
    simple_conditions: list[Item] = Field(default_factory=list, max_length=5)
    complex_conditions: list[Item] = Field(default_factory=list, max_length=4)
    # At least one, except for a short caption (is_short); see _summary_required.
    summaries: list[Summary] = Field(default_factory=list, max_length=3)

    summaries_optional: ClassVar[bool] = False

    @model_validator(mode="after")
    def _summary_required(self, info: ValidationInfo) -> "CaptionQueries":
        if self.summaries or self.summaries_optional:
            return self
        caption_norm = _caption_norm(info)
        if caption_norm is None or not _is_short_norm(caption_norm):
            raise ValueError("summaries: give at least one summary of the whole caption")
        return self

    def queries(self) -> list[dict[str, Any]]:
        """Flatten into query rows: type, subtype, grade, salience (1 = most salient of its type)."""
        return flatten(self.model_dump())


class Salvaged(CaptionQueries):
    """What is left of an answer once its invalid queries are dropped (gen.generate.validate.salvage):
    never a decoding constraint, so it may lack a summary that only repeated the caption."""

    summaries_optional: ClassVar[bool] = True


def flatten(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """CaptionQueries.queries() on the answer's JSON dict. Export reads answers that were
    validated when stored, and building the models again was a quarter of its CPU."""
    rows: list[dict[str, Any]] = []
    entities = answer["entities"]
    for rank, ent in enumerate(entities, 1):
        rows.append(dict(query=ent["text"], type="entity", subtype=ent["kind"], grade=ent["grade"],
                         salience=rank, source=None))
    # A hypernym is shown exactly as surely as the thing it generalises.
    hyper_rank = 0
    for ent in entities:
        for h in ent.get("hypernyms", ()):
            hyper_rank += 1
            rows.append(dict(query=h, type="hypernym", subtype=ent["kind"], grade=ent["grade"],
                             salience=hyper_rank, source=ent["text"]))
    for qtype, field in (("event", "events"), ("conjunction", "conjunctions"),
                         ("simple_condition", "simple_conditions"),
                         ("complex_condition", "complex_conditions")):
        for rank, item in enumerate(answer.get(field, ()), 1):
            rows.append(dict(query=item["text"], type=qtype, subtype=None, grade=item["grade"],
                             salience=rank, source=None))
    for rank, text in enumerate(answer["summaries"], 1):
        rows.append(dict(query=text, type="summary", subtype=None, grade=2, salience=rank, source=None))
    return rows


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    # Some grammar backends handle $ref poorly; an inlined schema is understood by all of them.
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline_refs(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k not in ("$defs", "title")}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def answer_json_schema(short: bool = False) -> dict[str, Any]:
    """The decoding constraint: CaptionQueries' JSON schema with every $ref inlined; for a
    short caption (is_short) with no room for a summary, else with at least one."""
    schema = CaptionQueries.model_json_schema()
    out = _inline_refs(schema, schema.get("$defs", {}))
    # Every key present: the model then never has to choose whether to emit a list.
    out["required"] = list(out["properties"])
    summaries = out["properties"]["summaries"]
    summaries.pop("default", None)
    if short:
        summaries["maxItems"] = 0
    else:
        summaries["minItems"] = 1
    return out


def decoding_constraints() -> dict[str, Any]:
    """Every constraint a caption can be decoded under, and the rule that picks one: what
    the generation fingerprint records of the schema."""
    return {"caption": answer_json_schema(), "short_caption": answer_json_schema(short=True),
            "short_caption_chars": SHORT_CAPTION_CHARS}
