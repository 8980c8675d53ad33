"""One input caption. Extra fields on the input line ride along untouched."""
from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from schemas.text import CONTROL as _TEXT_CONTROL  # the rule queries follow too; tab, LF, CR allowed
from schemas.text import hidden

# Longer than any real caption by far (CapRetrieval's longest is 105 characters);
# anything past this is a concatenation accident or an attack on the prompt budget.
MAX_CAPTION_CHARS = 4000
MAX_ID_CHARS = 256


# Regexes, not a Python loop over characters: every caption is checked twice a run
# (generation and export), and the loops were a quarter of export's CPU.
_SURROGATE = re.compile("[\ud800-\udfff]")
# Beyond the shared rule: an id is one line, also for tools that split on Unicode line and
# paragraph separators (str.splitlines, JavaScript, many editors).
_ID_CONTROL = re.compile("[\t\n\r\u2028\u2029]")


def _has_surrogate(v: str) -> bool:
    return _SURROGATE.search(v) is not None


def _where(path: tuple) -> str:
    """('meta', 0, 'k') -> 'meta'[0]['k']: where in the input line's extra fields."""
    return repr(path[0]) + "".join(f"[{k!r}]" for k in path[1:])


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
        if bad := _ID_CONTROL.search(v):
            raise ValueError(f"id contains a tab or line break (U+{ord(bad.group()):04X}) at {bad.start()}: an id is one line")
        if why := hidden(v):   # a bidi override or a zero-width space would reach every shard
            raise ValueError(f"id contains {why}")
        if _has_surrogate(v):
            raise ValueError("id contains an unpaired surrogate (not encodable as UTF-8)")
        return v

    @field_validator("extra")
    @classmethod
    def _extra_is_encodable(cls, v: dict[str, Any]) -> dict[str, Any]:
        # Extra fields ride along into captions.parquet: a lone surrogate anywhere in them,
        # nested or in a key, would stop the export after every request was paid for. NaN and
        # infinity (Python's json and parquet hold them, pandas' "missing") have no JSON
        # spelling: null, so the extra column stays JSON every reader parses.
        stack: list[tuple[tuple, Any]] = [((), v)]
        while stack:   # a loop, not recursion: json.loads allows nesting near the stack limit
            path, node = stack.pop()
            for key, value in node.items() if isinstance(node, dict) else enumerate(node):
                at = (*path, key)
                if isinstance(key, str) and _has_surrogate(key):
                    raise ValueError(f"key {_where(at)} holds a lone surrogate (not encodable as UTF-8)")
                if isinstance(value, str):
                    if _has_surrogate(value):
                        raise ValueError(f"{_where(at)} holds a lone surrogate (not encodable as UTF-8)")
                elif isinstance(value, float) and not math.isfinite(value):
                    if isinstance(node, tuple):
                        raise ValueError(f"{_where(at)} is {value}, which JSON cannot hold")
                    node[key] = None
                elif isinstance(value, (dict, list, tuple)):
                    stack.append((at, value))
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
