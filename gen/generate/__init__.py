"""Generation, the second stage: captions -> engine -> validated answers in the store.

This module is the local executor; beside it: prompts.py (templates -> messages), validate.py
(an answer -> queries, or the error a repair round shows the model), batch.py (the same work
through a provider's batch API), ray_executor.py (the same work in Ray actors), progress.py.

One coroutine per caption, at most `concurrency` alive at once (so memory does not grow
with the input). Each caption costs one request; an invalid answer gets up to
`repair_rounds` repair rounds (default 1) that show the model its validation error; an
answer still invalid after the last is stored as rejected with the reason. Every outcome
is written to the store as soon as it is known, which is what makes a killed run resumable.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Container, Iterable, Iterator, Optional, Union

from gen.config import answer_key
from gen.engines import Completion, Engine, EngineError
from gen.generate.prompts import PromptSet
from gen.store import AnswerStore
from gen.generate.validate import AnswerError, parse_answer
from schemas import Caption, Reject, answer_json_schema, is_short

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


# Invalid answers from suspect servers that one caption may ask past (ask_until_valid).
SERVER_FAULTS = 2
# The engine's own constraint is the full schema; a short caption's asks for no summary.
SHORT_CAPTION_SCHEMA = answer_json_schema(short=True)


def rejection(rounds: int, error: str) -> str:
    if rounds == 0:
        return f"invalid answer (no repair round): {error}"
    return f"invalid answer after {'a repair round' if rounds == 1 else f'{rounds} repair rounds'}: {error}"


async def ask_until_valid(engine: Engine, first: list[dict], schema: Optional[dict],
                          parse: Callable[[Completion], object],
                          repair: Callable[[list[dict], str, str], list[dict]], rounds: int,
                          completions: list[Completion]) -> tuple[object, Optional[str]]:
    """Ask, then up to `rounds` repair rounds while `parse` raises AnswerError: (parsed, None),
    or (None, the last error). Each round is `repair(first, answer, error)`: the first
    exchange and the latest answer only, so the context stays one answer long however many
    rounds are allowed. Every completion goes into `completions`, also when the engine fails
    midway, so the caller counts what was paid for. Generation and the judge both ask this way.
    An invalid answer from a server whose answers fail far more often than its peers'
    (Engine.checked) says more of the server than of the caption: the same request goes
    again, without a round, up to SERVER_FAULTS times; after that EngineError (no answer,
    nothing stored: a rerun asks again), never a rejection stored as final.
    """
    messages, error, server_faults = first, None, 0
    rounds_left = rounds
    while True:
        done = await engine.complete(messages, schema)
        completions.append(done)
        try:
            parsed = parse(done)
        except AnswerError as e:
            error = str(e)
            if engine.checked(done, valid=False):
                if server_faults == SERVER_FAULTS:
                    raise EngineError(f"{error.splitlines()[0]} (from {done.server}, whose answers fail "
                                      "validation far more often than its peers')") from None
                server_faults += 1
                continue
            if rounds_left == 0:
                return None, error
            rounds_left -= 1
            messages = repair(first, done.text, error)
            continue
        engine.checked(done, valid=True)
        return parsed, None


async def answer_caption(caption: Caption, key: str, engine: Engine, prompts: PromptSet,
                         repair_rounds: int = 1) -> Outcome:
    """One request, and up to `repair_rounds` more while the answer does not validate."""
    schema = SHORT_CAPTION_SCHEMA if is_short(caption.text) else None
    completions: list[Completion] = []
    answer = None
    try:
        answer, error = await ask_until_valid(
            engine, prompts.messages(caption), schema,
            lambda done: parse_answer(done.text, caption.text, done.refusal),
            prompts.repair, repair_rounds, completions)
    except EngineError as e:
        status, reason = "failed", str(e)
    else:
        status = "ok" if error is None else "rejected"
        reason = None if error is None else rejection(repair_rounds, error)
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


def classify(records: Iterable[Union[Caption, Reject]], store: AnswerStore, fingerprint: str,
             force: bool, stats: GenStats, on_progress: Callable[[GenStats], None],
             in_flight: Container[str], repair_rounds: int = 1
             ) -> Iterator[tuple[Union[Caption, Reject], Optional[str], bool]]:
    """Every record in input order, as (record, key, needs_request); counts as it goes.

    Identical texts under different ids cost one request: a key is not requested again
    while it is in `in_flight` (the caller's, holding only keys not yet recorded) or once
    the store has it, so no set grows with the input. With `force` only what this run
    stored counts; an answer rejected after fewer than `repair_rounds` repair rounds does
    not count (see AnswerStore.has). Input rejects come through with key None.
    """
    since = time.time() if force else 0.0
    for rec in records:
        if isinstance(rec, Reject):
            stats.input_rejects += 1
            log.warning("%s:%s: %s", rec.file, rec.line, rec.reason)
            on_progress(stats)
            yield rec, None, False
            continue
        stats.captions += 1
        key = answer_key(fingerprint, rec.text)
        if key in in_flight or store.has(key, since, repair_rounds):
            stats.cached += 1
            on_progress(stats)
            yield rec, key, False
            continue
        stats.requested += 1
        yield rec, key, True


def pending(records: Iterable[Union[Caption, Reject]], store: AnswerStore, fingerprint: str,
            force: bool, stats: GenStats, on_progress: Callable[[GenStats], None],
            in_flight: set[str], repair_rounds: int = 1) -> Iterator[tuple[Caption, str]]:
    """Only the captions that need a request; adds each key to `in_flight` (the caller
    discards it once the outcome is recorded)."""
    for rec, key, needed in classify(records, store, fingerprint, force, stats, on_progress, in_flight,
                                     repair_rounds):
        if needed:
            in_flight.add(key)
            yield rec, key


class InOrder:
    """Hands each record's outcome to an Exporter in input order, while generation goes on.

    Answers come back roughly in the order asked, so the window of records waiting for an
    earlier one stays near `concurrency` long. A caption stuck in retries holds the rest
    back; past `limit` records the generator waits for it, which bounds memory.
    """

    def __init__(self, sink, store: AnswerStore, limit: int):
        self.sink, self.store, self.limit = sink, store, limit
        self.window: deque[tuple[Union[Caption, Reject], Optional[str], Optional[asyncio.Future]]] = deque()

    def add(self, rec: Union[Caption, Reject], key: Optional[str], outcome: Optional[asyncio.Future]) -> None:
        self.window.append((rec, key, outcome))
        self.drain()

    def drain(self) -> None:
        while self.window:
            outcome = self.window[0][2]
            # Cancelled: the run is stopping on a failure, and nothing from here on is exported.
            if outcome is not None and (not outcome.done() or outcome.cancelled()):
                return
            rec, key, outcome = self.window.popleft()
            if key is None:
                self.sink.reject(rec)
            elif outcome is None:
                if not self.sink.stored(rec, key, self.store.get(key), "not generated in this run"):
                    self.store.discard(key)
            else:
                o: Outcome = outcome.result()
                self.sink.caption(rec, key, None if o.status == "failed" else o.status,
                                  o.answer, o.raw, o.reason)

    async def room(self) -> None:
        while len(self.window) >= self.limit and not self.window[0][2].cancelled():
            await asyncio.wait({self.window[0][2]})
            self.drain()


async def generate(records: Iterable[Union[Caption, Reject]], *, engine: Engine, prompts: PromptSet,
                   store: AnswerStore, fingerprint: str, concurrency: int, force: bool = False,
                   repair_rounds: int = 1, on_progress: Callable[[GenStats], None] = lambda s: None,
                   sink=None) -> GenStats:
    """The local executor: one coroutine per caption, `concurrency` at a time.

    With a `sink` (a gen.export.Exporter) every record's outcome is exported, in input
    order, as soon as it and all before it are known.
    """
    stats = GenStats()
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task] = set()
    # key -> its outcome, while in flight: a duplicate text waits on the first one's answer.
    in_flight: dict[str, asyncio.Future] = {}
    order = InOrder(sink, store, limit=max(64 * concurrency, 4096)) if sink is not None else None
    loop = asyncio.get_running_loop()

    # An exception in a task is a bug, a store or file that cannot be written, or an engine
    # that can answer nothing (EngineUnusable; one request's EngineError is an outcome). The
    # first one stops the run: no new request, the ones in flight cancelled, and it is
    # raised from here, where the CLI reports it.
    failures: list[Exception] = []

    async def run(caption: Caption, key: str, outcome: asyncio.Future) -> None:
        try:
            done = await answer_caption(caption, key, engine, prompts, repair_rounds)
            record(done, store, stats)
            outcome.set_result(done)
            if order is not None:
                order.drain()
        except Exception as e:
            failures.append(e)
        finally:
            if not outcome.done():
                outcome.cancel()
            in_flight.pop(key, None)
            slots.release()
            on_progress(stats)

    for rec, key, needed in classify(records, store, fingerprint, force, stats, on_progress, in_flight,
                                     repair_rounds):
        if needed:
            await slots.acquire()
            if failures:
                slots.release()
                break
            outcome = in_flight[key] = loop.create_future()
            task = asyncio.create_task(run(rec, key, outcome))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        else:
            outcome = in_flight.get(key) if key is not None else None
        if order is not None:
            order.add(rec, key, outcome)
            await order.room()
        if failures:
            break
    if tasks and not failures:
        await asyncio.gather(*tasks)
    if failures:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise failures[0]
    if order is not None:
        order.drain()
    return stats
