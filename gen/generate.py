"""Captions -> engine -> validated answers in the store.

One coroutine per caption, at most `concurrency` alive at once (so memory does not grow
with the input). Each caption costs one request; an invalid answer gets one repair round
that shows the model its validation error; a second failure is stored as rejected with
the reason. Every outcome is written to the store as soon as it is known, which is what
makes a killed run resumable.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

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


async def _answer(caption: Caption, key: str, engine: Engine, prompts: PromptSet,
                  store: AnswerStore, stats: GenStats) -> None:
    messages = prompts.messages(caption)
    completions: list[Completion] = []
    error: Optional[str] = None
    try:
        for attempt in range(2):
            done = await engine.complete(messages)
            completions.append(done)
            stats.requests += 1
            stats.prompt_tokens += done.prompt_tokens
            stats.completion_tokens += done.completion_tokens
            try:
                answer = parse_answer(done.text, caption.text, done.refusal)
                error = None
                break
            except AnswerError as e:
                error = str(e)
                messages = prompts.repair(messages, done.text, error)
    except EngineError as e:
        stats.failed += 1
        stats.failures[key] = str(e)
        log.warning("caption %s: no answer (%s); a rerun will ask again", caption.id, e)
        return
    usage = dict(requests=len(completions),
                 prompt_tokens=sum(c.prompt_tokens for c in completions),
                 completion_tokens=sum(c.completion_tokens for c in completions))
    raw = completions[-1].text
    if error is None:
        store.put(key, "ok", answer=answer.model_dump_json(), raw=raw, reason=None, **usage)
        stats.accepted += 1
        stats.repaired += len(completions) > 1
    else:
        store.put(key, "rejected", answer=None, raw=raw,
                  reason=f"invalid answer after a repair round: {error}", **usage)
        stats.rejected += 1


async def generate(records: Iterable[Union[Caption, Reject]], *, engine: Engine, prompts: PromptSet,
                   store: AnswerStore, fingerprint: str, concurrency: int, force: bool = False,
                   on_progress: Callable[[GenStats], None] = lambda s: None) -> GenStats:
    stats = GenStats()
    slots = asyncio.Semaphore(concurrency)
    in_flight: set[str] = set()   # identical texts under different ids cost one request
    tasks: set[asyncio.Task] = set()

    async def run(caption: Caption, key: str) -> None:
        try:
            await _answer(caption, key, engine, prompts, store, stats)
        finally:
            slots.release()
            on_progress(stats)

    for record in records:
        if isinstance(record, Reject):
            stats.input_rejects += 1
            log.warning("%s:%s: %s", record.file, record.line, record.reason)
            continue
        stats.captions += 1
        key = answer_key(fingerprint, record.text)
        if key in in_flight or (not force and key in store):
            stats.cached += 1
            on_progress(stats)
            continue
        in_flight.add(key)
        stats.requested += 1
        await slots.acquire()
        task = asyncio.create_task(run(record, key))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return stats
