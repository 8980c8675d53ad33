"""A labelled retrieval set in CapRetrieval's format.

corpus: JSON lines with `id` and `text` (the captions). labels: JSON lines with `id`,
`query`, `type` and `positives` (a list of {id, score}); score 2 is "certainly or almost
certainly shown", 1 "likely, or highly related by search intent", absent is 0.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class LabelError(ValueError):
    pass


@dataclass(frozen=True)
class LabelledQuery:
    id: str
    query: str
    type: str
    positives: dict[str, int]  # caption id -> grade (1 or 2)


def _jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise LabelError(f"{path}:{n}: not JSON ({e.msg})") from None


def load_corpus(path: Path) -> dict[str, str]:
    corpus: dict[str, str] = {}
    for n, row in _jsonl(path):
        if not isinstance(row.get("id"), str) or not isinstance(row.get("text"), str):
            raise LabelError(f"{path}:{n}: field id and text must be strings")
        corpus[row["id"]] = row["text"]
    return corpus


def load_labels(path: Path, corpus: dict[str, str]) -> list[LabelledQuery]:
    out = []
    for n, row in _jsonl(path):
        try:
            pos = {p["id"]: int(p["score"]) for p in row["positives"]}
            q = LabelledQuery(id=str(row["id"]), query=row["query"], type=row.get("type", "all"), positives=pos)
        except (KeyError, TypeError, ValueError) as e:
            raise LabelError(f"{path}:{n}: field {e} missing or malformed (need id, query, positives[id, score])") from None
        unknown = [c for c in pos if c not in corpus]
        if unknown:
            raise LabelError(f"{path}:{n}: field positives: caption {unknown[0]!r} is not in the corpus")
        out.append(q)
    return out
