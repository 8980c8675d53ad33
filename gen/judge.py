"""Judge stage: the LLM grades every generated (query, caption) pair 0/1/2.

    python -m gen.judge --captions raw.jsonl [--out DIR] [any gen.run engine option]

Runs after `gen.run` on its output directory: reads queries.parquet and captions.parquet,
asks once per caption for a grade of each of its distinct queries, and writes
judgements.parquet (caption_id, query, judge_grade; null where no judgement came).
Curation uses it with `judge = "drop"` (pairs graded 0 go, with reason judged_irrelevant)
or `"regrade"` (also the judge's grade replaces the generator's). Same engines, options,
retries and resume as generation: answers live in DIR/judge.sqlite, keyed by the judge's
fingerprint, the caption and its queries, so a rerun pays only for what is new; an answer
that is still malformed after one repair round is stored as rejected with the reason.
Greedy decoding: a grade should not depend on a dice roll.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import polars as pl
from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment
from pydantic import ValidationError

from gen.atomic import atomic_path
from gen.config import RunConfig, Sampling, model_identity
from gen.engines import EngineError, build_engine
from gen.store import AnswerStore
from prompts import TEMPLATE_DIR
from schemas.judge import Judgement, judge_json_schema

log = logging.getLogger("gen.judge")
SYSTEM, USER = "judge.system.j2", "judge.user.j2"
JUDGEMENTS = "judgements.parquet"


class JudgePrompts:
    def __init__(self, directory: Optional[Path] = None):
        d = Path(directory) if directory and (Path(directory) / SYSTEM).is_file() else TEMPLATE_DIR
        env = SandboxedEnvironment(loader=FileSystemLoader(str(d)), undefined=StrictUndefined, autoescape=False)
        self.system = env.get_template(SYSTEM).render().strip()
        self.user = env.get_template(USER)
        self.digest = hashlib.sha256(b"".join((d / n).read_bytes() for n in (SYSTEM, USER))).hexdigest()

    def messages(self, caption: str, queries: list[str]) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system},
                {"role": "user", "content": self.user.render(caption=caption, queries=queries).strip()}]


def judge_sampling(config: RunConfig) -> Sampling:
    return Sampling(temperature=0.0, top_p=1.0, max_tokens=256, seed=config.sampling.seed)


def parse(text: str, n: int) -> list[int]:
    start, end = text.find("{"), text.rfind("}")
    try:
        grades = Judgement.model_validate_json(text[start:end + 1] if start >= 0 else text).grades
    except ValidationError as e:
        raise ValueError(f"not a JSON object {{\"grades\": [0|1|2, ...]}}: {e.errors()[0]['msg']}") from None
    if len(grades) != n:
        raise ValueError(f"{len(grades)} grades for {n} queries; give exactly one per query, in order")
    return grades


async def _judge_one(engine, prompts: JudgePrompts, caption: str, queries: list[str]) -> dict:
    messages = prompts.messages(caption, queries)
    used = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    error, text = None, ""
    for _ in range(2):
        done = await engine.complete(messages)
        used["requests"] += 1
        used["prompt_tokens"] += done.prompt_tokens
        used["completion_tokens"] += done.completion_tokens
        text = done.text
        try:
            return {"status": "ok", "answer": json.dumps(parse(text, len(queries))), "raw": text,
                    "reason": None, **used}
        except ValueError as e:
            error = str(e)
            messages = [*messages, {"role": "assistant", "content": text},
                        {"role": "user", "content": f"你的输出不符合要求：{error}。请只输出一个完整的 JSON 对象。"}]
    return {"status": "rejected", "answer": None, "raw": text, "reason": f"judge answer invalid after a repair round: {error}", **used}


async def judge(config: RunConfig) -> dict:
    from gen.engines.lazy import LazyEngine  # the same engine wiring as generation
    from gen.run import resolve_model, stop_on_sigterm

    out = config.out_dir
    queries = pl.read_parquet(out / "queries.parquet", columns=["caption_id", "query"])
    texts = dict(pl.read_parquet(out / "captions.parquet", columns=["id", "text"]).iter_rows())
    per_caption = queries.unique(maintain_order=True).group_by("caption_id", maintain_order=True).agg("query")
    prompts = JudgePrompts(config.prompts)
    sampling = judge_sampling(config)
    fp = hashlib.sha256(json.dumps({"model": model_identity(config.model), "templates": prompts.digest,
                                    "schema": judge_json_schema(), "sampling": sampling.model_dump()},
                                   sort_keys=True).encode()).hexdigest()
    jconfig = config.model_copy(update={"sampling": sampling})
    model = resolve_model(config)
    engine = LazyEngine(lambda: build_engine(jconfig, model, judge_json_schema()))
    store = AnswerStore(out / "judge.sqlite")
    stats = {"captions": per_caption.height, "cached": 0, "judged": 0, "rejected": 0, "failed": 0,
             "requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    keys: dict[str, str] = {}
    slots = asyncio.Semaphore(config.concurrency)

    async def one(cid: str, qs: list[str], key: str) -> None:
        try:
            got = await _judge_one(engine, prompts, texts[cid], qs)
        except EngineError as e:
            stats["failed"] += 1
            log.warning("caption %s: no judgement (%s); a rerun will ask again", cid, e)
            return
        finally:
            slots.release()
        for k in ("requests", "prompt_tokens", "completion_tokens"):
            stats[k] += got[k]
        stats["judged" if got["status"] == "ok" else "rejected"] += 1
        store.put(key, got["status"], answer=got["answer"], raw=got["raw"], reason=got["reason"],
                  requests=got["requests"], prompt_tokens=got["prompt_tokens"], completion_tokens=got["completion_tokens"])

    tasks = []
    undo_sigterm = stop_on_sigterm()
    try:
        for cid, qs in per_caption.iter_rows():
            key = hashlib.sha256("\0".join([fp, texts[cid], *qs]).encode()).hexdigest()
            keys[cid] = key
            if not config.force and store.get(key) is not None:
                stats["cached"] += 1
                continue
            await slots.acquire()
            tasks.append(asyncio.create_task(one(cid, qs, key)))
        await asyncio.gather(*tasks)
    finally:
        undo_sigterm()
        await engine.aclose()
    rows = {"caption_id": [], "query": [], "judge_grade": []}
    for cid, qs in per_caption.iter_rows():
        got = store.get(keys[cid])
        grades = json.loads(got.answer) if got and got.status == "ok" else [None] * len(qs)
        rows["caption_id"] += [cid] * len(qs)
        rows["query"] += qs
        rows["judge_grade"] += grades
    store.close()
    table = pl.DataFrame(rows, schema={"caption_id": pl.String, "query": pl.String, "judge_grade": pl.Int8})
    with atomic_path(out / JUDGEMENTS) as tmp:
        table.write_parquet(tmp)
    stats["grades"] = {str(k): v for k, v in table["judge_grade"].value_counts().sort("judge_grade").iter_rows()}
    stats["fingerprint"] = fp
    return stats


def _main(config: RunConfig) -> int:
    from gen.run import EXIT_INCOMPLETE, EXIT_OK, UsageError
    if not (config.out_dir / "queries.parquet").is_file():
        raise UsageError(f"{config.out_dir}/queries.parquet not found: run gen.run first (same --out)")
    stats = asyncio.run(judge(config))
    print(json.dumps(stats, ensure_ascii=False, indent=2))
    return EXIT_INCOMPLETE if stats["failed"] else EXIT_OK


def main(argv: Optional[list[str]] = None) -> int:
    from gen.run import entry
    return entry(argv, _main)


if __name__ == "__main__":
    sys.exit(main())
