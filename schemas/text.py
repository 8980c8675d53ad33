"""Text normalisation shared by validation and curation: one definition of "the same query"."""
from __future__ import annotations

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
