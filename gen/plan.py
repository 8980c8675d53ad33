"""`--dry-run`: what a run would generate and roughly what it would cost, without an LLM.

Reads the captions and the answer store (read-only), so the plan is exact about which
captions would be requested. Token figures come from the store's own history when it has
answers (what this model and template really cost per request); otherwise from characters,
at 2.2 characters per token, measured with Qwen2.5's tokenizer on the bundled template.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Iterable, Union

from gen.config import RunConfig, answer_key
from gen.prompts import PromptSet
from gen.store import KEPT
from schemas import Caption, Reject

CHARS_PER_TOKEN = 2.2


class _Stored:
    """The answer store, read-only. Which keys it already answers is asked a chunk at a time:
    a store shared by many runs can hold far more keys than this input has, and loading
    them all cost memory. Under --force nothing counts as answered, but the store's token
    history still prices the plan."""

    def __init__(self, cache: Path, force: bool):
        self.db = sqlite3.connect(f"file:{cache}?mode=ro", uri=True) if cache.is_file() else None
        self.force = force

    def which(self, keys: list[str], repair_rounds: int) -> set[str]:
        if self.db is None or self.force or not keys:
            return set()
        marks = ",".join("?" * len(keys))
        return {k for (k,) in self._query(f"SELECT key FROM answers WHERE key IN ({marks}) AND {KEPT}",
                                          [*keys, repair_rounds])}

    def history(self) -> tuple[float, float] | None:
        """Mean prompt and completion tokens per request."""
        rows = self._query("SELECT SUM(prompt_tokens), SUM(completion_tokens), SUM(requests) "
                           "FROM answers WHERE requests > 0") if self.db else []
        if not rows or not rows[0][2]:
            return None
        prompt, completion, requests = rows[0]
        return prompt / requests, completion / requests

    def _query(self, sql: str, args=()) -> list[tuple]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError:  # not a store, or no answers table yet: nothing is known
            return []

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


def _chunks(items: Iterable, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def plan(records: Iterable[Union[Caption, Reject]], config: RunConfig, prompts: PromptSet,
         fingerprint: str) -> dict[str, Any]:
    stored = _Stored(config.cache_path, config.force)
    captions = rejects = cached = 0
    to_request: set[str] = set()
    prompt_chars = 0
    try:
        for chunk in _chunks(records, 512):
            keyed = [(answer_key(fingerprint, r.text), r) for r in chunk if not isinstance(r, Reject)]
            rejects += len(chunk) - len(keyed)
            captions += len(keyed)
            known = stored.which(list({k for k, _ in keyed}), config.repair_rounds)
            for key, record in keyed:
                if key in known or key in to_request:
                    cached += 1
                    continue
                to_request.add(key)
                prompt_chars += sum(len(m["content"]) for m in prompts.messages(record))
        history = stored.history()
    finally:
        stored.close()
    n = len(to_request)
    most = (1 + config.repair_rounds) * n   # each repair round is one more request
    if history:
        prompt_tokens, completion_tokens = history[0] * n, history[1] * n
        method = "mean tokens per request in the answer store"
    else:
        prompt_tokens, completion_tokens = prompt_chars / CHARS_PER_TOKEN, None
        method = f"prompt characters / {CHARS_PER_TOKEN}; completion unknown until answers exist"
    return {
        "captions": captions, "input_rejects": rejects, "cached": cached, "to_request": n,
        "requests_at_least": n, "requests_at_most": most,
        "prompt_chars": prompt_chars,
        "prompt_tokens_estimate": round(prompt_tokens),
        "completion_tokens_estimate": round(completion_tokens) if completion_tokens is not None else None,
        "completion_tokens_at_most": most * config.sampling.max_tokens,
        "estimate_method": method,
        "fingerprint": fingerprint,
    }
