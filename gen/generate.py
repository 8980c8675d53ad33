"""Captions -> engine -> validated answers in the store (the local executor).

One coroutine per caption, at most `concurrency` alive at once (so memory does not grow
with the input). Each caption costs one request; an invalid answer gets one repair round
that shows the model its validation error; a second failure is stored as rejected with
the reason. Every outcome is written to the store as soon as it is known, which is what
makes a killed run resumable.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Union

from gen.config import answer_key
from gen.engines import Completion, Engine, EngineError
from gen.prompts import PromptSet
from gen.store import AnswerStore
from gen.validate import AnswerError, parse_answer
from schemas import Caption, Reject

log = logging.getLogger(__name__)


@dataclass
class GenStats:
    captions: int = 0
    input_rejects: int = 0
    cached: int = 0
    requested: int = 0
    accepted: int = 0
    repaired: int = 0
    rejected: int = 0
    failed: int = 0           # no answer (engine gave up): not stored, a rerun retries
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # key -> engine error


@dataclass(frozen=True)
class Outcome:
    """What became of one caption; plain data, so it can cross a process (Ray) boundary."""
    key: str
    caption_id: str
    status: str               # ok | rejected | failed
    answer: Optional[str]     # validated CaptionQueries JSON when ok
    raw: Optional[str]        # the model's last text
    reason: Optional[str]
    requests: int
    prompt_tokens: int
    completion_tokens: int


async def answer_caption(caption: Caption, key: str, engine: Engine, prompts: PromptSet) -> Outcome:
    """One request, and one repair round if the answer does not validate."""
    messages = prompts.messages(caption)
    completions: list[Completion] = []
    error: Optional[str] = None
    answer = None
    try:
        for _ in range(2):
            done = await engine.complete(messages)
            completions.append(done)
            try:
                answer = parse_answer(done.text, caption.text, done.refusal)
                error = None
                break
            except AnswerError as e:
                error = str(e)
                messages = prompts.repair(messages, done.text, error)
    except EngineError as e:
        status, reason = "failed", str(e)
    else:
        status = "ok" if error is None else "rejected"
        reason = None if error is None else f"invalid answer after a repair round: {error}"
    return Outcome(
        key=key, caption_id=caption.id, status=status,
        answer=answer.model_dump_json() if status == "ok" else None,
        raw=completions[-1].text if completions else None, reason=reason,
        requests=len(completions),
        prompt_tokens=sum(c.prompt_tokens for c in completions),
        completion_tokens=sum(c.completion_tokens for c in completions))


def record(outcome: Outcome, store: AnswerStore, stats: GenStats) -> None:
    """Persist at once (this is what makes a kill harmless) and count."""
    stats.requests += outcome.requests
    stats.prompt_tokens += outcome.prompt_tokens
    stats.completion_tokens += outcome.completion_tokens
    if outcome.status == "failed":
        stats.failed += 1
        stats.failures[outcome.key] = outcome.reason or "unknown"
        log.warning("caption %s: no answer (%s); a rerun will ask again", outcome.caption_id, outcome.reason)
        return
    store.put(outcome.key, outcome.status, answer=outcome.answer, raw=outcome.raw, reason=outcome.reason,
              requests=outcome.requests, prompt_tokens=outcome.prompt_tokens,
              completion_tokens=outcome.completion_tokens)
    if outcome.status == "ok":
        stats.accepted += 1
        stats.repaired += outcome.requests > 1
    else:
        stats.rejected += 1


def pending(records: Iterable[Union[Caption, Reject]], store: AnswerStore, fingerprint: str,
            force: bool, stats: GenStats, on_progress: Callable[[GenStats], None],
            in_flight: set[str]) -> Iterator[tuple[Caption, str]]:
    """The captions that need a request, with their keys; counts the rest as it goes.

    Identical texts under different ids cost one request: a key is skipped while it is in
    `in_flight` (added here, discarded by the caller once its outcome is recorded) and once
    the store has it, so no set grows with the input. With `force` only what this run
    stored counts.
    """
    since = time.time() if force else 0.0
    for rec in records:
        if isinstance(rec, Reject):
            stats.input_rejects += 1
            log.warning("%s:%s: %s", rec.file, rec.line, rec.reason)
            on_progress(stats)
            continue
        stats.captions += 1
        key = answer_key(fingerprint, rec.text)
        if key in in_flight or store.has(key, since):
            stats.cached += 1
            on_progress(stats)
            continue
        in_flight.add(key)
        stats.requested += 1
        yield rec, key


async def generate(records: Iterable[Union[Caption, Reject]], *, engine: Engine, prompts: PromptSet,
                   store: AnswerStore, fingerprint: str, concurrency: int, force: bool = False,
                   on_progress: Callable[[GenStats], None] = lambda s: None) -> GenStats:
    """The local executor: one coroutine per caption, `concurrency` at a time."""
    stats = GenStats()
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task] = set()
    in_flight: set[str] = set()

    async def run(caption: Caption, key: str) -> None:
        try:
            record(await answer_caption(caption, key, engine, prompts), store, stats)
        finally:
            in_flight.discard(key)
            slots.release()
            on_progress(stats)

    for caption, key in pending(records, store, fingerprint, force, stats, on_progress, in_flight):
        await slots.acquire()
        task = asyncio.create_task(run(caption, key))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return stats
