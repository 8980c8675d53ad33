"""Text normalisation shared by validation and curation: one definition of "the same query"."""
from __future__ import annotations

import functools
import re
import unicodedata

# Punctuation and symbols carry no meaning for matching a query to a caption.
_DROP_CATEGORIES = {"Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Zs", "Zl", "Zp", "Cc", "Cf"}


class _Table(dict):
    """str.translate's table, learnt one character at a time: after the first sight of a
    character the lookup runs in C, where a Python test per character was most of the cost
    of validating an answer."""

    def __missing__(self, code: int):
        keep = unicodedata.category(chr(code)) not in _DROP_CATEGORIES
        self[code] = code if keep else None
        return self[code]


_TABLE = _Table()


def normalize(text: str) -> str:
    """NFKC (full/half width), case-fold, drop punctuation and spaces."""
    return unicodedata.normalize("NFKC", text).casefold().translate(_TABLE)


# What no text may carry into a training shard. One rule for queries and captions, applied
# by validation (a model's answer), caption input and curation (the guard every shard
# passes, whatever wrote queries.parquet):
# - Control characters (C0 and C1, category Cc) other than tab, LF and CR reject the text.
#   No person types a NUL or a BEL and no model writes one on purpose: one means damaged
#   bytes (a C1 control is mojibake of cp1252) or a hostile server, so the text around it
#   is not to be trusted either, and cutting it out would join what it separated.
# - Invisible format characters (category Cf: zero-width space, word joiner, BOM, soft
#   hyphen, bidirectional marks, embeddings, overrides and isolates, tag characters) are
#   removed. They change what a reader sees (an override shows a query reversed; tags hide
#   ASCII) but never what a search means: the text without them is what a person would
#   type. Removed, not rejected: a stray ZWSP from a copy-paste is common and harmless.
# - Kept where they are part of a visible character: a zero-width joiner between two
#   pictographs (👨‍👩‍👧 is one emoji; without it three), a zero-width non-joiner between
#   letters of a script that shapes with it (Persian, Indic), and the tags of a flag emoji.
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_PICTO = "\u00a9\u00ae\u203c\u2049\u2122\u2139\u2194-\u21ff\u2300-\u27bf\u2b00-\u2bff\u3030\u303d\u3297\u3299\U0001f000-\U0001faff"
_JOINING = "\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\u0900-\u0dff\ufb50-\ufdff\ufe70-\ufefe"


@functools.cache
def _format_chars() -> tuple[re.Pattern, re.Pattern]:
    """(any format character, the ones to remove); built on first use from this Python's
    Unicode tables (0.2 s), not on import."""
    cf = "".join(re.escape(chr(c)) for c in range(0x110000) if unicodedata.category(chr(c)) == "Cf")
    keep = (f"(?<=[{_PICTO}\ufe0f])\u200d(?=[{_PICTO}])"
            f"|(?<=[{_JOINING}])\u200c(?=[{_JOINING}])"
            "|\U0001f3f4[\U000e0020-\U000e007e]+\U000e007f")
    return re.compile(f"[{cf}]"), re.compile(f"({keep})|[{cf}]")


def hidden(text: str) -> str | None:
    """Why `text` cannot be a name (a caption id), or None: the first control or format
    character in it, kept or not by `clean`. A name is matched byte for byte and shown to
    people; one that reads otherwise than it matches (an override, a zero-width space) is
    refused, not cleaned, so that two ids never become one."""
    bad = CONTROL.search(text) or (None if text.isascii() else _format_chars()[0].search(text))
    if bad is None:
        return None
    kind = "control" if CONTROL.match(bad.group()) else "invisible format"
    return f"{kind} character U+{ord(bad.group()):04X} at {bad.start()}"


def clean(text: str) -> tuple[str, str | None]:
    """(text without invisible format characters, None), or (text, why it is refused) when
    it holds a control character."""
    bad = CONTROL.search(text)
    if bad:
        return text, f"control character U+{ord(bad.group()):04X} at {bad.start()}"
    if text.isascii():
        return text, None
    # The plain search first: nearly every text has no format character at all.
    found, removed = _format_chars()
    if found.search(text) is None:
        return text, None
    return removed.sub(lambda m: m.group(1) or "", text), None
