"""One input caption. Extra fields on the input line ride along untouched."""
from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from schemas.text import CONTROL as _TEXT_CONTROL  # the rule queries follow too; tab, LF, CR allowed

# Longer than any real caption by far (CapRetrieval's longest is 105 characters);
# anything past this is a concatenation accident or an attack on the prompt budget.
MAX_CAPTION_CHARS = 4000
MAX_ID_CHARS = 256


# Regexes, not a Python loop over characters: every caption is checked twice a run
# (generation and export), and the loops were a quarter of export's CPU.
_SURROGATE = re.compile("[\ud800-\udfff]")
_ID_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _has_surrogate(v: str) -> bool:
    return _SURROGATE.search(v) is not None


class Caption(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Strict: an integer id would silently become "12" and collide with a real "12".
    id: StrictStr = Field(min_length=1, max_length=MAX_ID_CHARS)
    text: StrictStr
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id_is_printable(cls, v: str) -> str:
        if v != v.strip():
            raise ValueError("id has leading or trailing whitespace")
        if _ID_CONTROL.search(v):
            raise ValueError("id contains control characters")
        if _has_surrogate(v):
            raise ValueError("id contains an unpaired surrogate (not encodable as UTF-8)")
        return v

    @field_validator("text")
    @classmethod
    def _text_is_usable(cls, v: str, info) -> str:
        limit = (info.context or {}).get("max_chars", MAX_CAPTION_CHARS)
        if not v.strip():
            raise ValueError("text is empty or whitespace")
        if len(v) > limit:
            raise ValueError(f"text is {len(v)} characters, over the limit of {limit}")
        bad = _TEXT_CONTROL.search(v)
        if bad:
            raise ValueError(f"text contains control character U+{ord(bad.group()):04X}")
        if _has_surrogate(v):
            # json.loads accepts "\ud800"; the parquet writer would not, much later.
            raise ValueError("text contains an unpaired surrogate (not encodable as UTF-8)")
        return v
