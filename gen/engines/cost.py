"""Tokens and money: the prompt-token estimate pacing and --dry-run share, and the bill.

Prices are the user's (per million input and output tokens, `--price-in`/`--price-out` or
the job file's [pricing] table): capgen ships no price list and fetches none, so a run
without prices has a cost that is unknown, never a guessed one.
"""
from __future__ import annotations

from typing import Iterable, Optional

# Measured with Qwen2.5's tokenizer on the bundled template (Chinese-heavy text).
CHARS_PER_TOKEN = 2.2


def prompt_chars(messages: Iterable[dict]) -> int:
    return sum(len(m["content"]) if isinstance(m.get("content"), str) else 0 for m in messages)


def prompt_tokens(messages: Iterable[dict]) -> int:
    """The prompt's tokens, estimated from its characters (no tokenizer needed)."""
    return round(prompt_chars(messages) / CHARS_PER_TOKEN)


def bill(prompt_tokens: float, completion_tokens: float, price_in: Optional[float],
         price_out: Optional[float], *, batch: bool = False, batch_discount: float = 0.5) -> Optional[float]:
    """Money for these tokens at prices per million tokens; None when a price is unknown.
    `batch`: a batch API's price, the online one times `batch_discount` (0.5: half)."""
    if price_in is None or price_out is None:
        return None
    money = (prompt_tokens * price_in + completion_tokens * price_out) / 1e6
    return money * batch_discount if batch else money


def spent(usage: dict, pricing, *, batch: bool = False) -> dict:
    """What a run's usage cost, for the manifest: the amount, or None and why not."""
    money = bill(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                 pricing.input, pricing.output, batch=batch, batch_discount=pricing.batch_discount)
    out = {"amount": None if money is None else round(money, 6), "batch": batch,
           "price_in_per_million": pricing.input, "price_out_per_million": pricing.output}
    if money is None:
        out["note"] = "cost unknown: no prices set (--price-in, --price-out or [pricing])"
    return out
