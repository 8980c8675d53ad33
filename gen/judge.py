"""Judge stage: the LLM grades (query, caption) pairs 0/1/2 with the benchmark's definitions.

    python -m gen.judge --captions raw.jsonl [--out DIR] [--candidates K] [any gen.run engine option]

Runs after `gen.run` on its output directory. Two kinds of pair, one request per caption
(in chunks of 32 queries) asking for a grade of each query:
- its own: every distinct generated (query, caption) pair -> judgements.parquet. Curation
  uses it with `judge = "drop"` (pairs graded 0 go, reason judged_irrelevant) or
  `"regrade"` (the judge's grade also replaces the generator's).
- with --candidates K: each query row's first K BM25-mined hard negatives in shards/latest,
  i.e. other captions the query is most likely to be true of ->
  candidate_judgements.parquet. Curation with `judge_candidates = true` makes those graded
  1 or 2 extra positives (instead of false negatives) and marks those graded 0 as
  confirmed negatives (`neg_judged`).
Both write caption_id, query, judge_grade (null where no judgement came). Same engines,
options, retries and resume as generation: answers live in DIR/judge.sqlite, keyed by the
judge's fingerprint, the caption and its queries, so a rerun pays only for what is new; an
answer still malformed after its repair rounds (`--repair-rounds`, as for generation) is
stored as rejected with the reason.
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
from pydantic import ValidationError

from gen import logs
from gen.atomic import atomic_path
from gen.config import RunConfig, Sampling, model_identity
from gen.curate.judged import CANDIDATE_JUDGEMENTS, JUDGEMENTS  # the files curation reads
from gen.engines import Completion, EngineError, build_engine
from gen.generate import ask_until_valid, rejection
from gen.generate.prompts import PROBE, Templates
from gen.curate.shards import query_shards
from gen.store import AnswerStore
from gen.generate.validate import AnswerError
from prompts import TEMPLATE_DIR
from schemas.judge import Judgement, judge_json_schema

# The judge's own: gen.run's engine.log in the same directory is the generation run's.
ENGINE_LOG = "judge-engine.log"

log = logging.getLogger("gen.judge")
SYSTEM, USER = "judge.system.j2", "judge.user.j2"
# Queries per request: a caption can be the BM25 neighbour of a hundred queries, and one
# answer must stay well inside max_tokens (about 2 tokens a grade).
CHUNK = 32


class JudgePrompts:
    def __init__(self, directory: Optional[Path] = None):
        d = Path(directory) if directory and (Path(directory) / SYSTEM).is_file() else TEMPLATE_DIR
        self.templates = Templates(d, {SYSTEM: "nothing", USER: "caption, queries"})
        self.system = self.templates.render(self.templates.load(SYSTEM)).strip()
        self.user = self.templates.load(USER)
        self.digest = hashlib.sha256(b"".join((d / n).read_bytes() for n in (SYSTEM, USER))).hexdigest()
        self.messages(PROBE.text, [PROBE.text])  # fails now, not at the first request

    def messages(self, caption: str, queries: list[str]) -> list[dict[str, str]]:
        user = self.templates.render(self.user, caption=caption, queries=queries).strip()
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


def judge_sampling(config: RunConfig) -> Sampling:
    return Sampling(temperature=0.0, top_p=1.0, max_tokens=256, seed=config.sampling.seed)


def parse(text: str, n: int) -> list[int]:
    start, end = text.find("{"), text.rfind("}")
    try:
        grades = Judgement.model_validate_json(text[start:end + 1] if start >= 0 else text).grades
    except ValidationError as e:
        raise AnswerError(f"not a JSON object {{\"grades\": [0|1|2, ...]}}: {e.errors()[0]['msg']}") from None
    if len(grades) != n:
        raise AnswerError(f"{len(grades)} grades for {n} queries; give exactly one per query, in order")
    return grades


def own_pairs(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "queries.parquet", columns=["caption_id", "query"]).unique(maintain_order=True)


def candidate_pairs(out: Path, k: int) -> pl.DataFrame:
    """(caption_id, query): each query row's first k BM25-mined negatives in shards/latest.
    Random-fill negatives (BM25 score 0) are left out: nothing suggests they are relevant."""
    from gen.run import UsageError
    shards = query_shards(out / "shards" / "latest")
    if not shards:
        raise UsageError(f"--candidates needs curated shards in {out}/shards/latest: run gen.run with curation first")
    rows = pl.concat([pl.read_parquet(p, columns=["query", "neg_ids", "neg_bm25"]) for p in shards])
    return (rows.with_columns(pl.col("neg_ids").list.head(k), pl.col("neg_bm25").list.head(k))
            .explode("neg_ids", "neg_bm25")
            .filter(pl.col("neg_bm25") > 0)
            .select(caption_id="neg_ids", query="query")
            .unique(maintain_order=True))


def requests(pairs: pl.DataFrame) -> list[tuple[str, list[str]]]:
    """(caption_id, up to CHUNK queries) in the order the pairs came."""
    out = []
    for cid, qs in pairs.group_by("caption_id", maintain_order=True).agg("query").iter_rows():
        out += [(cid, qs[i:i + CHUNK]) for i in range(0, len(qs), CHUNK)]
    return out


async def _judge_one(engine, prompts: JudgePrompts, caption: str, queries: list[str], rounds: int) -> dict:
    def repair(first: list[dict], text: str, error: str) -> list[dict]:
        return [*first, {"role": "assistant", "content": text},
                {"role": "user", "content": f"你的输出不符合要求：{error}。请只输出一个完整的 JSON 对象。"}]

    done: list[Completion] = []
    grades, error = await ask_until_valid(engine, prompts.messages(caption, queries),
                                          judge_json_schema(len(queries)),
                                          lambda c: parse(c.text, len(queries)), repair, rounds, done)
    used = {"requests": len(done), "prompt_tokens": sum(c.prompt_tokens for c in done),
            "completion_tokens": sum(c.completion_tokens for c in done)}
    if error is None:
        return {"status": "ok", "answer": json.dumps(grades), "raw": done[-1].text, "reason": None, **used}
    return {"status": "rejected", "answer": None, "raw": done[-1].text,
            "reason": f"judge: {rejection(rounds, error)}", **used}


class _Judge:
    """One engine and one store for every request of a run."""

    def __init__(self, config: RunConfig, engine, store: AnswerStore, texts: dict[str, str],
                 prompts: JudgePrompts):
        self.prompts = prompts
        self.fp = hashlib.sha256(json.dumps(
            {"model": model_identity(config.model), "templates": self.prompts.digest,
             "schema": judge_json_schema(), "exact_count": True,
             "sampling": judge_sampling(config).model_dump()},
            sort_keys=True).encode()).hexdigest()
        self.config, self.engine, self.store, self.texts = config, engine, store, texts

    def key(self, cid: str, queries: list[str]) -> str:
        return hashlib.sha256("\0".join([self.fp, self.texts[cid], *queries]).encode()).hexdigest()

    async def grade(self, pairs: pl.DataFrame, path: Path) -> dict:
        asks = [(cid, qs, self.key(cid, qs)) for cid, qs in requests(pairs)]
        stats = {"pairs": pairs.height, "requests_needed": len(asks), "cached": 0, "judged": 0,
                 "rejected": 0, "failed": 0, "requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        slots = asyncio.Semaphore(self.config.concurrency)

        async def one(cid: str, qs: list[str], key: str) -> None:
            try:
                got = await _judge_one(self.engine, self.prompts, self.texts[cid], qs, self.config.repair_rounds)
            except EngineError as e:
                stats["failed"] += 1
                log.warning("caption %s: no judgement (%s); a rerun will ask again", cid, e)
                return
            finally:
                slots.release()
            for k in ("requests", "prompt_tokens", "completion_tokens"):
                stats[k] += got[k]
            stats["judged" if got["status"] == "ok" else "rejected"] += 1
            self.store.put(key, got["status"], answer=got["answer"], raw=got["raw"], reason=got["reason"],
                           requests=got["requests"], prompt_tokens=got["prompt_tokens"],
                           completion_tokens=got["completion_tokens"])

        tasks = []
        for cid, qs, key in asks:
            if not self.config.force and self.store.has(key, repair_rounds=self.config.repair_rounds):
                stats["cached"] += 1
                continue
            await slots.acquire()
            tasks.append(asyncio.create_task(one(cid, qs, key)))
        await asyncio.gather(*tasks)
        table = self.table(asks)
        with atomic_path(path) as tmp:
            table.write_parquet(tmp)
        stats["grades"] = {str(k): v for k, v in table["judge_grade"].value_counts().sort("judge_grade").iter_rows()}
        return stats

    def table(self, asks: list[tuple[str, list[str], str]]) -> pl.DataFrame:
        rows: dict[str, list] = {"caption_id": [], "query": [], "judge_grade": []}
        for cid, qs, key in asks:
            got = self.store.get(key)
            grades = json.loads(got.answer) if got and got.status == "ok" else [None] * len(qs)
            rows["caption_id"] += [cid] * len(qs)
            rows["query"] += qs
            rows["judge_grade"] += grades
        return pl.DataFrame(rows, schema={"caption_id": pl.String, "query": pl.String, "judge_grade": pl.Int8})


async def judge(config: RunConfig, candidates: int = 0) -> dict:
    from gen.engines.lazy import LazyEngine  # the same engine wiring as generation
    from gen.run import resolve_model, stop_on_sigterm

    out = config.out_dir
    mine = own_pairs(out)
    others = candidate_pairs(out, candidates) if candidates else None
    texts = dict(pl.read_parquet(out / "captions.parquet", columns=["id", "text"]).iter_rows())
    jconfig = config.model_copy(update={"sampling": judge_sampling(config)})
    model = resolve_model(config)
    engine = LazyEngine(lambda: build_engine(jconfig, model, judge_json_schema()))
    prompts = JudgePrompts(config.prompts)   # a broken template: an error before the store opens
    store = AnswerStore(out / "judge.sqlite")
    judge_ = _Judge(config, engine, store, texts, prompts)
    stats: dict = {"fingerprint": judge_.fp}
    undo_sigterm = stop_on_sigterm()
    engine_log = out / ENGINE_LOG
    try:
        with logs.divert_output(None if config.verbose else engine_log):
            try:
                stats["own"] = await judge_.grade(mine, out / JUDGEMENTS)
                if others is not None:
                    stats["candidates"] = await judge_.grade(others, out / CANDIDATE_JUDGEMENTS)
            finally:
                await engine.aclose()
    finally:
        undo_sigterm()
        store.close()
        if engine_log.is_file() and engine_log.stat().st_size == 0:
            engine_log.unlink()
    return stats


def _main(config: RunConfig, candidates: int) -> int:
    from gen.run import EXIT_INCOMPLETE, EXIT_OK, UsageError, lock_out_dir
    if not (config.out_dir / "queries.parquet").is_file():
        raise UsageError(f"{config.out_dir}/queries.parquet not found: run gen.run first (same --out)")
    # gen.run beside it would replace the queries and prune the shard versions it reads.
    lock = lock_out_dir(config.out_dir)
    try:
        stats = asyncio.run(judge(config, candidates))
    finally:
        lock.close()
    print(json.dumps(stats, ensure_ascii=False, indent=2))
    failed = sum(part["failed"] for part in (stats["own"], stats.get("candidates", {"failed": 0})))
    return EXIT_INCOMPLETE if failed else EXIT_OK


def main(argv: Optional[list[str]] = None) -> int:
    from gen.cli import ConfigError, Parser, load_config
    from gen.run import entry
    ours = {}

    def load(args: list[str]) -> RunConfig:   # inside entry(): its errors are logged as the job asks
        ap = Parser(prog="python -m gen.judge", add_help=False)
        ap.add_argument("--candidates", type=int, default=0)
        got, rest = ap.parse_known_args(args)
        if {"-h", "--help"} & set(rest):   # the engine options below are gen.run's
            print(__doc__)
        if got.candidates < 0:
            raise ConfigError("python -m gen.judge: --candidates must be 0 or more")
        ours["candidates"] = got.candidates
        return load_config(rest)

    return entry(argv, lambda config: _main(config, ours["candidates"]), command="gen.judge", load=load)


if __name__ == "__main__":
    sys.exit(main())
