"""Text normalisation shared by validation and curation: one definition of "the same query"."""
from __future__ import annotations

import unicodedata

# Punctuation and symbols carry no meaning for matching a query to a caption.
_DROP_CATEGORIES = {"Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Zs", "Zl", "Zp", "Cc", "Cf"}


def normalize(text: str) -> str:
    """NFKC (full/half width), case-fold, drop punctuation and spaces."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(c for c in folded if unicodedata.category(c) not in _DROP_CATEGORIES)
